//! Helpers shared by this crate's integration tests.
#![allow(dead_code, clippy::unwrap_used)]

pub mod mutate;

use std::path::{Path, PathBuf};

use serde_json::Value;
use soma_policy::{PolicyStore, Sources, gatekeeper, inventory};

pub fn builtin_dir() -> PathBuf {
    Path::new(
        &std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()),
    )
    .join("../builtin")
}

/// The built-ins configured by `fixture-constraints.yaml`, over `fixture-inventory.yaml`.
pub fn fixture_store() -> PolicyStore {
    let dir = builtin_dir();
    let mut sources = Sources::builtins();
    let text = std::fs::read_to_string(dir.join("fixture-constraints.yaml")).unwrap();
    sources.add_text("fixture-constraints.yaml", &text);
    let (store, report) = PolicyStore::loaded(&sources);
    assert!(report.is_clean(), "{:?}", report.errors);
    let inv_text = std::fs::read_to_string(dir.join("fixture-inventory.yaml")).unwrap();
    let objects = gatekeeper::documents(&inv_text, "inventory").unwrap();
    store
        .set_inventory(inventory::from_objects(&objects))
        .unwrap();
    store
}

/// Every fixture: (policy folder, valid?, file name, fixture document).
pub fn fixtures() -> Vec<(String, bool, String, Value)> {
    let mut out = Vec::new();
    for b in soma_policy::builtin::BUILTINS {
        for (sub, valid) in [("valid", true), ("invalid", false)] {
            let dir = builtin_dir().join(b.name).join("fixtures").join(sub);
            let mut files: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            assert!(!files.is_empty(), "{} has no fixtures", dir.display());
            for f in files {
                let doc: Value =
                    serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
                out.push((
                    b.name.to_owned(),
                    valid,
                    f.file_name().unwrap().to_string_lossy().into_owned(),
                    doc,
                ));
            }
        }
    }
    out
}
