//! Checking cosign's signature layers against an artifact and a policy, without I/O.
//!
//! `cosign sign` stores, under the tag `sha256-<hex>.sig`, a manifest whose layers are
//! "simple signing" payloads (`{"critical":{"image":{"docker-manifest-digest":...}}}`) with the
//! base64 signature over the payload's exact bytes in the `dev.cosignproject.cosign/signature`
//! annotation. A layer is accepted when an accepted key verifies the signature over those bytes
//! **and** the payload names the requested digest: the second check is what rejects a signature
//! copied from another artifact's `.sig` tag (it is genuine, but for something else).

use sigstore::cosign::payload::SimpleSigning;
use sigstore::cosign::payload::simple_signing::CRITICAL_TYPE_NAME;

use crate::keyless::{CertificateProblem, TrustedRoots, certified_signer};
use crate::{OciRef, Policy, Rejection};

/// The media type of a cosign simple-signing layer.
pub(crate) const SIMPLE_SIGNING_MEDIA_TYPE: &str =
    "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation holding the base64 signature.
pub(crate) const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The layer annotation holding a keyless signature's certificate (PEM).
pub(crate) const CERTIFICATE_ANNOTATION: &str = "dev.sigstore.cosign/certificate";
/// The layer annotation holding that certificate's chain (PEM).
pub(crate) const CHAIN_ANNOTATION: &str = "dev.sigstore.cosign/chain";

/// One layer of a `.sig` manifest: the payload bytes and its annotations.
#[derive(Clone, Debug)]
pub(crate) struct SignatureLayer {
    pub(crate) payload: Vec<u8>,
    /// `dev.cosignproject.cosign/signature`.
    pub(crate) signature: Option<String>,
    /// `dev.sigstore.cosign/certificate` (keyless signatures).
    pub(crate) certificate: Option<String>,
    /// `dev.sigstore.cosign/chain` (keyless signatures).
    pub(crate) chain: Option<String>,
}

/// Everything a layer is checked against.
pub(crate) struct Trust<'a> {
    pub(crate) policy: &'a Policy,
    pub(crate) roots: &'a TrustedRoots,
    pub(crate) now: jiff::Timestamp,
}

/// Returns the signer of `artifact` (`key:sha256:<hex>` or `keyless:subject=...,issuer=...`),
/// or the most telling reason why no layer is acceptable (a replayed signature beats an
/// unaccepted identity beats an untrusted certificate beats a malformed one beats a wrong key).
pub(crate) fn accepted_signer(
    artifact: &OciRef,
    layers: &[SignatureLayer],
    trust: &Trust<'_>,
) -> Result<String, Rejection> {
    let mut best: Option<Rejection> = None;
    for layer in layers {
        let rejection = match check_layer(artifact, layer, trust) {
            Ok(signer) => return Ok(signer),
            Err(rejection) => rejection,
        };
        if best.as_ref().is_none_or(|b| rank(&rejection) > rank(b)) {
            best = Some(rejection);
        }
    }
    Err(best.unwrap_or_else(|| Rejection::MalformedSignature {
        reference: artifact.to_string(),
        reason: format!("the signature manifest has no {SIMPLE_SIGNING_MEDIA_TYPE} layer"),
    }))
}

fn rank(rejection: &Rejection) -> u8 {
    match rejection {
        Rejection::DigestMismatch { .. } => 5,
        Rejection::IdentityMismatch { .. } => 4,
        Rejection::UntrustedCertificate { .. } => 3,
        Rejection::MalformedSignature { .. } => 2,
        _ => 1,
    }
}

fn check_layer(
    artifact: &OciRef,
    layer: &SignatureLayer,
    trust: &Trust<'_>,
) -> Result<String, Rejection> {
    let malformed = |reason: String| Rejection::MalformedSignature {
        reference: artifact.to_string(),
        reason,
    };
    let signature = layer
        .signature
        .as_deref()
        .ok_or_else(|| malformed(format!("a layer has no {SIGNATURE_ANNOTATION} annotation")))?;
    if !is_base64(signature) {
        return Err(malformed(
            "the signature annotation is not base64".to_string(),
        ));
    }
    // Authenticate the bytes before reading them.
    let signer = authenticate(artifact, layer, signature, trust)?;
    let payload: SimpleSigning = serde_json::from_slice(&layer.payload).map_err(|e| {
        malformed(format!(
            "the signed payload is not cosign simple signing JSON: {e}"
        ))
    })?;
    if payload.critical.type_name != CRITICAL_TYPE_NAME {
        return Err(malformed(format!(
            "the signed payload's type is {:?}, not {CRITICAL_TYPE_NAME:?}",
            payload.critical.type_name
        )));
    }
    let signed = payload.critical.image.docker_manifest_digest;
    if signed != artifact.digest {
        return Err(Rejection::DigestMismatch {
            reference: artifact.to_string(),
            signed,
            requested: artifact.digest.clone(),
        });
    }
    Ok(signer)
}

/// Who made `signature` over the layer's payload: an accepted key, else an accepted keyless
/// identity whose certificate chains to a trusted root.
fn authenticate(
    artifact: &OciRef,
    layer: &SignatureLayer,
    signature: &str,
    trust: &Trust<'_>,
) -> Result<String, Rejection> {
    let policy = trust.policy;
    if let Some(key) = policy.signer_of(signature, &layer.payload) {
        return Ok(format!("key:{}", key.fingerprint()));
    }
    let wrong_key = || Rejection::WrongKey {
        reference: artifact.to_string(),
        count: 1,
        key: policy.describe_keys(),
    };
    let Some(certificate) = layer.certificate.as_deref() else {
        return Err(wrong_key());
    };
    if policy.keyless().is_empty() || trust.roots.is_empty() {
        return Err(wrong_key());
    }
    let certified = certified_signer(trust.roots, certificate, layer.chain.as_deref(), trust.now)
        .map_err(|p| match p {
        CertificateProblem::Malformed(reason) => Rejection::MalformedSignature {
            reference: artifact.to_string(),
            reason,
        },
        CertificateProblem::Untrusted(reason) => Rejection::UntrustedCertificate {
            reference: artifact.to_string(),
            reason,
        },
    })?;
    let id = &certified.identity;
    if !policy.keyless().contains(id) {
        return Err(Rejection::IdentityMismatch {
            reference: artifact.to_string(),
            issuer: id.issuer.clone(),
            subject: id.subject.clone(),
            accepted: policy.describe_keyless(),
        });
    }
    if !certified.verifies(signature, &layer.payload) {
        return Err(Rejection::WrongKey {
            reference: artifact.to_string(),
            count: 1,
            key: "the signing certificate's key".to_string(),
        });
    }
    Ok(format!(
        "keyless:subject={},issuer={}",
        id.subject, id.issuer
    ))
}

pub(crate) fn is_base64(s: &str) -> bool {
    let s = s.trim();
    !s.is_empty()
        && s.len().is_multiple_of(4)
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
}

/// Counts every layer in a rejection for a wrong key, so the message says how many were tried.
pub(crate) fn with_count(rejection: Rejection, layers: usize) -> Rejection {
    match rejection {
        Rejection::WrongKey { reference, key, .. } => Rejection::WrongKey {
            reference,
            count: layers,
            key,
        },
        other => other,
    }
}
