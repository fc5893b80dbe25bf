//! Helpers shared by the CRD tests: the generated schemas and the example manifests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()),
    )
    .parent()
    .expect("crds/ has a parent")
    .to_path_buf()
}

/// The `openAPIV3Schema` of the CRD for `kind`, as the API server would see it.
pub fn schema_for(kind: &str) -> Value {
    let crd = soma_crds::all_crds()
        .into_iter()
        .map(|(_, crd)| crd)
        .find(|crd| crd.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for kind {kind}"));
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("CRD has an openAPIV3Schema");
    serde_json::to_value(schema).expect("schema serialises")
}

/// Every document of every manifest in `examples/` and `examples/vault/` (kept apart because
/// they need a Vault to become Ready), with the file it came from.
pub fn example_documents() -> Vec<(String, Value)> {
    let mut files: Vec<_> = ["examples", "examples/vault"]
        .into_iter()
        .flat_map(|dir| {
            std::fs::read_dir(repo_root().join(dir))
                .unwrap_or_else(|e| panic!("{dir}/: {e}"))
                .map(|e| e.expect("readable entry").path())
        })
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("readable example");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).expect("example is valid YAML");
            if !value.is_null() {
                docs.push((path.display().to_string(), value));
            }
        }
    }
    docs
}

/// The first example document of `kind`.
pub fn example(kind: &str) -> Value {
    example_documents()
        .into_iter()
        .map(|(_, v)| v)
        .find(|v| v["kind"] == kind)
        .unwrap_or_else(|| panic!("no example of kind {kind}"))
}

/// A change to an example object: set the value at a JSON pointer, or remove it (`None`).
pub type Edit = (&'static str, Option<Value>);

/// The first example of `kind` with `edits` applied (parents must exist).
pub fn edited(kind: &str, edits: &[Edit]) -> Value {
    let mut doc = example(kind);
    for (pointer, value) in edits {
        let (parent, key) = pointer.rsplit_once('/').expect("pointer has a parent");
        let target = doc
            .pointer_mut(parent)
            .unwrap_or_else(|| panic!("{kind} example has {parent}"))
            .as_object_mut()
            .expect("parent is an object");
        match value {
            Some(v) => target.insert(key.to_owned(), v.clone()),
            None => target.remove(key),
        };
    }
    doc
}
