//! One error type for packing, opening, pushing and fetching bundles: each variant is one
//! failing step, with a message a user can act on and a short [`Error::reason`] label.

/// What went wrong with a bundle.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The directory being packed (or an option given with it) cannot make a bundle.
    #[error("{path}: {reason}")]
    Input {
        /// The file or option at fault.
        path: String,
        /// Why.
        reason: String,
    },
    /// Reading or writing local files failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being read or written.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A destination folder that must be empty is not.
    #[error("{path} is not empty; give an empty or absent folder")]
    NotEmpty {
        /// The folder.
        path: String,
    },
    /// The manifest's bytes do not hash to the digest asked for.
    #[error(
        "the manifest served for {expected} has digest {actual}: refusing content other than the verified digest"
    )]
    DigestMismatch {
        /// The digest asked for (the verified one).
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// A blob's bytes do not match its descriptor.
    #[error("blob {digest} ({media_type}) {problem}")]
    BlobMismatch {
        /// The descriptor's digest.
        digest: String,
        /// The descriptor's media type.
        media_type: String,
        /// How it differs (another digest, another size).
        problem: String,
    },
    /// The manifest, the Capsule manifest or a layer cannot be parsed or breaks the format.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which part.
        what: String,
        /// Why.
        reason: String,
    },
    /// A layer the format requires is absent.
    #[error("the bundle has no {media_type} layer")]
    MissingLayer {
        /// The missing layer's media type.
        media_type: String,
    },
    /// Embeddings that do not fit the chunks or the declared model (count, ids, dimension).
    #[error("embeddings: {reason}")]
    Embeddings {
        /// Why.
        reason: String,
    },
    /// The bundle's `policyHash` or version is not the one expected.
    #[error("the bundle's {field} is {actual:?}, expected {expected:?}")]
    Unexpected {
        /// `policyHash` or `version`.
        field: &'static str,
        /// What the bundle says.
        actual: String,
        /// What was expected.
        expected: String,
    },
    /// A reference (`registry/repository:tag` or `...@sha256:...`) is not well formed.
    #[error("invalid reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference.
        reference: String,
        /// Why.
        reason: String,
    },
    /// The registry refused or did not answer.
    #[error("registry {registry}: {detail}")]
    Registry {
        /// `host[:port]`.
        registry: String,
        /// What it said.
        detail: String,
        /// Whether retrying may help (connection refused, 5xx, 429).
        transient: bool,
    },
}

impl Error {
    /// A CamelCase label for metrics, Events and condition reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Input { .. } => "InvalidInput",
            Error::Io { .. } => "Io",
            Error::NotEmpty { .. } => "NotEmpty",
            Error::DigestMismatch { .. } => "DigestMismatch",
            Error::BlobMismatch { .. } => "BlobMismatch",
            Error::Malformed { .. } => "MalformedBundle",
            Error::MissingLayer { .. } => "MissingLayer",
            Error::Embeddings { .. } => "EmbeddingsMismatch",
            Error::Unexpected { field, .. } if *field == "policyHash" => "PolicyHashMismatch",
            Error::Unexpected { .. } => "VersionMismatch",
            Error::InvalidReference { .. } => "InvalidReference",
            Error::Registry { .. } => "RegistryUnreachable",
        }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }

    pub(crate) fn malformed(what: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Malformed {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
