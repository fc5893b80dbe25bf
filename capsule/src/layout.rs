//! A bundle on disk as an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`), the
//! form `soma capsule pack` writes and `soma capsule push` reads; `oras cp --from-oci-layout`
//! and other OCI tools read it too.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bundle::{Bundle, is_sha256_digest, parse_manifest, require_empty, sha256_digest};
use crate::error::{Error, Result};
use crate::format::{ARTIFACT_TYPE, OCI_MANIFEST_MEDIA_TYPE, VERSION_ANNOTATION};

const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    media_type: String,
    manifests: Vec<IndexEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    artifact_type: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

fn blob_path(dir: &Path, digest: &str) -> Result<std::path::PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|_| is_sha256_digest(digest))
        .ok_or_else(|| Error::malformed("OCI layout", format!("digest {digest:?}")))?;
    Ok(dir.join("blobs").join("sha256").join(hex))
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(Error::io(format!("creating {}", parent.display())))?;
    }
    std::fs::write(path, bytes).map_err(Error::io(format!("writing {}", path.display())))
}

/// Writes `bundle` as an OCI image layout into `dir` (absent or empty), its manifest tagged
/// with the Capsule's version.
pub fn write_layout(bundle: &Bundle, dir: &Path) -> Result<()> {
    require_empty(dir)?;
    let manifest = parse_manifest(&bundle.manifest, Some(&bundle.digest))?;
    write(
        &dir.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    for (digest, bytes) in &bundle.blobs {
        write(&blob_path(dir, digest)?, bytes)?;
    }
    write(&blob_path(dir, &bundle.digest)?, &bundle.manifest)?;
    let mut annotations = BTreeMap::new();
    if let Some(version) = manifest.annotations.get(VERSION_ANNOTATION) {
        annotations.insert(REF_NAME.to_owned(), version.clone());
    }
    let index = Index {
        schema_version: 2,
        media_type: INDEX_MEDIA_TYPE.to_owned(),
        manifests: vec![IndexEntry {
            media_type: OCI_MANIFEST_MEDIA_TYPE.to_owned(),
            digest: bundle.digest.clone(),
            size: bundle.manifest.len() as u64,
            artifact_type: ARTIFACT_TYPE.to_owned(),
            annotations,
        }],
    };
    let json =
        serde_json::to_vec(&index).map_err(|e| Error::malformed("index.json", e.to_string()))?;
    write(&dir.join("index.json"), &json)
}

/// Reads the one bundle of the OCI image layout in `dir`, checking every blob.
pub fn read_layout(dir: &Path) -> Result<Bundle> {
    let index_path = dir.join("index.json");
    let bytes = std::fs::read(&index_path).map_err(Error::io(format!(
        "reading {} (is {} a packed Capsule?)",
        index_path.display(),
        dir.display()
    )))?;
    let index: Index = serde_json::from_slice(&bytes)
        .map_err(|e| Error::malformed("index.json", e.to_string()))?;
    let [entry] = index.manifests.as_slice() else {
        return Err(Error::malformed(
            "index.json",
            format!(
                "{} manifests; a packed Capsule has exactly one",
                index.manifests.len()
            ),
        ));
    };
    let read = |digest: &str| -> Result<Vec<u8>> {
        let path = blob_path(dir, digest)?;
        std::fs::read(&path).map_err(Error::io(format!("reading {}", path.display())))
    };
    let manifest_bytes = read(&entry.digest)?;
    let manifest = parse_manifest(&manifest_bytes, Some(&entry.digest))?;
    let mut blobs = BTreeMap::new();
    for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
        let bytes = read(&d.digest)?;
        crate::bundle::check_blob(d, &bytes)?;
        blobs.insert(d.digest.clone(), bytes);
    }
    Ok(Bundle {
        digest: sha256_digest(&manifest_bytes),
        manifest: manifest_bytes,
        blobs,
    })
}
