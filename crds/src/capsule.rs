//! The `Capsule` resource: a versioned, immutable, signed bundle of knowledge for agents.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::conditions_schema;

/// A signed bundle of memory blocks, tools and prompts, reviewed against a policy.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "soma.dev",
    version = "v1alpha1",
    kind = "Capsule",
    namespaced,
    status = "CapsuleStatus",
    shortname = "cap",
    category = "soma",
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".spec.version"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Signer","type":"string","jsonPath":".status.signer"}"#,
    printcolumn = r#"{"name":"Digest","type":"string","priority":1,"jsonPath":".status.verifiedDigest"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.index) || self.index != 'qdrant' || has(self.source.oci)")
    .message("spec.index qdrant needs an OCI source (a bundle with embeddings the operator loads into Qdrant)"))]
pub struct CapsuleSpec {
    /// The Capsule's version. Immutable: publish a new Capsule for a new version. An OCI
    /// bundle's signed version (`dev.soma.capsule.version`) must equal it.
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new("self == oldSelf")
        .message("spec.version is immutable; publish a new Capsule for a new version"))]
    pub version: String,
    /// Where the content comes from. Immutable: a Capsule's content never changes.
    #[x_kube(validation = Rule::new("self == oldSelf")
        .message("spec.source is immutable; publish a new Capsule to change its content"))]
    pub source: CapsuleSource,
    /// Hash (`sha256:…`) of the policy set this Capsule was reviewed against. For an OCI
    /// bundle it is signed with the content (`dev.soma.capsule.policy-hash` in the manifest)
    /// and must equal it, or the Capsule is not Ready (`PolicyHashMismatch`).
    #[schemars(regex(pattern = r"^sha256:[a-f0-9]{64}$"))]
    pub policy_hash: String,
    /// Who must have signed it.
    pub signature: SignaturePolicy,
    /// Revoke the Capsule: it is not Ready again, and no Agent or Job starts or changes its
    /// pods with it. Running pods are told through their sidecar: recall answers 410 and the
    /// sidecar withdraws the mounted folder from the agent container (docs/capsules.md).
    #[serde(default)]
    pub revoked: bool,
    /// Where recall keeps the chunk vectors (see [`RecallIndexKind`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<RecallIndexKind>,
}

/// Where recall keeps a Capsule's chunk vectors: `embedded` (the default: an index every
/// sidecar builds from the delivered bundle at start) or `qdrant` (one collection per
/// namespace and digest, loaded by the operator from the verified bundle into the Qdrant
/// server of its `--qdrant-url` and searched by every sidecar; for large Capsules shared by
/// many pods; needs an OCI source whose bundle carries embeddings). The Qdrant path is tested
/// only by the real-cluster suite (`SOMA_E2E_QDRANT=1`), which has not run on the machines
/// Soma is built on (docs/capsules.md).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RecallIndexKind {
    /// An index each sidecar builds at start (exact, or HNSW when large).
    #[default]
    Embedded,
    /// A Qdrant collection the operator loads.
    Qdrant,
}

/// The Capsule's content: exactly one of an OCI artifact, inline blocks or a ConfigMap.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.oci), has(self.inline), has(self.configMapRef)].filter(x, x).size() == 1")
    .message("source needs exactly one of oci, inline or configMapRef"))]
pub struct CapsuleSource {
    /// An OCI artifact, by digest: a Capsule bundle made by `soma capsule pack`
    /// (docs/capsules.md), delivered read-only into agent pods at `/capsules/<name>/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<OciSource>,
    /// Small capsules can be written inline. Inline blocks cannot carry a Cosign signature,
    /// so an inline Capsule is never Ready and never delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<InlineSource>,
    /// A ConfigMap holding the content (one key, signed with `cosign sign-blob`, signature
    /// under `<key>.sig`), delivered as `/capsules/<name>/<key>` once its bytes match the digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ConfigMapSource>,
}

/// An OCI artifact pinned by digest.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OciSource {
    /// Repository, for example `registry.example.com/capsules/support-kb`.
    #[schemars(length(min = 1, max = 512))]
    pub repository: String,
    /// The manifest digest: what is signed, verified and fetched into pods (nothing else).
    #[schemars(regex(pattern = r"^sha256:[a-f0-9]{64}$"))]
    pub digest: String,
}

/// Memory blocks written in the manifest.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InlineSource {
    /// The blocks.
    #[schemars(length(min = 1, max = 256))]
    pub blocks: Vec<MemoryBlock>,
}

/// One unit of agent memory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemoryBlock {
    /// Stable identifier within the Capsule.
    #[schemars(length(min = 1, max = 253))]
    pub id: String,
    /// The text.
    #[schemars(length(max = 16384))]
    pub text: String,
    /// Where the text came from (a URL, a document id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub provenance: Option<String>,
    /// Free-form metadata.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// A bundle stored in a ConfigMap, with its digest so it can be verified.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapSource {
    /// ConfigMap name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key holding the bundle.
    #[schemars(length(min = 1))]
    pub key: String,
    /// Digest of the bundle's bytes.
    #[schemars(regex(pattern = r"^sha256:[a-f0-9]{64}$"))]
    pub digest: String,
}

/// Accepted signers: a public key, a keyless identity, or both (either suffices).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.publicKeyRef) || has(self.keyless)")
    .message("signature needs publicKeyRef or keyless"))]
pub struct SignaturePolicy {
    /// A Cosign public key (PEM) in a ConfigMap of the Capsule's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_ref: Option<crate::common::ConfigMapKeyRef>,
    /// A keyless (Fulcio certificate) identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyless: Option<KeylessIdentity>,
}

/// A keyless signer identity.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeylessIdentity {
    /// OIDC issuer, for example `https://token.actions.githubusercontent.com`.
    #[schemars(length(min = 1))]
    pub issuer: String,
    /// Certificate subject (an email or a workflow URI).
    #[schemars(length(min = 1))]
    pub subject: String,
}

/// What Soma observed about a Capsule.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CapsuleStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// kstatus conditions.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The digest whose signature was verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_digest: Option<String>,
    /// The verified signer (key fingerprint or keyless identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// When verification happened (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<String>,
    /// The Qdrant collection holding the verified content's chunks (`spec.index: qdrant`),
    /// set once it holds one point per chunk. The `QdrantLoaded` condition says why not when
    /// it is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qdrant: Option<QdrantCollectionStatus>,
}

/// A Capsule's loaded Qdrant collection.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QdrantCollectionStatus {
    /// The collection (`soma_<namespace>_sha256_<hex>`).
    pub collection: String,
    /// The digest whose chunks it holds.
    pub digest: String,
    /// Points it holds (one per chunk).
    pub points: u64,
}
