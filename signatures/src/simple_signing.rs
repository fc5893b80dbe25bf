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

use crate::{OciRef, Policy, Rejection};

/// The media type of a cosign simple-signing layer.
pub(crate) const SIMPLE_SIGNING_MEDIA_TYPE: &str =
    "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation holding the base64 signature.
pub(crate) const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

/// One layer of a `.sig` manifest: the payload bytes and the signature annotation, if present.
#[derive(Clone, Debug)]
pub(crate) struct SignatureLayer {
    pub(crate) payload: Vec<u8>,
    pub(crate) signature: Option<String>,
}

/// Returns the fingerprint of the key that signed `artifact`, or the most telling reason why no
/// layer is acceptable (a replayed signature beats a malformed one beats a wrong key).
pub(crate) fn accepted_signer(
    artifact: &OciRef,
    layers: &[SignatureLayer],
    policy: &Policy,
) -> Result<String, Rejection> {
    let mut best: Option<Rejection> = None;
    for layer in layers {
        let rejection = match check_layer(artifact, layer, policy) {
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
        Rejection::DigestMismatch { .. } => 3,
        Rejection::MalformedSignature { .. } => 2,
        _ => 1,
    }
}

fn check_layer(
    artifact: &OciRef,
    layer: &SignatureLayer,
    policy: &Policy,
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
    let signer =
        policy
            .signer_of(signature, &layer.payload)
            .ok_or_else(|| Rejection::WrongKey {
                reference: artifact.to_string(),
                count: 1,
                key: policy.describe_keys(),
            })?;
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
    Ok(signer.fingerprint().to_string())
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
