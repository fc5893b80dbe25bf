//! Artifact references: `registry/repository@sha256:<hex>` for what is verified, and the
//! `sha256-<hex>.sig` tag under which cosign stores an artifact's signatures.

use std::fmt;

use crate::Rejection;

/// An OCI artifact pinned by digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OciRef {
    /// Registry host and optional port, for example `127.0.0.1:5000` or `ghcr.io`.
    pub registry: String,
    /// Repository inside the registry, for example `capsules/support-kb`.
    pub repository: String,
    /// `sha256:<64 lowercase hex>`.
    pub digest: String,
}

impl OciRef {
    /// Builds a reference, checking every part.
    pub fn new(registry: &str, repository: &str, digest: &str) -> Result<Self, Rejection> {
        let r = OciRef {
            registry: registry.to_string(),
            repository: repository.to_string(),
            digest: digest.to_string(),
        };
        let bad = |reason: &str| Rejection::InvalidReference {
            reference: r.to_string(),
            reason: reason.to_string(),
        };
        if registry.is_empty() || registry.contains('/') {
            return Err(bad("the registry must be a host[:port]"));
        }
        let repo_ok = !repository.is_empty()
            && repository.split('/').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
            });
        if !repo_ok {
            return Err(bad(
                "the repository must be lowercase path components ([a-z0-9._-])",
            ));
        }
        digest_bytes(digest).ok_or_else(|| bad("the digest must be sha256:<64 lowercase hex>"))?;
        Ok(r)
    }

    /// Splits `registry/repository` (as in a Capsule's `spec.source.oci.repository`) and pairs it
    /// with a digest.
    pub fn from_repository(repository: &str, digest: &str) -> Result<Self, Rejection> {
        let (registry, repo) =
            repository
                .split_once('/')
                .ok_or_else(|| Rejection::InvalidReference {
                    reference: repository.to_string(),
                    reason:
                        "expected registry/repository, for example registry.example.com/capsules/kb"
                            .to_string(),
                })?;
        Self::new(registry, repo, digest)
    }

    /// The tag cosign stores this artifact's signatures under: `sha256-<hex>.sig`.
    pub fn signature_tag(&self) -> String {
        format!("{}.sig", self.digest.replacen(':', "-", 1))
    }
}

impl fmt::Display for OciRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.registry, self.repository, self.digest)
    }
}

/// The 32 bytes of a `sha256:<64 lowercase hex>` digest, or `None` when it is not one.
pub(crate) fn digest_bytes(digest: &str) -> Option<[u8; 32]> {
    let hex_part = digest.strip_prefix("sha256:")?;
    if hex_part.len() != 64
        || !hex_part
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:50d462ba7793fb453045fe18ef6547305b7e920a845192fb63500803331d51fa";

    #[test]
    fn accepts_a_pinned_reference_and_names_its_signature_tag() {
        let r = OciRef::from_repository("127.0.0.1:5000/capsules/kb", D).unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "capsules/kb");
        assert_eq!(
            r.signature_tag(),
            "sha256-50d462ba7793fb453045fe18ef6547305b7e920a845192fb63500803331d51fa.sig"
        );
        assert_eq!(r.to_string(), format!("127.0.0.1:5000/capsules/kb@{D}"));
    }

    #[test]
    fn rejects_malformed_references() {
        for (repo, digest) in [
            ("capsules", D),
            ("127.0.0.1:5000/Capsules/kb", D),
            ("127.0.0.1:5000/capsules//kb", D),
            ("127.0.0.1:5000/capsules/kb", "sha256:abc"),
            (
                "127.0.0.1:5000/capsules/kb",
                "sha512:50d462ba7793fb453045fe18ef6547305b7e920a845192fb63500803331d51fa",
            ),
            (
                "127.0.0.1:5000/capsules/kb",
                "sha256:50D462BA7793FB453045FE18EF6547305B7E920A845192FB63500803331D51FA",
            ),
        ] {
            let err = OciRef::from_repository(repo, digest).unwrap_err();
            assert_eq!(err.reason(), "InvalidReference", "{repo} {digest}: {err}");
        }
    }
}
