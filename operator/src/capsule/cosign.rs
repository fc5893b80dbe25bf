//! The [`CapsuleVerifier`] the operator runs: Cosign signatures checked by `soma-signatures`.
//!
//! - `spec.source.oci`: the artifact's `sha256-<hex>.sig` signatures in its registry must
//!   name its digest and verify with the `publicKeyRef` key, or (keyless) carry a certificate
//!   from a configured root for the `keyless` identity.
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
}

impl Cosign {
    /// A verifier reaching `insecure_registries` (`host:port`) over plain HTTP and trusting
    /// `keyless_roots` (PEM CA certificates) for keyless signatures.
    pub fn new(trust: TrustConfig) -> Result<Self, soma_signatures::Rejection> {
        Ok(Self {
            verifier: Verifier::new(trust)?,
        })
    }
}

fn rejected(e: &soma_signatures::Rejection) -> Rejection {
    Rejection {
        reason: e.reason().to_owned(),
        message: e.to_string(),
        transient: e.is_transient(),
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
            let outcome = if let Some(oci) = &source.oci {
                let reference = OciRef::from_repository(&oci.repository, &oci.digest)
                    .map_err(|e| rejected(&e))?;
                self.verifier.verify_oci(&reference, &policy).await
            } else if let Some(blob) = request.blob {
                self.verifier.verify_blob(
                    &Blob {
                        bytes: blob.bytes,
                        declared_digest: Some(request.digest),
                        signature: blob.signature,
                    },
                    &policy,
                )
            } else {
                return Err(Rejection {
                    reason: "InlineNotSignable".to_owned(),
                    message: "inline blocks cannot carry a Cosign signature, so they are never trusted; publish the content as an OCI artifact signed with `cosign sign`, or in a ConfigMap with `cosign sign-blob`'s signature under `<key>.sig`".to_owned(),
                    transient: false,
                });
            };
            outcome
                .map(|v| Verified {
                    digest: v.digest,
                    signer: v.signer,
                })
                .map_err(|e| rejected(&e))
        })
    }
}
