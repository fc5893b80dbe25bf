//! Pure: the digest of a Capsule's content. An OCI source names its digest (the registry
//! checks bytes against it when they are pulled); inline blocks and a ConfigMap's key are
//! hashed here, and a ConfigMap whose bytes do not match the digest the Capsule declares is
//! refused.

use sha2::{Digest, Sha256};
use soma_crds::capsule::MemoryBlock;

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The digest of inline blocks: SHA-256 of their JSON (fields in declaration order, metadata
/// keys sorted), so the same blocks always hash the same.
pub fn inline_digest(blocks: &[MemoryBlock]) -> Result<String, serde_json::Error> {
    Ok(sha256(&serde_json::to_vec(blocks)?))
}

/// Compares the bytes of a ConfigMap key with the digest the Capsule declares.
pub fn check_declared(declared: &str, bytes: &[u8]) -> Result<String, String> {
    let actual = sha256(bytes);
    if actual == declared {
        Ok(actual)
    } else {
        Err(format!(
            "the content has digest {actual} but the Capsule declares {declared}; publish a new Capsule with the right digest"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(id: &str, text: &str) -> MemoryBlock {
        MemoryBlock {
            id: id.into(),
            text: text.into(),
            provenance: None,
            metadata: Default::default(),
        }
    }

    #[test]
    fn inline_digest_is_stable_and_sensitive_to_every_byte() {
        let a = inline_digest(&[block("1", "hello")]).expect("json");
        assert_eq!(a, inline_digest(&[block("1", "hello")]).expect("json"));
        assert_ne!(a, inline_digest(&[block("1", "hello!")]).expect("json"));
        assert!(a.starts_with("sha256:") && a.len() == 71);
    }

    #[test]
    fn declared_digest_must_match() {
        let good = sha256(b"kb");
        assert_eq!(check_declared(&good, b"kb"), Ok(good.clone()));
        let err = check_declared(&good, b"tampered").expect_err("mismatch");
        assert!(
            err.contains(&good) && err.contains("publish a new Capsule"),
            "{err}"
        );
    }
}
