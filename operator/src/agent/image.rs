//! Agent image signatures, when the operator requires signed images
//! (`--require-signed-images`).
//!
//! ```text
//!  spec.image ─▶ cache (image, recheck interval) ─miss─▶ ImageVerifier: tag → digest → cosign
//!                      │ hit                                     │
//!                      ▼                                         ▼
//!        status.image {reference, digest, signer, verifiedAt} + container image repo@digest
//! ```
//!
//! The verification sits behind [`ImageVerifier`] so the reconcile does not depend on how it
//! is done and the scenario tests can script it; [`CosignImages`] is the real one
//! (`soma-signatures`). A verified image is remembered for [`ImageSignatures::recheck`]
//! (10 minutes by default): within it, reconciles neither resolve the tag nor verify again;
//! after it, the tag is resolved again (one manifest request) and the signature check of an
//! unchanged digest is answered by `soma-signatures`' own cache (by digest and policy
//! fingerprint). The keys and identities are fixed for the process's life, so a change of
//! policy is a restart, which starts with empty caches.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use futures::future::BoxFuture;
use soma_crds::agent::AgentImageStatus;
use soma_signatures::{KeylessIdentity, Policy, PublicKey, TrustConfig, Verifier};

use crate::config::ImageSignatures;

/// Condition reason of an Agent whose image is not verified.
pub const IMAGE_NOT_VERIFIED: &str = "ImageNotVerified";

/// A verified image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedImage {
    /// The digest the reference resolved to, `sha256:<hex>`.
    pub digest: String,
    /// Who signed (key fingerprint or keyless identity).
    pub signer: String,
    /// When the digest's signature was first verified, RFC 3339.
    pub verified_at: String,
}

/// Why an image was not verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRejection {
    /// `soma-signatures`' reason (`Unsigned`, `WrongKey`, `RegistryUnreachable`, …).
    pub reason: String,
    /// A message a user can act on.
    pub message: String,
    /// Whether retrying may help (a registry that did not answer).
    pub transient: bool,
}

/// Resolves an image reference to its digest and verifies the digest's signature.
pub trait ImageVerifier: Send + Sync {
    /// Verifies `image` (`registry/repository:tag` or `…@sha256:…`).
    fn verify<'a>(&'a self, image: &'a str)
    -> BoxFuture<'a, Result<VerifiedImage, ImageRejection>>;
}

/// The verifier of an operator not configured to verify images: it rejects every image, so
/// an operator told to require signatures without a way to check them fails closed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Unconfigured;

impl ImageVerifier for Unconfigured {
    fn verify<'a>(
        &'a self,
        _image: &'a str,
    ) -> BoxFuture<'a, Result<VerifiedImage, ImageRejection>> {
        Box::pin(async {
            Err(ImageRejection {
                reason: "VerificationUnavailable".to_owned(),
                message: "this operator requires signed agent images but has no image verifier configured".to_owned(),
                transient: false,
            })
        })
    }
}

/// The accepted public keys of `images`, after checking that the configuration can verify
/// anything: at least one key or identity, every key a public key, and keyless roots for
/// keyless identities. `main` calls it before connecting, so a bad flag stops start-up first.
pub fn accepted_keys(
    trust: &TrustConfig,
    images: &ImageSignatures,
) -> Result<Vec<PublicKey>, String> {
    if images.keys.is_empty() && images.keyless.is_empty() {
        return Err(
            "--require-signed-images needs --image-signature-keys or --image-keyless-identity"
                .to_owned(),
        );
    }
    if !images.keyless.is_empty() && trust.keyless_roots.is_empty() {
        return Err(
            "--image-keyless-identity needs --keyless-roots (the CA certificates that keyless signing certificates chain to)"
                .to_owned(),
        );
    }
    images
        .keys
        .iter()
        .map(|pem| PublicKey::from_pem(pem).map_err(|e| format!("image signature key: {e}")))
        .collect()
}

/// Cosign verification of agent images through `soma-signatures`.
pub struct CosignImages {
    verifier: Verifier,
    policy: Policy,
}

impl CosignImages {
    /// A verifier reaching registries as `trust` says, accepting the keys and keyless
    /// identities of `images`. Fails (for start-up to report) on an unreadable key, a
    /// keyless identity without a keyless root, or no accepted signer at all.
    pub fn new(trust: TrustConfig, images: &ImageSignatures) -> Result<Self, String> {
        let keys = accepted_keys(&trust, images)?;
        let keyless = images
            .keyless
            .iter()
            .map(|(issuer, subject)| KeylessIdentity {
                issuer: issuer.clone(),
                subject: subject.clone(),
            })
            .collect();
        let verifier = Verifier::new(trust).map_err(|e| e.to_string())?;
        Ok(Self {
            verifier,
            policy: Policy::new(keys, keyless),
        })
    }
}

impl ImageVerifier for CosignImages {
    fn verify<'a>(
        &'a self,
        image: &'a str,
    ) -> BoxFuture<'a, Result<VerifiedImage, ImageRejection>> {
        Box::pin(async move {
            self.verifier
                .verify_image(image, &self.policy)
                .await
                .map(|v| VerifiedImage {
                    digest: v.digest,
                    signer: v.signer,
                    verified_at: v.at.to_string(),
                })
                .map_err(|e| ImageRejection {
                    reason: e.reason().to_owned(),
                    message: format!(
                        "image {image} is not verified ({}): {e}. The agent's pods are not started or changed until it is; sign it with `cosign sign` by an accepted key or identity, or correct spec.image",
                        e.reason()
                    ),
                    transient: e.is_transient(),
                })
        })
    }
}

/// An image verifier whose every answer is counted in the operator's metrics
/// (`soma_signature_verifications_total{kind="image"}` and its duration); answers from the
/// [`ImageCache`] never reach it.
pub struct Measured {
    inner: std::sync::Arc<dyn ImageVerifier>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl Measured {
    /// `inner`, measured into `metrics`.
    pub fn new(
        inner: std::sync::Arc<dyn ImageVerifier>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self { inner, metrics }
    }
}

impl ImageVerifier for Measured {
    fn verify<'a>(
        &'a self,
        image: &'a str,
    ) -> BoxFuture<'a, Result<VerifiedImage, ImageRejection>> {
        Box::pin(async move {
            let started = Instant::now();
            let result = self.inner.verify(image).await;
            let (outcome, reason) = match &result {
                Ok(_) => (crate::metrics::Outcome::Verified, "Verified"),
                Err(r) if r.transient => (crate::metrics::Outcome::Error, r.reason.as_str()),
                Err(r) => (crate::metrics::Outcome::Rejected, r.reason.as_str()),
            };
            self.metrics.signature_verified(
                "image",
                outcome,
                reason,
                started.elapsed().as_secs_f64(),
            );
            result
        })
    }
}

/// Verified images by reference, with when they were verified; rejections are not cached
/// (a rejected image is retried on the next change, or with backoff when transient).
#[derive(Debug, Default)]
pub struct ImageCache(Mutex<HashMap<String, (VerifiedImage, Instant)>>);

impl ImageCache {
    /// The verified image for `image`, if verified less than `max_age` ago.
    pub fn get(&self, image: &str, max_age: std::time::Duration) -> Option<VerifiedImage> {
        let map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(image)
            .filter(|(_, at)| at.elapsed() < max_age)
            .map(|(v, _)| v.clone())
    }

    /// Remembers that `image` verified now, forgetting entries older than `max_age` (so
    /// images no Agent uses any more do not pile up).
    pub fn put(&self, image: &str, verified: VerifiedImage, max_age: std::time::Duration) {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.retain(|_, (_, at)| at.elapsed() < max_age);
        map.insert(image.to_owned(), (verified, Instant::now()));
    }

    /// How many images are remembered.
    pub fn len(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether no image is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Verifies `image` through `cache`.
pub async fn verify_cached(
    verifier: &dyn ImageVerifier,
    cache: &ImageCache,
    image: &str,
    recheck: std::time::Duration,
) -> Result<VerifiedImage, ImageRejection> {
    if let Some(hit) = cache.get(image, recheck) {
        return Ok(hit);
    }
    let verified = verifier.verify(image).await?;
    cache.put(image, verified.clone(), recheck);
    Ok(verified)
}

/// `image` pinned to `digest`: `registry/repo:tag` and `registry/repo@sha256:…` become
/// `registry/repo@<digest>` (a port in the registry host is not mistaken for a tag).
pub fn pin(image: &str, digest: &str) -> String {
    let name = image.split_once('@').map_or(image, |(name, _)| name);
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let repository = match name[last_slash..].rfind(':') {
        Some(colon) => &name[..last_slash + colon],
        None => name,
    };
    format!("{repository}@{digest}")
}

/// The `status.image` to record: the old one when it describes the same verification (so
/// a recheck of an unchanged image writes nothing), else the new one.
pub fn image_status(
    old: Option<&AgentImageStatus>,
    reference: &str,
    verified: &VerifiedImage,
) -> AgentImageStatus {
    match old {
        Some(old)
            if old.reference == reference
                && old.digest == verified.digest
                && old.signer == verified.signer =>
        {
            old.clone()
        }
        _ => AgentImageStatus {
            reference: reference.to_owned(),
            digest: verified.digest.clone(),
            signer: verified.signer.clone(),
            verified_at: verified.verified_at.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    const D: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn pinning_replaces_tag_or_digest_and_keeps_registry_ports() {
        for (image, want) in [
            (
                "reg.example/team/agent:1.0",
                format!("reg.example/team/agent@{D}"),
            ),
            (
                "127.0.0.1:5000/agent:v2",
                format!("127.0.0.1:5000/agent@{D}"),
            ),
            ("127.0.0.1:5000/agent", format!("127.0.0.1:5000/agent@{D}")),
            ("agent", format!("agent@{D}")),
            ("reg/agent:1@sha256:abcd", format!("reg/agent@{D}")),
            ("reg/agent@sha256:abcd", format!("reg/agent@{D}")),
        ] {
            assert_eq!(pin(image, D), want, "{image}");
        }
    }

    fn verified(digest: &str, at: &str) -> VerifiedImage {
        VerifiedImage {
            digest: digest.into(),
            signer: "key:sha256:aa".into(),
            verified_at: at.into(),
        }
    }

    #[test]
    fn status_keeps_its_time_while_the_verification_is_the_same() {
        let first = image_status(None, "r:1", &verified(D, "2026-01-01T00:00:00Z"));
        assert_eq!(first.verified_at, "2026-01-01T00:00:00Z");
        assert_eq!(first.digest, D);
        let again = image_status(Some(&first), "r:1", &verified(D, "2026-01-02T00:00:00Z"));
        assert_eq!(again, first, "a recheck of the same digest changes nothing");
        let moved = image_status(
            Some(&first),
            "r:1",
            &verified("sha256:22", "2026-01-03T00:00:00Z"),
        );
        assert_eq!(
            (moved.digest.as_str(), moved.verified_at.as_str()),
            ("sha256:22", "2026-01-03T00:00:00Z")
        );
        let other = image_status(Some(&first), "r:2", &verified(D, "2026-01-04T00:00:00Z"));
        assert_eq!(other.reference, "r:2");
        assert_eq!(other.verified_at, "2026-01-04T00:00:00Z");
    }

    struct Counting(AtomicUsize, Option<ImageRejection>);

    impl ImageVerifier for Counting {
        fn verify<'a>(
            &'a self,
            _image: &'a str,
        ) -> BoxFuture<'a, Result<VerifiedImage, ImageRejection>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let out = self.1.clone();
            Box::pin(async move {
                match out {
                    Some(r) => Err(r),
                    None => Ok(verified(D, "t")),
                }
            })
        }
    }

    #[tokio::test]
    async fn verified_images_are_cached_until_the_recheck_interval_and_rejections_never() {
        let ok = Counting(AtomicUsize::new(0), None);
        let cache = ImageCache::default();
        let long = Duration::from_secs(3600);
        for _ in 0..3 {
            verify_cached(&ok, &cache, "r:1", long)
                .await
                .expect("verified");
        }
        assert_eq!(ok.0.load(Ordering::SeqCst), 1, "verified once");
        verify_cached(&ok, &cache, "r:2", long)
            .await
            .expect("verified");
        assert_eq!(ok.0.load(Ordering::SeqCst), 2, "another image is verified");
        verify_cached(&ok, &cache, "r:1", Duration::ZERO)
            .await
            .expect("verified");
        assert_eq!(
            ok.0.load(Ordering::SeqCst),
            3,
            "rechecked after the interval"
        );

        let rejection = ImageRejection {
            reason: "Unsigned".into(),
            message: "no".into(),
            transient: false,
        };
        let bad = Counting(AtomicUsize::new(0), Some(rejection.clone()));
        for _ in 0..2 {
            assert_eq!(
                verify_cached(&bad, &cache, "r:3", long).await,
                Err(rejection.clone())
            );
        }
        assert_eq!(bad.0.load(Ordering::SeqCst), 2, "rejections are not cached");
    }

    #[test]
    fn cosign_images_refuses_a_policy_that_accepts_nobody_or_a_bad_key() {
        let none = ImageSignatures {
            required: true,
            ..ImageSignatures::default()
        };
        let err = CosignImages::new(TrustConfig::default(), &none)
            .err()
            .expect("refused");
        assert!(err.contains("--image-signature-keys"), "{err}");
        let bad = ImageSignatures {
            keys: vec!["not a key".into()],
            ..none.clone()
        };
        let err = CosignImages::new(TrustConfig::default(), &bad)
            .err()
            .expect("refused");
        assert!(err.contains("image signature key"), "{err}");
        let keyless = ImageSignatures {
            keyless: vec![("https://issuer".into(), "me@example.com".into())],
            ..none
        };
        let err = CosignImages::new(TrustConfig::default(), &keyless)
            .err()
            .expect("refused");
        assert!(err.contains("--keyless-roots"), "{err}");
    }
}
