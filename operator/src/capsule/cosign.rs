//! The [`CapsuleVerifier`] the operator runs: Cosign signatures checked by `soma-signatures`.
//!
//! - `spec.source.oci`: the artifact's `sha256-<hex>.sig` signatures in its registry must
//!   name its digest and verify with the `publicKeyRef` key, or (keyless) carry a certificate
//!   from a configured root for the `keyless` identity. The signature covers the manifest, so
//!   the bundle's `dev.soma.capsule.policy-hash` and `dev.soma.capsule.version` annotations are
//!   signed with the content: they must equal the Capsule's `policyHash` and `version`
//!   (`PolicyHashMismatch`, `VersionMismatch`), and the artifact must be a Capsule bundle
//!   (`NotACapsuleBundle`; docs/capsules.md).
//! - `spec.source.configMapRef`: the content's bytes (already checked against the declared
//!   digest) must carry `cosign sign-blob`'s signature for the key, stored in the same
//!   ConfigMap under `<key>.sig`.
//! - `spec.source.inline`: blocks written into the Capsule itself cannot carry a Cosign
//!   signature, so they are never verified (the CRD requires a signature of every Capsule).

use futures::future::BoxFuture;
use soma_signatures::{Blob, KeylessIdentity, OciRef, Policy, PublicKey, TrustConfig, Verifier};

use super::verify::{CapsuleVerifier, Rejection, Request, Verified};

/// Cosign verification through one shared [`Verifier`] (its cache spans every Capsule).
pub struct Cosign {
    verifier: Verifier,
    bundles: soma_capsule::Registry,
}

impl Cosign {
    /// A verifier reaching `insecure_registries` (`host:port`) over plain HTTP and trusting
    /// `keyless_roots` (PEM CA certificates) for keyless signatures.
    pub fn new(trust: TrustConfig) -> Result<Self, soma_signatures::Rejection> {
        let bundles = soma_capsule::Registry::new(trust.insecure_registries.clone());
        Ok(Self {
            verifier: Verifier::new(trust)?,
            bundles,
        })
    }
}

fn rejected(e: &soma_signatures::Rejection) -> Rejection {
    Rejection {
        reason: e.reason().to_owned(),
        message: e.to_string(),
        transient: e.is_transient(),
        recheck: false,
    }
}

/// A rejection of an OCI artifact: when it is about what the registry holds (no signature,
/// none by the key, one for another digest, the artifact missing, …), the registry may hold
/// something else later without the Capsule changing, so it is looked up again.
fn rejected_by_registry(e: &soma_signatures::Rejection) -> Rejection {
    use soma_signatures::Rejection as R;
    let recheck = !e.is_transient()
        && matches!(
            e,
            R::ArtifactNotFound { .. }
                | R::Unsigned { .. }
                | R::WrongKey { .. }
                | R::DigestMismatch { .. }
                | R::MalformedSignature { .. }
                | R::UntrustedCertificate { .. }
                | R::IdentityMismatch { .. }
                | R::RegistryUnreachable { .. }
        );
    Rejection {
        recheck,
        ..rejected(e)
    }
}

/// A verified artifact whose manifest cannot be read as a Capsule bundle.
fn bundle_rejected(e: &soma_capsule::Error) -> Rejection {
    match e {
        soma_capsule::Error::Registry { transient, .. } => Rejection {
            reason: "RegistryUnreachable".to_owned(),
            message: e.to_string(),
            transient: *transient,
            recheck: !*transient,
        },
        _ => Rejection {
            reason: "NotACapsuleBundle".to_owned(),
            message: format!(
                "{e}; a Capsule's artifact must be a bundle made by `soma capsule pack` (docs/capsules.md)"
            ),
            transient: false,
            recheck: false,
        },
    }
}

/// The bundle's signed `policyHash` and version must be the Capsule's: otherwise the
/// Capsule claims a review its signed content does not.
pub fn signed_labels(
    manifest: &soma_capsule::format::OciManifest,
    spec: &soma_crds::capsule::CapsuleSpec,
) -> Result<(), Rejection> {
    use soma_capsule::format::{POLICY_HASH_ANNOTATION, VERSION_ANNOTATION};
    for (annotation, expected, field, reason) in [
        (
            POLICY_HASH_ANNOTATION,
            &spec.policy_hash,
            "policyHash",
            "PolicyHashMismatch",
        ),
        (
            VERSION_ANNOTATION,
            &spec.version,
            "version",
            "VersionMismatch",
        ),
    ] {
        let signed = manifest.annotations.get(annotation);
        if signed != Some(expected) {
            return Err(Rejection {
                reason: reason.to_owned(),
                message: format!(
                    "the signed bundle's {field} is {} but the Capsule says {expected:?}; publish a Capsule whose {field} is the one its content was signed with",
                    signed.map_or_else(|| "absent".to_owned(), |s| format!("{s:?}"))
                ),
                transient: false,
                recheck: false,
            });
        }
    }
    Ok(())
}

fn verified(v: soma_signatures::Verified) -> Verified {
    Verified {
        digest: v.digest,
        signer: v.signer,
    }
}

/// The signature policy a Capsule asks for: its key and/or keyless identity.
fn policy(request: &Request<'_>) -> Result<Policy, Rejection> {
    let keys = match request.key_pem {
        Some(pem) => vec![PublicKey::from_pem(pem).map_err(|e| rejected(&e))?],
        None => Vec::new(),
    };
    let keyless = request
        .capsule
        .spec
        .signature
        .keyless
        .iter()
        .map(|k| KeylessIdentity {
            issuer: k.issuer.clone(),
            subject: k.subject.clone(),
        })
        .collect();
    Ok(Policy::new(keys, keyless))
}

impl CapsuleVerifier for Cosign {
    fn verify<'a>(&'a self, request: Request<'a>) -> BoxFuture<'a, Result<Verified, Rejection>> {
        Box::pin(async move {
            let policy = policy(&request)?;
            let source = &request.capsule.spec.source;
            if let Some(oci) = &source.oci {
                let reference = OciRef::from_repository(&oci.repository, &oci.digest)
                    .map_err(|e| rejected(&e))?;
                let v = self
                    .verifier
                    .verify_oci(&reference, &policy)
                    .await
                    .map(verified)
                    .map_err(|e| rejected_by_registry(&e))?;
                let manifest = self
                    .bundles
                    .manifest(&oci.repository, &oci.digest)
                    .await
                    .map_err(|e| bundle_rejected(&e))?;
                signed_labels(&manifest, &request.capsule.spec)?;
                return Ok(v);
            }
            let Some(blob) = request.blob else {
                return Err(Rejection {
                    reason: "InlineNotSignable".to_owned(),
                    message: "inline blocks cannot carry a Cosign signature, so they are never trusted; publish the content as an OCI artifact signed with `cosign sign`, or in a ConfigMap with `cosign sign-blob`'s signature under `<key>.sig`".to_owned(),
                    transient: false,
                    recheck: false,
                });
            };
            self.verifier
                .verify_blob(
                    &Blob {
                        bytes: blob.bytes,
                        declared_digest: Some(request.digest),
                        signature: blob.signature,
                    },
                    &policy,
                )
                .map(verified)
                .map_err(|e| rejected(&e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use soma_signatures::Rejection as R;

    #[test]
    fn rejections_for_what_the_registry_holds_are_rechecked_others_not() {
        let unsigned = R::Unsigned {
            reference: "r@sha256:aa".into(),
            signature_tag: "sha256-aa.sig".into(),
        };
        let replayed = R::DigestMismatch {
            reference: "r@sha256:aa".into(),
            signed: "sha256:bb".into(),
            requested: "sha256:aa".into(),
        };
        for e in [&unsigned, &replayed] {
            let r = rejected_by_registry(e);
            assert!(r.recheck && !r.transient, "{r:?}");
            assert_eq!(r.reason, e.reason());
        }
        let down = R::RegistryUnreachable {
            registry: "r".into(),
            transient: true,
            detail: "refused".into(),
        };
        let r = rejected_by_registry(&down);
        assert!(
            r.transient && !r.recheck,
            "retried with backoff instead: {r:?}"
        );
        let bad = R::InvalidReference {
            reference: "r".into(),
            reason: "no digest".into(),
        };
        assert!(
            !rejected_by_registry(&bad).recheck,
            "only a change to the Capsule helps"
        );
        // A blob's signature lives in a watched ConfigMap: never rechecked on a timer.
        assert!(!rejected(&replayed).recheck);
    }

    #[test]
    fn the_signed_policy_hash_and_version_must_be_the_capsules() {
        let dir = std::env::temp_dir().join(format!("soma-signed-labels-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("a.md"), "refunds: 30 days").expect("doc");
        let ph = format!("sha256:{}", "9b".repeat(32));
        let bundle = soma_capsule::pack(
            &dir,
            &soma_capsule::PackOptions {
                version: "1".into(),
                policy_hash: ph.clone(),
                max_bytes: 1500,
                embeddings: None,
            },
        )
        .expect("pack");
        let _ = std::fs::remove_dir_all(&dir);
        let manifest: soma_capsule::format::OciManifest =
            serde_json::from_slice(&bundle.manifest).expect("manifest");
        let spec = |version: &str, policy_hash: &str| -> soma_crds::capsule::CapsuleSpec {
            serde_json::from_value(serde_json::json!({
                "version": version, "policyHash": policy_hash,
                "source": {"oci": {"repository": "r/kb", "digest": bundle.digest}},
                "signature": {"publicKeyRef": {"name": "s", "key": "k"}}
            }))
            .expect("spec")
        };
        assert_eq!(signed_labels(&manifest, &spec("1", &ph)), Ok(()));
        let other = format!("sha256:{}", "aa".repeat(32));
        let r = signed_labels(&manifest, &spec("1", &other)).expect_err("policy");
        assert_eq!(r.reason, "PolicyHashMismatch");
        assert!(
            r.message.contains(&ph) && r.message.contains(&other),
            "{}",
            r.message
        );
        assert!(!r.transient && !r.recheck);
        let r = signed_labels(&manifest, &spec("2", &ph)).expect_err("version");
        assert_eq!(r.reason, "VersionMismatch");
    }
}
