//! Signature verification behind a trait, so the reconcile does not depend on how Cosign
//! verification is done (the `soma-signatures` crate provides it) and the scenario tests can
//! script it. Results are cached by (content digest, signer key fingerprint or keyless
//! identity, policy hash): a Capsule's content is immutable, so a verified digest stays
//! verified for the same signer.

use std::collections::HashMap;
use std::sync::Mutex;

use futures::future::BoxFuture;
use soma_crds::Capsule;

use super::content::sha256;

/// A verified signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The digest whose signature was verified.
    pub digest: String,
    /// Who signed: a key fingerprint or a keyless identity.
    pub signer: String,
}

/// Why a Capsule was not verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Condition reason (`SignatureInvalid`, `VerificationUnavailable`, …).
    pub reason: String,
    /// A message a user can act on.
    pub message: String,
    /// Whether retrying may help (a registry that did not answer); permanent rejections are
    /// cached and wait for a change.
    pub transient: bool,
    /// Whether the answer depends on what a registry holds, which can change while the
    /// Capsule does not (a signature pushed later, a `.sig` tag fixed): such a rejection is
    /// not cached and is looked up again after `OperatorConfig::capsule_recheck`.
    pub recheck: bool,
}

impl Rejection {
    /// A rejection that does not depend on what a registry holds (`recheck: false`).
    pub fn new(reason: &str, message: String, transient: bool) -> Rejection {
        Rejection {
            reason: reason.to_owned(),
            message,
            transient,
            recheck: false,
        }
    }
}

/// What is verified: the Capsule, the digest its content has, the PEM public key its
/// `signature.publicKeyRef` names (when it names one), and for content the operator reads
/// itself (a ConfigMap), the bytes and their detached signature.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The Capsule.
    pub capsule: &'a Capsule,
    /// `sha256:<hex>` of its content.
    pub digest: &'a str,
    /// The public key, PEM.
    pub key_pem: Option<&'a str>,
    /// Content held outside a registry, with its signature.
    pub blob: Option<BlobContent<'a>>,
}

/// A Capsule's content read from a ConfigMap, and the signature stored beside it.
#[derive(Clone, Copy, Debug)]
pub struct BlobContent<'a> {
    /// The content's bytes (already checked against the declared digest).
    pub bytes: &'a [u8],
    /// `cosign sign-blob`'s output: a base64 signature or a bundle (JSON).
    pub signature: &'a str,
}

/// Verifies a Capsule's signature.
pub trait CapsuleVerifier: Send + Sync {
    /// Verifies `request`'s signature for its digest.
    fn verify<'a>(&'a self, request: Request<'a>) -> BoxFuture<'a, Result<Verified, Rejection>>;
}

/// The verifier of a binary built without Cosign verification: it verifies nothing and says
/// so. Every Capsule requires a signature (the CRD insists), so every Capsule is
/// `Ready=False` with reason `VerificationUnavailable`: honest, never a pass.
#[derive(Clone, Copy, Debug, Default)]
pub struct Unavailable;

impl CapsuleVerifier for Unavailable {
    fn verify<'a>(&'a self, _request: Request<'a>) -> BoxFuture<'a, Result<Verified, Rejection>> {
        Box::pin(async {
            Err(Rejection {
                reason: "VerificationUnavailable".to_owned(),
                message: "this operator build cannot verify Cosign signatures yet, so the Capsule is not trusted and no Agent may use it".to_owned(),
                transient: false,
                recheck: false,
            })
        })
    }
}

/// A verifier whose every answer is counted in the operator's metrics
/// (`soma_signature_verifications_total{kind="capsule"}` and its duration): cached answers
/// never reach it, so the counts are real registry and signature checks.
pub struct Measured {
    inner: std::sync::Arc<dyn CapsuleVerifier>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl Measured {
    /// `inner`, measured into `metrics`.
    pub fn new(
        inner: std::sync::Arc<dyn CapsuleVerifier>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self { inner, metrics }
    }
}

impl CapsuleVerifier for Measured {
    fn verify<'a>(&'a self, request: Request<'a>) -> BoxFuture<'a, Result<Verified, Rejection>> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            let result = self.inner.verify(request).await;
            let (outcome, reason) = match &result {
                Ok(_) => (crate::metrics::Outcome::Verified, "Verified"),
                Err(r) if r.transient => (crate::metrics::Outcome::Error, r.reason.as_str()),
                Err(r) => (crate::metrics::Outcome::Rejected, r.reason.as_str()),
            };
            self.metrics.signature_verified(
                "capsule",
                outcome,
                reason,
                started.elapsed().as_secs_f64(),
            );
            result
        })
    }
}

/// Cache key: what a verification result depends on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// Content digest.
    pub digest: String,
    /// Fingerprint of the public key and the keyless identity accepted.
    pub signer: String,
    /// The Capsule's `policyHash`.
    pub policy_hash: String,
    /// SHA-256 of a detached blob signature (a corrected signature is checked afresh).
    pub signature: String,
}

impl CacheKey {
    /// The key for `request`.
    pub fn of(request: &Request<'_>) -> Self {
        let sig = &request.capsule.spec.signature;
        let key = request.key_pem.map(|k| sha256(k.trim().as_bytes()));
        let keyless = sig
            .keyless
            .as_ref()
            .map(|k| format!("{}|{}", k.issuer, k.subject));
        Self {
            digest: request.digest.to_owned(),
            signer: format!(
                "{}/{}",
                key.unwrap_or_default(),
                keyless.unwrap_or_default()
            ),
            policy_hash: request.capsule.spec.policy_hash.clone(),
            signature: request
                .blob
                .map(|b| sha256(b.signature.as_bytes()))
                .unwrap_or_default(),
        }
    }
}

/// Verification results that do not change: successes, and rejections that neither a retry
/// nor a change in a registry can turn around (a blob's signature, a key that is not a key).
#[derive(Debug, Default)]
pub struct Cache(Mutex<HashMap<CacheKey, Result<Verified, Rejection>>>);

impl Cache {
    /// The cached result, if any.
    pub fn get(&self, key: &CacheKey) -> Option<Result<Verified, Rejection>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// Remembers a result unless it may change on its own (transient, or registry state).
    pub fn put(&self, key: CacheKey, result: &Result<Verified, Rejection>) {
        if matches!(result, Err(r) if r.transient || r.recheck) {
            return;
        }
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, result.clone());
    }
}

/// Verifies through `cache`: a cached result is returned without calling `verifier`.
pub async fn verify_cached(
    verifier: &dyn CapsuleVerifier,
    cache: &Cache,
    request: Request<'_>,
) -> Result<Verified, Rejection> {
    let key = CacheKey::of(&request);
    if let Some(hit) = cache.get(&key) {
        return hit;
    }
    let result = verifier.verify(request).await;
    cache.put(key, &result);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(AtomicUsize, bool);

    impl CapsuleVerifier for Counting {
        fn verify<'a>(&'a self, r: Request<'a>) -> BoxFuture<'a, Result<Verified, Rejection>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let transient = self.1;
            let digest = r.digest.to_owned();
            Box::pin(async move {
                if transient {
                    Err(Rejection {
                        reason: "RegistryUnavailable".into(),
                        message: "later".into(),
                        transient: true,
                        recheck: false,
                    })
                } else {
                    Ok(Verified {
                        digest,
                        signer: "k".into(),
                    })
                }
            })
        }
    }

    fn capsule() -> Capsule {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "soma.dev/v1alpha1", "kind": "Capsule", "metadata": {"name": "kb"},
            "spec": {"version": "1", "policyHash": "sha256:00",
                     "source": {"oci": {"repository": "r", "digest": "sha256:aa"}},
                     "signature": {"publicKeyRef": {"name": "s", "key": "k"}}}
        }))
        .expect("capsule")
    }

    #[tokio::test]
    async fn results_are_cached_by_digest_key_and_policy_but_transient_ones_are_not() {
        let c = capsule();
        let cache = Cache::default();
        let v = Counting(AtomicUsize::new(0), false);
        let req = |digest, key| Request {
            capsule: &c,
            digest,
            key_pem: Some(key),
            blob: None,
        };
        for _ in 0..3 {
            verify_cached(&v, &cache, req("sha256:aa", "KEY1"))
                .await
                .expect("verified");
        }
        assert_eq!(v.0.load(Ordering::SeqCst), 1);
        verify_cached(&v, &cache, req("sha256:aa", "KEY2"))
            .await
            .expect("verified");
        verify_cached(&v, &cache, req("sha256:bb", "KEY1"))
            .await
            .expect("verified");
        assert_eq!(
            v.0.load(Ordering::SeqCst),
            3,
            "another key or digest is verified again"
        );

        let flaky = Counting(AtomicUsize::new(0), true);
        for _ in 0..2 {
            assert!(
                verify_cached(&flaky, &cache, req("sha256:cc", "KEY1"))
                    .await
                    .is_err()
            );
        }
        assert_eq!(flaky.0.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn rejections_a_registry_can_turn_around_are_not_cached() {
        struct Rejecting(AtomicUsize, bool);
        impl CapsuleVerifier for Rejecting {
            fn verify<'a>(&'a self, _: Request<'a>) -> BoxFuture<'a, Result<Verified, Rejection>> {
                self.0.fetch_add(1, Ordering::SeqCst);
                let recheck = self.1;
                Box::pin(async move {
                    Err(Rejection {
                        reason: "Unsigned".into(),
                        message: "no signature yet".into(),
                        transient: false,
                        recheck,
                    })
                })
            }
        }
        let c = capsule();
        let req = |digest| Request {
            capsule: &c,
            digest,
            key_pem: Some("KEY"),
            blob: None,
        };
        let cache = Cache::default();
        let registry = Rejecting(AtomicUsize::new(0), true);
        for _ in 0..2 {
            assert!(
                verify_cached(&registry, &cache, req("sha256:aa"))
                    .await
                    .is_err()
            );
        }
        assert_eq!(
            registry.0.load(Ordering::SeqCst),
            2,
            "asked again each time"
        );
        let fixed = Rejecting(AtomicUsize::new(0), false);
        for _ in 0..2 {
            assert!(
                verify_cached(&fixed, &cache, req("sha256:bb"))
                    .await
                    .is_err()
            );
        }
        assert_eq!(
            fixed.0.load(Ordering::SeqCst),
            1,
            "a settled rejection is cached"
        );
    }

    #[tokio::test]
    async fn unavailable_never_passes() {
        let c = capsule();
        let r = Unavailable
            .verify(Request {
                capsule: &c,
                digest: "sha256:aa",
                key_pem: None,
                blob: None,
            })
            .await
            .expect_err("never verified");
        assert_eq!(
            (r.reason.as_str(), r.transient),
            ("VerificationUnavailable", false)
        );
    }
}
