//! Blobs signed with `cosign sign-blob`: the signature is over the blob's bytes, given either as
//! the base64 text of `--output-signature` or as the JSON of `--bundle` (the legacy
//! `{"base64Signature": ...}` form or the Sigstore bundle's `messageSignature`).

use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::simple_signing::is_base64;
use crate::{Policy, Rejection};

/// A blob to verify, with its detached signature.
#[derive(Clone, Copy, Debug)]
pub struct Blob<'a> {
    /// The blob's bytes.
    pub bytes: &'a [u8],
    /// The digest the blob is declared to have (for example a Capsule's
    /// `spec.source.configMapRef.digest`); when given, the bytes must match it.
    pub declared_digest: Option<&'a str>,
    /// The signature: base64, or a cosign bundle's JSON.
    pub signature: &'a str,
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LegacyBundle {
    base64_signature: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SigstoreBundle {
    message_signature: MessageSignature,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageSignature {
    signature: String,
    message_digest: Option<MessageDigest>,
}

#[derive(Deserialize)]
struct MessageDigest {
    algorithm: String,
    digest: String,
}

/// Returns the signer's fingerprint when an accepted key signed `blob`.
pub(crate) fn blob_signer(
    blob: &Blob<'_>,
    digest: &str,
    policy: &Policy,
) -> Result<String, Rejection> {
    let reference = format!("blob {digest}");
    let malformed = |reason: String| Rejection::MalformedSignature {
        reference: reference.clone(),
        reason,
    };
    if let Some(declared) = blob.declared_digest
        && declared != digest
    {
        return Err(Rejection::DigestMismatch {
            reference: reference.clone(),
            signed: digest.to_string(),
            requested: declared.to_string(),
        });
    }
    let signature = signature_text(blob.signature, digest).map_err(|reason| match reason {
        BundleProblem::Malformed(reason) => malformed(reason),
        BundleProblem::OtherDigest(signed) => Rejection::DigestMismatch {
            reference: reference.clone(),
            signed,
            requested: digest.to_string(),
        },
    })?;
    if !is_base64(&signature) {
        return Err(malformed("the signature is not base64".to_string()));
    }
    policy
        .signer_of(&signature, blob.bytes)
        .map(|key| key.fingerprint().to_string())
        .ok_or_else(|| Rejection::WrongKey {
            reference,
            count: 1,
            key: policy.describe_keys(),
        })
}

enum BundleProblem {
    Malformed(String),
    OtherDigest(String),
}

/// The base64 signature inside whatever form it was given in.
fn signature_text(given: &str, digest: &str) -> Result<String, BundleProblem> {
    let given = given.trim();
    if !given.starts_with('{') {
        return Ok(given.to_string());
    }
    if let Ok(legacy) = serde_json::from_str::<LegacyBundle>(given) {
        return Ok(legacy.base64_signature);
    }
    let bundle: SigstoreBundle = serde_json::from_str(given).map_err(|e| {
        BundleProblem::Malformed(format!(
            "the bundle has neither base64Signature nor messageSignature: {e}"
        ))
    })?;
    if let Some(md) = bundle.message_signature.message_digest {
        if md.algorithm != "SHA2_256" {
            return Err(BundleProblem::Malformed(format!(
                "unsupported bundle digest algorithm {}",
                md.algorithm
            )));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(md.digest.trim())
            .map_err(|e| {
                BundleProblem::Malformed(format!("the bundle's messageDigest is not base64: {e}"))
            })?;
        let signed = format!("sha256:{}", hex::encode(bytes));
        if signed != digest {
            return Err(BundleProblem::OtherDigest(signed));
        }
    }
    Ok(bundle.message_signature.signature)
}
