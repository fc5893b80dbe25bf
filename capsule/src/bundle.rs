//! A bundle in memory: the OCI manifest's exact bytes, its digest, and the blobs it names.
//! [`Bundle::open`] checks everything a consumer relies on (every blob against its
//! descriptor, the layers the format requires, the Capsule manifest, chunks that are what
//! their documents say, embeddings that fit the chunks and the declared model) before any of
//! it is used; [`Contents::write_into`] then writes the checked content into a folder.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::format::{
    ARTIFACT_TYPE, CHUNKS_MEDIA_TYPE, CONFIG_MEDIA_TYPE, CapsuleManifest, Chunk,
    DOCUMENTS_MEDIA_TYPE, Descriptor, EMBEDDINGS_MEDIA_TYPE, Embedding, MAX_BUNDLE_BYTES,
    MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, OCI_MANIFEST_MEDIA_TYPE, OciManifest,
    POLICY_HASH_ANNOTATION, SCHEMA_VERSION, VERSION_ANNOTATION, from_jsonl,
};

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Whether `digest` is `sha256:<64 lowercase hex>`.
pub fn is_sha256_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// A bundle: the manifest's bytes, their digest, and the blobs by digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// The OCI manifest, byte for byte as signed and pushed.
    pub manifest: Vec<u8>,
    /// `sha256:<hex>` of `manifest`: the Capsule's digest.
    pub digest: String,
    /// The config and layer blobs, by digest.
    pub blobs: BTreeMap<String, Vec<u8>>,
}

/// Parses a manifest after checking its bytes hash to `expected` (when given) and that it is
/// a Capsule bundle's manifest.
pub fn parse_manifest(bytes: &[u8], expected: Option<&str>) -> Result<OciManifest> {
    if let Some(expected) = expected {
        let actual = sha256_digest(bytes);
        if actual != expected {
            return Err(Error::DigestMismatch {
                expected: expected.to_owned(),
                actual,
            });
        }
    }
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(Error::malformed(
            "manifest",
            format!("{} bytes (at most {MAX_MANIFEST_BYTES})", bytes.len()),
        ));
    }
    let manifest: OciManifest = serde_json::from_slice(bytes)
        .map_err(|e| Error::malformed("manifest", format!("not an OCI image manifest: {e}")))?;
    let bad = |reason: String| Err(Error::malformed("manifest", reason));
    if manifest.schema_version != 2 || manifest.media_type != OCI_MANIFEST_MEDIA_TYPE {
        return bad(format!(
            "expected schemaVersion 2 and mediaType {OCI_MANIFEST_MEDIA_TYPE}, got {} and {:?}",
            manifest.schema_version, manifest.media_type
        ));
    }
    if manifest.config.media_type != CONFIG_MEDIA_TYPE {
        return bad(format!(
            "the config is {:?}, not a Capsule manifest ({CONFIG_MEDIA_TYPE}): this artifact is not a Capsule bundle (pack it with `soma capsule pack`)",
            manifest.config.media_type
        ));
    }
    if !manifest.artifact_type.is_empty() && manifest.artifact_type != ARTIFACT_TYPE {
        return bad(format!(
            "artifactType {:?} is not {ARTIFACT_TYPE}",
            manifest.artifact_type
        ));
    }
    let mut total = 0u64;
    let mut seen = BTreeSet::new();
    for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
        if !is_sha256_digest(&d.digest) {
            return bad(format!(
                "descriptor digest {:?} is not sha256:<hex>",
                d.digest
            ));
        }
        total = total.saturating_add(d.size);
        if d.media_type != CONFIG_MEDIA_TYPE && !seen.insert(d.media_type.as_str()) {
            return bad(format!("two {} layers", d.media_type));
        }
        if ![
            CONFIG_MEDIA_TYPE,
            DOCUMENTS_MEDIA_TYPE,
            CHUNKS_MEDIA_TYPE,
            EMBEDDINGS_MEDIA_TYPE,
        ]
        .contains(&d.media_type.as_str())
        {
            return bad(format!("unknown layer media type {:?}", d.media_type));
        }
    }
    if manifest.config.size > MAX_CONFIG_BYTES {
        return bad(format!(
            "the config is {} bytes (at most {MAX_CONFIG_BYTES})",
            manifest.config.size
        ));
    }
    if total > MAX_BUNDLE_BYTES {
        return bad(format!(
            "the blobs total {total} bytes (at most {MAX_BUNDLE_BYTES})"
        ));
    }
    for required in [DOCUMENTS_MEDIA_TYPE, CHUNKS_MEDIA_TYPE] {
        if !seen.contains(required) {
            return Err(Error::MissingLayer {
                media_type: required.to_owned(),
            });
        }
    }
    Ok(manifest)
}

/// Checks `bytes` against descriptor `d`.
pub fn check_blob(d: &Descriptor, bytes: &[u8]) -> Result<()> {
    let mismatch = |problem: String| Error::BlobMismatch {
        digest: d.digest.clone(),
        media_type: d.media_type.clone(),
        problem,
    };
    if bytes.len() as u64 != d.size {
        return Err(mismatch(format!(
            "is {} bytes, the manifest says {}",
            bytes.len(),
            d.size
        )));
    }
    let actual = sha256_digest(bytes);
    if actual != d.digest {
        return Err(mismatch(format!("has digest {actual}")));
    }
    Ok(())
}

/// A bundle's checked content.
#[derive(Clone, Debug, PartialEq)]
pub struct Contents {
    /// The digest (of `manifest_bytes`).
    pub digest: String,
    /// The OCI manifest's bytes.
    pub manifest_bytes: Vec<u8>,
    /// The Capsule manifest.
    pub manifest: CapsuleManifest,
    /// Its bytes.
    pub manifest_json: Vec<u8>,
    /// The documents: path and bytes, sorted by path.
    pub documents: Vec<(String, Vec<u8>)>,
    /// The chunks, in layer order.
    pub chunks: Vec<Chunk>,
    /// The chunks layer's bytes.
    pub chunks_jsonl: Vec<u8>,
    /// The embeddings layer's bytes and records, when present.
    pub embeddings: Option<(Vec<u8>, Vec<Embedding>)>,
}

/// A relative path of normal components only (no `..`, no root, no `.`), `/`-separated.
pub fn safe_relative_path(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    if path.is_empty()
        || path.contains('\\')
        || !p.components().all(|c| matches!(c, Component::Normal(_)))
    {
        return None;
    }
    Some(p.to_path_buf())
}

/// Reads the Capsule manifest (the OCI config blob, already checked against its descriptor)
/// and checks it against the OCI manifest: a schema this build reads, and the version and
/// `policyHash` annotations (what the signature covers) saying the same as the config.
pub(crate) fn read_config(manifest: &OciManifest, config_bytes: &[u8]) -> Result<CapsuleManifest> {
    let config: CapsuleManifest = serde_json::from_slice(config_bytes)
        .map_err(|e| Error::malformed("Capsule manifest (config)", e.to_string()))?;
    if config.schema_version != SCHEMA_VERSION {
        return Err(Error::malformed(
            "Capsule manifest (config)",
            format!(
                "schemaVersion {} (this build reads {SCHEMA_VERSION})",
                config.schema_version
            ),
        ));
    }
    for (annotation, value) in [
        (VERSION_ANNOTATION, &config.version),
        (POLICY_HASH_ANNOTATION, &config.policy_hash),
    ] {
        if manifest.annotations.get(annotation) != Some(value) {
            return Err(Error::malformed(
                "manifest",
                format!(
                    "annotation {annotation} is {:?} but the Capsule manifest says {value:?}",
                    manifest.annotations.get(annotation)
                ),
            ));
        }
    }
    Ok(config)
}

fn read_documents(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    let bad = |reason: String| Error::malformed("documents layer", reason);
    let mut archive = tar::Archive::new(bytes);
    let mut out: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("not a tar: {e}")))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(bad(format!(
                "entry type {:?}: only regular files are allowed",
                entry.header().entry_type()
            )));
        }
        let raw = entry.path_bytes().into_owned();
        let path = String::from_utf8(raw).map_err(|_| bad("a path is not UTF-8".to_owned()))?;
        if safe_relative_path(&path).is_none() {
            return Err(bad(format!("path {path:?} must be relative, without `..`")));
        }
        let mut data = Vec::new();
        entry
            .read_to_end(&mut data)
            .map_err(|e| bad(format!("{path}: {e}")))?;
        if out.insert(path.clone(), data).is_some() {
            return Err(bad(format!("{path} appears twice")));
        }
    }
    Ok(out.into_iter().collect())
}

impl Bundle {
    /// The blob of descriptor `d`, checked against it.
    fn blob(&self, d: &Descriptor) -> Result<&[u8]> {
        let bytes = self
            .blobs
            .get(&d.digest)
            .ok_or_else(|| Error::MissingLayer {
                media_type: format!("{} ({})", d.media_type, d.digest),
            })?;
        check_blob(d, bytes)?;
        Ok(bytes)
    }

    /// Checks the whole bundle and returns its content.
    pub fn open(&self) -> Result<Contents> {
        let manifest = parse_manifest(&self.manifest, Some(&self.digest))?;
        let layer = |media_type: &str| manifest.layers.iter().find(|l| l.media_type == media_type);
        let config_bytes = self.blob(&manifest.config)?;
        let config = read_config(&manifest, config_bytes)?;
        let documents_layer = layer(DOCUMENTS_MEDIA_TYPE).ok_or_else(|| Error::MissingLayer {
            media_type: DOCUMENTS_MEDIA_TYPE.to_owned(),
        })?;
        let documents = read_documents(self.blob(documents_layer)?)?;
        let chunks_layer = layer(CHUNKS_MEDIA_TYPE).ok_or_else(|| Error::MissingLayer {
            media_type: CHUNKS_MEDIA_TYPE.to_owned(),
        })?;
        let chunks_jsonl = self.blob(chunks_layer)?.to_vec();
        let chunks: Vec<Chunk> =
            from_jsonl(&chunks_jsonl).map_err(|reason| Error::malformed("chunks layer", reason))?;
        check_chunks(&config, &documents, &chunks)?;
        let embeddings = match (layer(EMBEDDINGS_MEDIA_TYPE), &config.embedding) {
            (None, None) => None,
            (Some(l), Some(model)) => {
                let bytes = self.blob(l)?.to_vec();
                let records: Vec<Embedding> = from_jsonl(&bytes)
                    .map_err(|reason| Error::malformed("embeddings layer", reason))?;
                check_embeddings(&chunks, &records, model.dimensions)?;
                Some((bytes, records))
            }
            (Some(_), None) => {
                return Err(Error::Embeddings {
                    reason:
                        "an embeddings layer, but the Capsule manifest names no embedding model"
                            .to_owned(),
                });
            }
            (None, Some(_)) => {
                return Err(Error::MissingLayer {
                    media_type: EMBEDDINGS_MEDIA_TYPE.to_owned(),
                });
            }
        };
        Ok(Contents {
            digest: self.digest.clone(),
            manifest_bytes: self.manifest.clone(),
            manifest: config,
            manifest_json: config_bytes.to_vec(),
            documents,
            chunks,
            chunks_jsonl,
            embeddings,
        })
    }
}

/// Chunks must be counted right, have unique ids, and be exactly the slice of the document
/// they name.
fn check_chunks(
    config: &CapsuleManifest,
    documents: &[(String, Vec<u8>)],
    chunks: &[Chunk],
) -> Result<()> {
    let bad = |reason: String| Err(Error::malformed("chunks layer", reason));
    if config.documents != documents.len() || config.chunks != chunks.len() {
        return bad(format!(
            "the Capsule manifest counts {} documents and {} chunks, the layers hold {} and {}",
            config.documents,
            config.chunks,
            documents.len(),
            chunks.len()
        ));
    }
    let by_path: BTreeMap<&str, &[u8]> = documents
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let mut ids = BTreeSet::new();
    for c in chunks {
        if !ids.insert(c.id.as_str()) {
            return bad(format!("chunk id {:?} appears twice", c.id));
        }
        let Some(doc) = by_path.get(c.document.as_str()) else {
            return bad(format!(
                "chunk {:?} names document {:?}, which the bundle does not hold",
                c.id, c.document
            ));
        };
        if doc.get(c.start..c.end) != Some(c.text.as_bytes()) {
            return bad(format!(
                "chunk {:?} is not bytes {}..{} of {:?}",
                c.id, c.start, c.end, c.document
            ));
        }
    }
    Ok(())
}

/// One embedding per chunk, in chunk order, each of `dimensions` finite numbers.
pub fn check_embeddings(chunks: &[Chunk], records: &[Embedding], dimensions: usize) -> Result<()> {
    let bad = |reason: String| Err(Error::Embeddings { reason });
    if dimensions == 0 {
        return bad("the dimension must be at least 1".to_owned());
    }
    if records.len() != chunks.len() {
        return bad(format!(
            "{} vectors for {} chunks (one per chunk, in chunk order)",
            records.len(),
            chunks.len()
        ));
    }
    for (chunk, e) in chunks.iter().zip(records) {
        if chunk.id != e.id {
            return bad(format!(
                "vector {:?} where chunk {:?} was expected (one per chunk, in chunk order)",
                e.id, chunk.id
            ));
        }
        if e.vector.len() != dimensions {
            return bad(format!(
                "the vector of {:?} has {} dimensions, the model makes {dimensions}",
                e.id,
                e.vector.len()
            ));
        }
        if !e.vector.iter().all(|x| x.is_finite()) {
            return bad(format!(
                "the vector of {:?} is not all finite numbers",
                e.id
            ));
        }
    }
    Ok(())
}

/// Files a delivered Capsule holds, under its folder.
pub mod files {
    /// The OCI manifest, byte for byte: `sha256sum manifest.json` is the Capsule's digest.
    pub const MANIFEST: &str = "manifest.json";
    /// The Capsule manifest (version, policyHash, counts, embedding model).
    pub const CAPSULE: &str = "capsule.json";
    /// The chunks, JSON Lines.
    pub const CHUNKS: &str = "chunks.jsonl";
    /// The embeddings, JSON Lines (only when the bundle has them).
    pub const EMBEDDINGS: &str = "embeddings.jsonl";
    /// The documents, under their paths.
    pub const DOCUMENTS: &str = "documents";
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(Error::io(format!("creating {}", parent.display())))?;
    }
    std::fs::write(path, bytes).map_err(Error::io(format!("writing {}", path.display())))?;
    let mut perms = std::fs::metadata(path)
        .map_err(Error::io(format!("reading {}", path.display())))?
        .permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(path, perms).map_err(Error::io(format!("chmod {}", path.display())))
}

/// Fails unless `dir` is absent or an empty folder.
pub fn require_empty(dir: &Path) -> Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Error::NotEmpty {
                    path: dir.display().to_string(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Io {
            what: format!("reading {}", dir.display()),
            source: e,
        }),
    }
}

/// Writes into `dir` (absent or empty) through `write`, which fills a staging folder inside
/// it; the staged entries are then moved into place. A failure leaves `dir` empty.
fn deliver(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    require_empty(dir)?;
    std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    let staging = dir.join(".incoming");
    let result = write(&staging).and_then(|()| {
        let entries = std::fs::read_dir(&staging)
            .map_err(Error::io(format!("reading {}", staging.display())))?;
        for entry in entries {
            let entry = entry.map_err(Error::io(format!("reading {}", staging.display())))?;
            let to = dir.join(entry.file_name());
            std::fs::rename(entry.path(), &to)
                .map_err(Error::io(format!("moving into {}", to.display())))?;
        }
        std::fs::remove_dir(&staging).map_err(Error::io(format!("removing {}", staging.display())))
    });
    if result.is_err() {
        // Leave nothing half-written behind.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let p = entry.path();
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
    }
    result
}

/// Delivers content that is a single blob (a Capsule held in a ConfigMap): `bytes` must hash
/// to `digest`; they are written to `dir/name`, read-only. Nothing is written otherwise.
pub fn deliver_blob(bytes: &[u8], digest: &str, dir: &Path, name: &str) -> Result<()> {
    let actual = sha256_digest(bytes);
    if actual != digest {
        return Err(Error::DigestMismatch {
            expected: digest.to_owned(),
            actual,
        });
    }
    if name.contains('/') || safe_relative_path(name).is_none() {
        return Err(Error::Input {
            path: name.to_owned(),
            reason: "the file name must be one plain path component".to_owned(),
        });
    }
    deliver(dir, |staging| write_file(&staging.join(name), bytes))
}

impl Contents {
    /// Writes the content into `dir` (absent or empty): first into a staging folder inside
    /// it, then moved into place, so a failure leaves `dir` empty. Files are read-only.
    pub fn write_into(&self, dir: &Path) -> Result<()> {
        deliver(dir, |staging| self.write_staged(staging))
    }

    fn write_staged(&self, staging: &Path) -> Result<()> {
        write_file(&staging.join(files::MANIFEST), &self.manifest_bytes)?;
        write_file(&staging.join(files::CAPSULE), &self.manifest_json)?;
        write_file(&staging.join(files::CHUNKS), &self.chunks_jsonl)?;
        if let Some((bytes, _)) = &self.embeddings {
            write_file(&staging.join(files::EMBEDDINGS), bytes)?;
        }
        let docs = staging.join(files::DOCUMENTS);
        std::fs::create_dir_all(&docs)
            .map_err(Error::io(format!("creating {}", docs.display())))?;
        for (path, bytes) in &self.documents {
            let rel = safe_relative_path(path)
                .ok_or_else(|| Error::malformed("documents layer", format!("path {path:?}")))?;
            write_file(&docs.join(rel), bytes)?;
        }
        Ok(())
    }
}
