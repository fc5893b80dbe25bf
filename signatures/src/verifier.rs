//! The verifier: cache first, then the registry and the checks in `simple_signing`.
//!
//! ```text
//!  verify_oci(ref, policy) ──► cache (digest, policy fingerprint) ──hit──► Verified
//!                                   │ miss
//!                                   ▼
//!        registry: HEAD ref@digest ‖ GET ref:sha256-<hex>.sig + its layers
//!                                   ▼
//!        simple_signing: key verifies payload bytes ∧ payload names the digest
//!                                   ▼
//!                         cache.insert ──► Verified
//! ```

use std::time::Duration;

use tracing::{debug, instrument};

use crate::blob::{Blob, blob_signer, sha256_digest};
use crate::cache::VerifiedCache;
use crate::keyless::TrustedRoots;
use crate::reference::digest_bytes;
use crate::registry::{Failure, Registry};
use crate::simple_signing::{Trust, accepted_signer, with_count};
use crate::{OciRef, Policy, Rejection};

/// How the verifier reaches registries and how much it remembers.
#[derive(Clone, Debug)]
pub struct TrustConfig {
    /// Registries (`host:port`, exactly as in references) reached over plain HTTP instead of
    /// HTTPS, for example a registry on `127.0.0.1`.
    pub insecure_registries: Vec<String>,
    /// Time allowed to connect to a registry.
    pub connect_timeout: Duration,
    /// Time allowed for a registry to answer.
    pub read_timeout: Duration,
    /// How many verified digests to remember (0 turns the cache off).
    pub cache_capacity: usize,
    /// PEM CA certificates that keyless signing certificates must chain to (standing in for
    /// Fulcio's root, which is not reachable offline). Empty: keyless signatures are refused.
    pub keyless_roots: Vec<String>,
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            insecure_registries: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(15),
            cache_capacity: 10_000,
            keyless_roots: Vec::new(),
        }
    }
}

/// A successful verification, as recorded in a Capsule's or Agent's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The verified digest, `sha256:<hex>`.
    pub digest: String,
    /// Who signed: `key:sha256:<hex>` (the fingerprint of the accepted public key) or
    /// `keyless:subject=<subject>,issuer=<issuer>` (the accepted certificate identity).
    pub signer: String,
    /// When the signature was verified (a cached result keeps its first time).
    pub at: jiff::Timestamp,
}

/// Verifies cosign signatures on OCI artifacts and blobs, remembering what it verified.
///
/// Cheap to share: wrap it in an `Arc` and call it from every reconcile.
pub struct Verifier {
    registry: Registry,
    cache: VerifiedCache,
    roots: TrustedRoots,
}

impl Verifier {
    /// A verifier with its own registry client and an empty cache; fails when a keyless root
    /// cannot be read.
    pub fn new(config: TrustConfig) -> Result<Self, Rejection> {
        let roots = TrustedRoots::from_pems(&config.keyless_roots)
            .map_err(Rejection::InvalidTrustedRoot)?;
        Ok(Verifier {
            registry: Registry::new(&config),
            cache: VerifiedCache::new(config.cache_capacity),
            roots,
        })
    }

    /// Verifies that `artifact` carries a cosign signature accepted by `policy`.
    ///
    /// A digest already verified under an equal policy is answered from the cache without
    /// contacting the registry.
    #[instrument(skip(self, policy), fields(artifact = %artifact))]
    pub async fn verify_oci(
        &self,
        artifact: &OciRef,
        policy: &Policy,
    ) -> Result<Verified, Rejection> {
        let digest = digest_bytes(&artifact.digest).ok_or_else(|| Rejection::InvalidReference {
            reference: artifact.to_string(),
            reason: "the digest must be sha256:<64 lowercase hex>".to_string(),
        })?;
        if let Some(hit) = self.cache.get(digest, policy.fingerprint()) {
            return Ok(hit);
        }
        policy.require_checkable(!self.roots.is_empty())?;
        let (exists, layers) = tokio::join!(
            self.registry.artifact_exists(artifact),
            self.registry.signature_layers(artifact)
        );
        match exists {
            Ok(()) => {}
            Err(Failure::NotFound) => {
                return Err(Rejection::ArtifactNotFound {
                    reference: artifact.to_string(),
                });
            }
            Err(Failure::Other(rejection)) => return Err(rejection),
        }
        let layers = match layers {
            Ok(layers) => layers,
            Err(Failure::NotFound) => {
                return Err(Rejection::Unsigned {
                    reference: artifact.to_string(),
                    signature_tag: artifact.signature_tag(),
                });
            }
            Err(Failure::Other(rejection)) => return Err(rejection),
        };
        let now = jiff::Timestamp::now();
        let trust = Trust {
            policy,
            roots: &self.roots,
            now,
        };
        let signer =
            accepted_signer(artifact, &layers, &trust).map_err(|r| with_count(r, layers.len()))?;
        debug!(%signer, "signature verified");
        let verified = Verified {
            digest: artifact.digest.clone(),
            signer,
            at: now,
        };
        self.cache
            .insert(digest, policy.fingerprint(), verified.clone());
        Ok(verified)
    }

    /// Resolves an image reference (`registry/repository:tag`) to the digest its registry serves
    /// now, so the digest can be recorded and verified.
    pub async fn resolve_tag(&self, image: &str) -> Result<OciRef, Rejection> {
        self.registry.resolve(image).await
    }

    /// Resolves `image` to a digest and verifies it: the check for agent images where policy
    /// requires signed images.
    pub async fn verify_image(&self, image: &str, policy: &Policy) -> Result<Verified, Rejection> {
        let artifact = self.resolve_tag(image).await?;
        self.verify_oci(&artifact, policy).await
    }

    /// Verifies a blob signed with `cosign sign-blob`, cached by the blob's digest, the policy
    /// and the signature text.
    ///
    /// Unlike an OCI artifact, whose signatures the verifier fetches itself, a blob's signature
    /// comes from the caller (for a Capsule, a ConfigMap anyone with write access can edit), so
    /// the signature is part of the cache key: a replaced or tampered signature is checked
    /// afresh and rejected, even for content verified before.
    pub fn verify_blob(&self, blob: &Blob<'_>, policy: &Policy) -> Result<Verified, Rejection> {
        let digest = sha256_digest(blob.bytes);
        let key = digest_bytes(&digest).unwrap_or_default();
        let trust_key = blob_trust_key(policy, blob.signature);
        if blob.declared_digest.is_none_or(|d| d == digest)
            && let Some(hit) = self.cache.get(key, trust_key)
        {
            return Ok(hit);
        }
        // Keyless applies to OCI signatures only (sign-blob cannot attach a certificate offline).
        policy.require_checkable(false)?;
        let signer = blob_signer(blob, &digest, policy)?;
        let verified = Verified {
            digest,
            signer: format!("key:{signer}"),
            at: jiff::Timestamp::now(),
        };
        self.cache.insert(key, trust_key, verified.clone());
        Ok(verified)
    }

    /// The cached verification of `digest` under `policy`, if any.
    pub fn cached(&self, digest: &str, policy: &Policy) -> Option<Verified> {
        self.cache.get(digest_bytes(digest)?, policy.fingerprint())
    }

    /// How many verifications are cached.
    pub fn cached_len(&self) -> usize {
        self.cache.len()
    }

    /// Forgets every cached verification (for example when trust configuration is reloaded).
    pub fn forget_all(&self) {
        self.cache.clear();
    }
}

/// The second half of a blob's cache key: the policy's fingerprint bound to the exact signature.
fn blob_trust_key(policy: &Policy, signature: &str) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(policy.fingerprint());
    hasher.update(signature.trim().as_bytes());
    hasher.finalize().into()
}
