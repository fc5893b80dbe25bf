//! The one error type of this crate.

/// What can go wrong loading or evaluating policies.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A document is not YAML/JSON or not the shape its kind requires.
    #[error("{origin}: {message}")]
    Document {
        /// File, ConfigMap key or built-in name the document came from.
        origin: String,
        /// What is wrong, in words a policy author can act on.
        message: String,
    },
    /// A template's Rego does not compile.
    #[error("template {template}: Rego does not compile: {message}")]
    Compile {
        /// The template (constraint kind).
        template: String,
        /// The compiler's message.
        message: String,
    },
    /// A constraint names a kind no template defines.
    #[error("constraint {kind}/{name}: no ConstraintTemplate defines kind {kind}")]
    UnknownKind {
        /// The constraint's kind.
        kind: String,
        /// The constraint's name.
        name: String,
    },
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl PolicyError {
    /// Every label [`PolicyError::label`] returns, so a metric can start each at zero (an
    /// `increase()` alert then sees the first error).
    pub const LABELS: [&'static str; 4] = [
        "InvalidPolicyDocument",
        "PolicyCompileError",
        "UnknownConstraintKind",
        "PolicyReadError",
    ];

    /// A short label for metrics and Event reasons.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Document { .. } => "InvalidPolicyDocument",
            Self::Compile { .. } => "PolicyCompileError",
            Self::UnknownKind { .. } => "UnknownConstraintKind",
            Self::Io { .. } => "PolicyReadError",
        }
    }

    pub(crate) fn doc(origin: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Document {
            origin: origin.into(),
            message: message.into(),
        }
    }
}
