//! The bundle's wire format: media types, the OCI manifest Soma writes, the Capsule manifest
//! (the config blob: version, `policyHash`, what the layers hold) and the records of the chunks
//! and embeddings layers. `docs/capsules.md` describes the same format for people.
//!
//! ```text
//!  OCI image manifest (its sha256 is the Capsule's digest; cosign signs it)
//!   ├─ artifactType  application/vnd.soma.capsule.v1
//!   ├─ annotations   dev.soma.capsule.version, dev.soma.capsule.policy-hash
//!   ├─ config        application/vnd.soma.capsule.config.v1+json     CapsuleManifest
//!   └─ layers        application/vnd.soma.capsule.documents.v1.tar   the documents (tar)
//!                    application/vnd.soma.capsule.chunks.v1+jsonl    one Chunk per line
//!                    application/vnd.soma.capsule.embeddings.v1+jsonl (optional) one Embedding per line
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The OCI image manifest media type (the bundle's top-level object).
pub const OCI_MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The bundle's `artifactType`.
pub const ARTIFACT_TYPE: &str = "application/vnd.soma.capsule.v1";
/// The config blob: a [`CapsuleManifest`].
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.soma.capsule.config.v1+json";
/// The documents layer: an uncompressed tar of regular files.
pub const DOCUMENTS_MEDIA_TYPE: &str = "application/vnd.soma.capsule.documents.v1.tar";
/// The chunks layer: JSON Lines of [`Chunk`].
pub const CHUNKS_MEDIA_TYPE: &str = "application/vnd.soma.capsule.chunks.v1+jsonl";
/// The optional embeddings layer: JSON Lines of [`Embedding`], in chunk order.
pub const EMBEDDINGS_MEDIA_TYPE: &str = "application/vnd.soma.capsule.embeddings.v1+jsonl";
/// Manifest annotation: the Capsule's version.
pub const VERSION_ANNOTATION: &str = "dev.soma.capsule.version";
/// Manifest annotation: the `policyHash` the content was reviewed against.
pub const POLICY_HASH_ANNOTATION: &str = "dev.soma.capsule.policy-hash";
/// The version of [`CapsuleManifest`] this crate writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Refuse a manifest larger than this (a bundle's manifest is well under 2 KiB).
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;
/// Refuse a config blob larger than this.
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024;
/// Refuse a bundle whose blobs together are larger than this.
pub const MAX_BUNDLE_BYTES: u64 = 1024 * 1024 * 1024;

/// A content descriptor (OCI image spec).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What the blob is.
    pub media_type: String,
    /// `sha256:<hex>` of the blob.
    pub digest: String,
    /// The blob's length in bytes.
    pub size: u64,
}

/// The OCI image manifest of a bundle, as Soma writes it (fields in this order, annotations
/// sorted), so the same content always serialises to the same bytes and the same digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OciManifest {
    /// Always 2.
    pub schema_version: u32,
    /// [`OCI_MANIFEST_MEDIA_TYPE`].
    pub media_type: String,
    /// [`ARTIFACT_TYPE`].
    #[serde(default)]
    pub artifact_type: String,
    /// The [`CapsuleManifest`] blob.
    pub config: Descriptor,
    /// Documents, chunks and (optionally) embeddings, in that order.
    pub layers: Vec<Descriptor>,
    /// Version and `policyHash`, so both are read (and signed) with the manifest itself.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// The Capsule manifest (the config blob): what the bundle is and what it holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CapsuleManifest {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The Capsule's version (the Capsule resource's `spec.version`).
    pub version: String,
    /// The policy set the content was reviewed against (the resource's `spec.policyHash`).
    pub policy_hash: String,
    /// How the documents were cut into chunks.
    pub chunking: Chunking,
    /// Number of documents in the documents layer.
    pub documents: usize,
    /// Number of chunks in the chunks layer.
    pub chunks: usize,
    /// The model that made the embeddings, when the bundle carries them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<EmbeddingModel>,
}

/// The chunking parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Chunking {
    /// Upper bound of a chunk's length in bytes (UTF-8).
    pub max_bytes: usize,
}

/// The model that made a bundle's embeddings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmbeddingModel {
    /// The model's name as its provider knows it (queries must be embedded by the same one).
    pub model: String,
    /// Length of every vector.
    pub dimensions: usize,
}

/// One chunk of a document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    /// `<document path>#<n>`: stable for the same document and chunking.
    pub id: String,
    /// The document's path inside the documents layer.
    pub document: String,
    /// Byte offset of the chunk's first byte in the document.
    pub start: usize,
    /// Byte offset one past the chunk's last byte.
    pub end: usize,
    /// `document[start..end]`.
    pub text: String,
}

/// One chunk's embedding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Embedding {
    /// The chunk's id.
    pub id: String,
    /// The vector.
    pub vector: Vec<f32>,
}

/// JSON Lines of `records`: one compact JSON object per line, each ending in `\n`.
pub fn to_jsonl<T: Serialize>(records: &[T]) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::new();
    for r in records {
        serde_json::to_writer(&mut out, r)?;
        out.push(b'\n');
    }
    Ok(out)
}

/// Parses JSON Lines (blank lines are refused: the writer never produces them).
pub fn from_jsonl<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<Vec<T>, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        out.push(serde_json::from_str(line).map_err(|e| format!("line {}: {e}", n + 1))?);
    }
    Ok(out)
}
