//! Keyless (certificate) signatures, verified offline against configured trusted roots.
//!
//! A keyless cosign signature carries, beside the signature, a short-lived code-signing
//! certificate (`dev.sigstore.cosign/certificate`) and its chain (`dev.sigstore.cosign/chain`).
//! It is accepted when the certificate chains to a configured root (standing in for Fulcio's,
//! since Fulcio is not reachable here), is valid now and for code signing, names an accepted
//! identity (OIDC issuer in the Fulcio extension, subject in the SAN) and its key verifies the
//! signature. There is no transparency-log (Rekor) or timestamp check: see `docs/signatures.md`.

use base64::Engine as _;
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use sigstore::cosign::signature_layers::CertificateSubject;
use sigstore::crypto::{CosignVerificationKey, Signature};
use x509_cert::Certificate;
use x509_cert::der::asn1::Utf8StringRef;
use x509_cert::der::{Decode as _, Encode as _};

use crate::policy::KeylessIdentity;

/// Fulcio's OIDC issuer extension, v2 (a DER UTF8String).
const OID_ISSUER_V2: &str = "1.3.6.1.4.1.57264.1.8";
/// Fulcio's OIDC issuer extension, v1 (the raw string).
const OID_ISSUER_V1: &str = "1.3.6.1.4.1.57264.1.1";
/// id-kp-codeSigning (1.3.6.1.5.5.7.3.3), as DER content octets.
const EKU_CODE_SIGNING: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x03];

/// The root certificates keyless signatures must chain to.
#[derive(Clone, Debug, Default)]
pub(crate) struct TrustedRoots {
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustedRoots {
    /// Parses PEM CA certificates (each string may hold several).
    pub(crate) fn from_pems(pems: &[String]) -> Result<Self, String> {
        let mut anchors = Vec::new();
        for pem in pems {
            let ders = pem_certificates(pem)?;
            if ders.is_empty() {
                return Err("a trusted root holds no CERTIFICATE block".to_string());
            }
            for der in ders {
                let der = CertificateDer::from(der);
                let anchor = webpki::anchor_from_trusted_cert(&der)
                    .map_err(|e| format!("a trusted root is not a usable CA certificate: {e:?}"))?;
                anchors.push(anchor.to_owned());
            }
        }
        Ok(TrustedRoots { anchors })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }
}

/// What a valid signing certificate says.
pub(crate) struct CertifiedSigner {
    pub(crate) key: CosignVerificationKey,
    pub(crate) identity: KeylessIdentity,
}

/// Why a certificate was not accepted.
pub(crate) enum CertificateProblem {
    /// It cannot be parsed.
    Malformed(String),
    /// It does not chain to a trusted root, is expired or not for code signing.
    Untrusted(String),
}

/// Checks the certificate and chain from a signature layer's annotations against the roots at
/// `now`, and returns its key and identity.
pub(crate) fn certified_signer(
    roots: &TrustedRoots,
    certificate_pem: &str,
    chain_pem: Option<&str>,
    now: jiff::Timestamp,
) -> Result<CertifiedSigner, CertificateProblem> {
    use CertificateProblem::{Malformed, Untrusted};
    let leaf_der = pem_certificates(certificate_pem)
        .map_err(Malformed)?
        .into_iter()
        .next()
        .ok_or_else(|| {
            Malformed("the certificate annotation holds no CERTIFICATE block".to_string())
        })?;
    let chain = match chain_pem {
        Some(pem) => pem_certificates(pem).map_err(Malformed)?,
        None => Vec::new(),
    };
    let intermediates: Vec<CertificateDer<'_>> =
        chain.into_iter().map(CertificateDer::from).collect();
    let leaf = CertificateDer::from(leaf_der.as_slice());
    let end_entity = webpki::EndEntityCert::try_from(&leaf)
        .map_err(|e| Malformed(format!("unreadable certificate: {e:?}")))?;
    let seconds = u64::try_from(now.as_second()).unwrap_or(0);
    end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &roots.anchors,
            &intermediates,
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(seconds)),
            webpki::KeyUsage::required(EKU_CODE_SIGNING),
            None,
            None,
        )
        .map_err(|e| Untrusted(format!("{e:?}")))?;

    let cert = Certificate::from_der(&leaf_der)
        .map_err(|e| Malformed(format!("unreadable certificate: {e}")))?;
    let spki = cert
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|e| Malformed(format!("unreadable certificate key: {e}")))?;
    let key = CosignVerificationKey::try_from_der(&spki)
        .map_err(|e| Malformed(format!("unsupported certificate key: {e}")))?;
    let subject = match CertificateSubject::from_certificate(&cert) {
        Ok(CertificateSubject::Email(s) | CertificateSubject::Uri(s)) => s,
        Err(e) => {
            return Err(Malformed(format!(
                "the certificate names no email or URI subject: {e}"
            )));
        }
    };
    let issuer = oidc_issuer(&cert).ok_or_else(|| {
        Malformed(format!(
            "the certificate has no OIDC issuer extension ({OID_ISSUER_V2} or {OID_ISSUER_V1})"
        ))
    })?;
    Ok(CertifiedSigner {
        key,
        identity: KeylessIdentity { issuer, subject },
    })
}

impl CertifiedSigner {
    pub(crate) fn verifies(&self, signature_b64: &str, message: &[u8]) -> bool {
        self.key
            .verify_signature(
                Signature::Base64Encoded(signature_b64.trim().as_bytes()),
                message,
            )
            .is_ok()
    }
}

fn oidc_issuer(cert: &Certificate) -> Option<String> {
    let extensions = cert.tbs_certificate().extensions()?;
    let find = |oid: &str| {
        extensions
            .iter()
            .find(|e| e.extn_id.to_string() == oid)
            .map(|e| e.extn_value.as_bytes())
    };
    if let Some(v2) = find(OID_ISSUER_V2) {
        return Utf8StringRef::from_der(v2)
            .ok()
            .map(|s| s.as_str().to_string());
    }
    find(OID_ISSUER_V1).and_then(|v1| String::from_utf8(v1.to_vec()).ok())
}

/// The DER bytes of every `CERTIFICATE` block in `pem`.
fn pem_certificates(pem: &str) -> Result<Vec<Vec<u8>>, String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let after = &rest[start + BEGIN.len()..];
        let end = after
            .find(END)
            .ok_or_else(|| format!("a certificate has no {END} line"))?;
        let body: String = after[..end]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|e| format!("a certificate's PEM body is not base64: {e}"))?;
        out.push(der);
        rest = &after[end + END.len()..];
    }
    Ok(out)
}
