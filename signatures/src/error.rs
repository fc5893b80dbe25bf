//! Why a signature was not accepted: one variant per failing step, each with a message a user
//! can act on, a short `reason()` label for conditions, Events and metrics, and whether retrying
//! later can help (`is_transient()`).

/// A verification that did not succeed.
///
/// Only [`Rejection::RegistryUnreachable`] with `transient: true` is worth retrying on its own;
/// every other variant needs a change (a new signature, another key, a fixed reference).
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// The artifact reference or digest is not well formed.
    #[error("invalid reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The policy's public key could not be read.
    #[error(
        "invalid public key: {0}; expected a PEM public key as written by `cosign generate-key-pair`"
    )]
    InvalidPublicKey(String),
    /// The policy accepts keyless signers but the verifier has no trusted root to check their
    /// certificates against.
    #[error(
        "keyless signer (issuer {issuer:?}, subject {subject:?}) cannot be checked: keyless verification \
         needs a configured trusted root and applies to OCI signatures only; configure a root or sign \
         with a key (publicKeyRef)"
    )]
    KeylessNotConfigured {
        /// The OIDC issuer the policy asks for.
        issuer: String,
        /// The certificate subject the policy asks for.
        subject: String,
    },
    /// A configured trusted root could not be read.
    #[error("invalid trusted root: {0}; expected PEM CA certificates")]
    InvalidTrustedRoot(String),
    /// A keyless signature's certificate does not chain to a trusted root, is expired, or is not
    /// for code signing.
    #[error("{reference}: untrusted signing certificate: {reason}")]
    UntrustedCertificate {
        /// The artifact.
        reference: String,
        /// Why the chain was refused.
        reason: String,
    },
    /// A keyless signature by a trusted certificate, but for an identity the policy does not accept.
    #[error(
        "{reference}: signed by subject {subject:?} from issuer {issuer:?}, which the policy does not accept (accepted: {accepted})"
    )]
    IdentityMismatch {
        /// The artifact.
        reference: String,
        /// The certificate's OIDC issuer.
        issuer: String,
        /// The certificate's subject.
        subject: String,
        /// The accepted identities.
        accepted: String,
    },
    /// The artifact itself is not in the registry.
    #[error("artifact {reference} not found in the registry")]
    ArtifactNotFound {
        /// The artifact looked for.
        reference: String,
    },
    /// No cosign signature exists for this digest.
    #[error(
        "{reference} is not signed: no cosign signature at tag {signature_tag}; sign it with `cosign sign --key ...`"
    )]
    Unsigned {
        /// The artifact.
        reference: String,
        /// The tag cosign stores signatures under (`sha256-<hex>.sig`).
        signature_tag: String,
    },
    /// Signatures exist but none was made by an accepted key.
    #[error("{reference}: {count} signature(s) found, none made by the configured key ({key})")]
    WrongKey {
        /// The artifact.
        reference: String,
        /// How many signatures were checked.
        count: usize,
        /// The accepted key fingerprint(s).
        key: String,
    },
    /// A valid signature exists, but for another artifact: a signature copied (replayed) from
    /// another digest's `.sig` tag, or a blob whose bytes differ from its declared digest.
    #[error(
        "{reference}: the signature is for digest {signed}, not {requested} (copied from another artifact?)"
    )]
    DigestMismatch {
        /// The artifact.
        reference: String,
        /// The digest the signed payload names.
        signed: String,
        /// The digest that was asked for.
        requested: String,
    },
    /// The signature or its payload cannot be parsed.
    #[error("{reference}: malformed signature: {reason}")]
    MalformedSignature {
        /// The artifact.
        reference: String,
        /// What could not be parsed.
        reason: String,
    },
    /// The registry could not be asked, or refused the request.
    #[error("registry {registry} {}: {detail}", if *transient { "unreachable (will retry)" } else { "refused the request" })]
    RegistryUnreachable {
        /// The registry host.
        registry: String,
        /// True when retrying later may succeed (connection refused, timeout, 5xx).
        transient: bool,
        /// The underlying error.
        detail: String,
    },
}

impl Rejection {
    /// A short CamelCase label for the `Ready=False` condition reason, Events and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::InvalidReference { .. } => "InvalidReference",
            Rejection::InvalidPublicKey(_) => "InvalidPublicKey",
            Rejection::KeylessNotConfigured { .. } => "KeylessNotConfigured",
            Rejection::InvalidTrustedRoot(_) => "InvalidTrustedRoot",
            Rejection::UntrustedCertificate { .. } => "UntrustedCertificate",
            Rejection::IdentityMismatch { .. } => "IdentityMismatch",
            Rejection::ArtifactNotFound { .. } => "ArtifactNotFound",
            Rejection::Unsigned { .. } => "Unsigned",
            Rejection::WrongKey { .. } => "WrongKey",
            Rejection::DigestMismatch { .. } => "DigestMismatch",
            Rejection::MalformedSignature { .. } => "MalformedSignature",
            Rejection::RegistryUnreachable { .. } => "RegistryUnreachable",
        }
    }

    /// True when the same request may succeed later without any change (retry with backoff);
    /// false when a user must change something (mark the Capsule `Ready=False` and wait).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Rejection::RegistryUnreachable {
                transient: true,
                ..
            }
        )
    }
}
