//! The sidecar's Capsules and recall settings: which Capsules the pod holds (by the digest the
//! operator verified, so the sidecar checks the delivered folder against it at load), how
//! recall is bounded, and the revocations in force (live: a revoked Capsule stops being served
//! without a restart). See `docs/capsules.md`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One entry of `capsules`: a bare name (older operators, and Capsules the sidecar does not
/// serve recall for), or `{"name", "digest", "collection"}`: the verified digest of the
/// content delivered into `<recall.capsulesDir>/<name>/`, and, for a Capsule whose vectors
/// live in Qdrant (`spec.index: qdrant`), the collection the operator loads it into
/// (searched at `recall.qdrantUrl` instead of an index built in the sidecar), or, for a
/// ConfigMap Capsule, `{"name", "digest", "file"}`: the one file its folder holds (the
/// ConfigMap key), whose sha256 is the digest. Recall serves bundles only; every entry with a
/// digest is withdrawn on revocation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SidecarCapsule {
    /// The Capsule's name (its folder).
    pub name: String,
    /// The verified digest, when the operator delivered content.
    pub digest: Option<String>,
    /// The Qdrant collection holding its vectors, when it opted in.
    pub collection: Option<String>,
    /// A ConfigMap Capsule's one file in its folder (the digest is the file's).
    pub file: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum CapsuleWire {
    Name(String),
    Entry(CapsuleEntry),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CapsuleEntry {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    collection: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<String>,
}

impl Serialize for SidecarCapsule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.digest.is_none() && self.collection.is_none() && self.file.is_none() {
            CapsuleWire::Name(self.name.clone())
        } else {
            CapsuleWire::Entry(CapsuleEntry {
                name: self.name.clone(),
                digest: self.digest.clone(),
                collection: self.collection.clone(),
                file: self.file.clone(),
            })
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for SidecarCapsule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match CapsuleWire::deserialize(d)? {
            CapsuleWire::Name(name) => SidecarCapsule {
                name,
                ..SidecarCapsule::default()
            },
            CapsuleWire::Entry(e) => SidecarCapsule {
                name: e.name,
                digest: e.digest,
                collection: e.collection,
                file: e.file,
            },
        })
    }
}

impl From<&str> for SidecarCapsule {
    fn from(name: &str) -> Self {
        SidecarCapsule {
            name: name.to_owned(),
            ..SidecarCapsule::default()
        }
    }
}

/// `recall`: `POST /v1/recall` over the pod's Capsules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct RecallSettings {
    /// Where the Capsules are delivered (`<capsulesDir>/<name>/`); the operator mounts them
    /// read-only into the sidecar too.
    pub capsules_dir: PathBuf,
    /// The model queries are embedded with. Absent: each Capsule's own (the model its bundle
    /// records). Present: a Capsule embedded by another model is not served, with that reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding_model: Option<String>,
    /// Longest query accepted, in bytes.
    pub max_query_bytes: usize,
    /// Largest `k` accepted.
    pub max_k: usize,
    /// Where the sidecar moves a revoked Capsule's folder out of `capsulesDir`, and from where
    /// it moves it back (checked against its digest again) when the revocation is lifted. It
    /// must be on the same filesystem as `capsulesDir` (one volume), so each move is a single
    /// atomic rename. The operator mounts only `capsulesDir` into the agent container, so a
    /// withdrawn Capsule is gone from the agent's `/capsules/<name>/`. Absent: the folders are
    /// not moved (recall still refuses a revoked Capsule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub withheld_dir: Option<PathBuf>,
    /// A Capsule with more chunks than this is searched through an approximate (HNSW) index
    /// built at load; up to it, by exact search (`soma_capsule::index`).
    pub approximate_above_rows: usize,
    /// Candidates the approximate index examines per query (HNSW's `ef`; at least `k`):
    /// higher finds more of the true top-k and costs more per query.
    pub approximate_ef: usize,
    /// The Qdrant server (gRPC, `http://host:6334`) holding the collections of the Capsules
    /// that opted in (`spec.index: qdrant`; the operator's `--qdrant-url`). Absent: such a
    /// Capsule is not served (recall says why).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qdrant_url: Option<String>,
}

impl RecallSettings {
    /// Whether every field is at its default.
    pub fn is_default(&self) -> bool {
        *self == RecallSettings::default()
    }
}

/// Where the operator delivers Capsules.
pub const CAPSULES_DIR: &str = "/capsules";

impl Default for RecallSettings {
    fn default() -> Self {
        RecallSettings {
            capsules_dir: PathBuf::from(CAPSULES_DIR),
            embedding_model: None,
            max_query_bytes: 8 * 1024,
            max_k: 100,
            withheld_dir: None,
            approximate_above_rows: 20_000,
            approximate_ef: 64,
            qdrant_url: None,
        }
    }
}

/// A Capsule the sidecar must stop serving (live): its Capsule was revoked or its signature
/// no longer verifies. Keyed by name and digest: a Capsule that now pins other content is
/// another delivery, and rolls the pods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RevokedCapsule {
    /// The Capsule's name.
    pub name: String,
    /// The digest no longer to serve.
    pub digest: String,
    /// Why, in words a user can act on (recall's 410 carries it).
    pub reason: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_capsule_is_a_name_or_a_name_and_digest() {
        let v: Vec<SidecarCapsule> =
            serde_json::from_str(r#"["kb", {"name": "docs", "digest": "sha256:ab"}]"#).unwrap();
        assert_eq!(v[0], SidecarCapsule::from("kb"));
        assert_eq!(v[1].digest.as_deref(), Some("sha256:ab"));
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"["kb",{"name":"docs","digest":"sha256:ab"}]"#
        );
        assert!(serde_json::from_str::<SidecarCapsule>(r#"{"name": "x", "digets": "y"}"#).is_err());
        let q: SidecarCapsule = serde_json::from_str(
            r#"{"name": "big", "digest": "sha256:cd", "collection": "soma_ns_sha256_cd"}"#,
        )
        .unwrap();
        assert_eq!(q.collection.as_deref(), Some("soma_ns_sha256_cd"));
        assert_eq!(
            serde_json::to_string(&q).unwrap(),
            r#"{"name":"big","digest":"sha256:cd","collection":"soma_ns_sha256_cd"}"#
        );
        assert!(serde_json::from_str::<SidecarCapsule>("3").is_err());
    }
}
