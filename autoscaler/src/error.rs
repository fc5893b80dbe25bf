//! The crate's one error type: invalid autoscaler settings, and unreadable traces.

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is outside its valid range; the message names it and the range.
    #[error("invalid autoscaler setting `{field}`: {message}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// A trace file could not be read.
    #[error("cannot read trace {path}")]
    TraceIo {
        /// Path of the trace.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A trace line could not be parsed.
    #[error("trace {path} line {line}: {message}")]
    TraceParse {
        /// Path of the trace.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        message: String,
    },
}

impl Error {
    /// A short label for metrics and Event reasons.
    pub fn label(&self) -> &'static str {
        match self {
            Self::InvalidConfig { .. } => "InvalidConfig",
            Self::TraceIo { .. } => "TraceIo",
            Self::TraceParse { .. } => "TraceParse",
        }
    }
}
