//! Who must have signed: the accepted public keys and keyless identities, and the policy's
//! fingerprint that keys the verification cache (so a change of keys or policy means a fresh
//! verification).

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use sigstore::crypto::{CosignVerificationKey, Signature};

use crate::Rejection;

/// A keyless signer identity: the Fulcio certificate's OIDC issuer and subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeylessIdentity {
    /// OIDC issuer, for example `https://token.actions.githubusercontent.com`.
    pub issuer: String,
    /// Certificate subject (an email or a workflow URI).
    pub subject: String,
}

/// One accepted Cosign public key.
#[derive(Clone, Debug)]
pub struct PublicKey {
    key: CosignVerificationKey,
    /// `sha256:<hex>` of the key's DER SubjectPublicKeyInfo.
    fingerprint: String,
}

impl PublicKey {
    /// Reads a PEM public key as written by `cosign generate-key-pair` (`cosign.pub`).
    pub fn from_pem(pem: &str) -> Result<Self, Rejection> {
        let der = pem_body(pem)?;
        let key = CosignVerificationKey::try_from_der(&der)
            .map_err(|e| Rejection::InvalidPublicKey(e.to_string()))?;
        let fingerprint = format!("sha256:{}", hex::encode(Sha256::digest(&der)));
        Ok(PublicKey { key, fingerprint })
    }

    /// `sha256:<hex>` of the DER SubjectPublicKeyInfo, the same as
    /// `openssl pkey -pubin -in cosign.pub -outform DER | sha256sum`.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Checks a base64 signature over `message`.
    pub(crate) fn verifies(&self, signature_b64: &str, message: &[u8]) -> bool {
        self.key
            .verify_signature(
                Signature::Base64Encoded(signature_b64.trim().as_bytes()),
                message,
            )
            .is_ok()
    }
}

/// The DER bytes inside a single `PUBLIC KEY` PEM block.
fn pem_body(pem: &str) -> Result<Vec<u8>, Rejection> {
    const BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
    const END: &str = "-----END PUBLIC KEY-----";
    let start = pem
        .find(BEGIN)
        .ok_or_else(|| Rejection::InvalidPublicKey(format!("no {BEGIN} line")))?;
    let rest = &pem[start + BEGIN.len()..];
    let end = rest
        .find(END)
        .ok_or_else(|| Rejection::InvalidPublicKey(format!("no {END} line")))?;
    let body: String = rest[..end].chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| Rejection::InvalidPublicKey(format!("the PEM body is not base64: {e}")))
}

/// Accepted signers: any listed key, or any keyless identity (either suffices).
#[derive(Clone, Debug)]
pub struct Policy {
    keys: Vec<PublicKey>,
    keyless: Vec<KeylessIdentity>,
    fingerprint: [u8; 32],
}

impl Policy {
    /// A policy accepting signatures made by any of `keys` or, once supported, by any of the
    /// `keyless` identities.
    pub fn new(keys: Vec<PublicKey>, keyless: Vec<KeylessIdentity>) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"soma-signatures/policy/v1\n");
        let mut prints: Vec<&str> = keys.iter().map(PublicKey::fingerprint).collect();
        prints.sort_unstable();
        for print in prints {
            hasher.update(b"key\0");
            hasher.update(print.as_bytes());
            hasher.update(b"\n");
        }
        for id in &keyless {
            hasher.update(b"keyless\0");
            hasher.update(id.issuer.as_bytes());
            hasher.update(b"\0");
            hasher.update(id.subject.as_bytes());
            hasher.update(b"\n");
        }
        Policy {
            keys,
            keyless,
            fingerprint: hasher.finalize().into(),
        }
    }

    /// A policy accepting one PEM public key.
    pub fn public_key_pem(pem: &str) -> Result<Self, Rejection> {
        Ok(Self::new(vec![PublicKey::from_pem(pem)?], Vec::new()))
    }

    /// The accepted keys.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// The accepted keyless identities.
    pub fn keyless(&self) -> &[KeylessIdentity] {
        &self.keyless
    }

    /// A digest of everything this policy accepts: equal policies have equal fingerprints, and
    /// any change of keys or identities changes it (which invalidates cached verifications).
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// The accepted keys' fingerprints, for messages.
    pub(crate) fn describe_keys(&self) -> String {
        let keys: Vec<&str> = self.keys.iter().map(PublicKey::fingerprint).collect();
        if keys.is_empty() {
            "no key accepted".to_string()
        } else {
            keys.join(", ")
        }
    }

    /// The accepted keyless identities, for messages.
    pub(crate) fn describe_keyless(&self) -> String {
        self.keyless
            .iter()
            .map(|id| format!("subject {:?} from issuer {:?}", id.subject, id.issuer))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Fails when nothing the policy accepts can be checked: no key, and no keyless identity
    /// (or keyless identities but no trusted root to check their certificates against).
    pub(crate) fn require_checkable(&self, have_roots: bool) -> Result<(), Rejection> {
        if !self.keys.is_empty() || (!self.keyless.is_empty() && have_roots) {
            return Ok(());
        }
        match self.keyless.first() {
            Some(id) => Err(Rejection::KeylessNotConfigured {
                issuer: id.issuer.clone(),
                subject: id.subject.clone(),
            }),
            None => Err(Rejection::InvalidPublicKey(
                "the policy lists no key".to_string(),
            )),
        }
    }

    /// The first key that verifies `signature_b64` over `message`, if any.
    pub(crate) fn signer_of(&self, signature_b64: &str, message: &[u8]) -> Option<&PublicKey> {
        self.keys
            .iter()
            .find(|k| k.verifies(signature_b64, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAETNMjI1azpTh/2ouMbSxFken3gx+R
gYEIXC+X3ZhfII9tjZXo4tkjBLrMbfwJxIbefO7TFXyG40O6GR4TFMOrvw==
-----END PUBLIC KEY-----
";
    const B: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAENptdY/l3nB0yqkXLBWkZWQwo6+cu
OSWS1X9vPavpiQOoTTGC0xX57OojUadxF1cdQmrsiReWg2Wn4FneJfa8xw==
-----END PUBLIC KEY-----
";

    fn id(subject: &str) -> KeylessIdentity {
        KeylessIdentity {
            issuer: "https://issuer.example".into(),
            subject: subject.into(),
        }
    }

    #[test]
    fn fingerprints_follow_what_is_accepted_not_the_order_keys_are_listed() {
        let key = |pem| PublicKey::from_pem(pem).unwrap();
        let ab = Policy::new(vec![key(A), key(B)], vec![]);
        let ba = Policy::new(vec![key(B), key(A)], vec![]);
        assert_eq!(ab.fingerprint(), ba.fingerprint());
        let a = Policy::new(vec![key(A)], vec![]);
        assert_ne!(a.fingerprint(), ab.fingerprint());
        assert_ne!(
            Policy::new(vec![key(A)], vec![id("x@example.com")]).fingerprint(),
            Policy::new(vec![key(A)], vec![id("y@example.com")]).fingerprint()
        );
        assert_ne!(
            a.fingerprint(),
            Policy::new(vec![], vec![id("x@example.com")]).fingerprint()
        );
    }

    #[test]
    fn key_fingerprint_matches_openssl() {
        // `openssl pkey -pubin -in a.pub -outform DER | sha256sum` of key A.
        assert_eq!(
            PublicKey::from_pem(A).unwrap().fingerprint(),
            "sha256:42c7496306f1db0bb1cd2aba8d7f3511d232152d290367eacfd4e56f394359fa"
        );
    }

    #[test]
    fn a_policy_needs_something_it_can_check() {
        let keyless_only = Policy::new(vec![], vec![id("x@example.com")]);
        assert_eq!(
            keyless_only.require_checkable(false).unwrap_err().reason(),
            "KeylessNotConfigured"
        );
        assert!(keyless_only.require_checkable(true).is_ok());
        let empty = Policy::new(vec![], vec![]);
        assert_eq!(
            empty.require_checkable(true).unwrap_err().reason(),
            "InvalidPublicKey"
        );
    }
}
