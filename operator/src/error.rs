//! The operator's one error type. Each variant names the step that failed and keeps its
//! cause; [`Error::label`] is the short name used for metrics and Event reasons, and
//! [`Error::is_transient`] drives the error policy (retry with backoff, or stall).

use thiserror::Error;

/// Everything a reconcile or the operator's start-up can fail with.
#[derive(Debug, Error)]
pub enum Error {
    /// Reading an object or a reference from the API failed.
    #[error("reading {what} failed: {source}")]
    Read {
        /// What was being read.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Applying a child object failed.
    #[error("applying {kind} {name} failed: {source}")]
    Apply {
        /// Kind of the child.
        kind: &'static str,
        /// Name of the child.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Deleting a child that is no longer desired failed.
    #[error("deleting {kind} {name} failed: {source}")]
    Delete {
        /// Kind of the child.
        kind: &'static str,
        /// Name of the child.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Writing the Agent's status failed.
    #[error("writing status failed: {source}")]
    Status {
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The object lacks something the API server always sets (namespace, name).
    #[error("object is missing {0}")]
    MissingField(&'static str),
    /// Serialising a child or the sidecar configuration failed.
    #[error("serialising {what} failed: {source}")]
    Serialize {
        /// What was being serialised.
        what: &'static str,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// A short, stable label for metrics and Event reasons.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Read { .. } => "ReadFailed",
            Self::Apply { .. } => "ApplyFailed",
            Self::Delete { .. } => "DeleteFailed",
            Self::Status { .. } => "StatusWriteFailed",
            Self::MissingField(_) => "MissingField",
            Self::Serialize { .. } => "SerializeFailed",
        }
    }

    /// Whether retrying may help. API errors are transient unless the API server rejected
    /// the request for a reason that only a change by a person can fix (invalid object,
    /// forbidden by RBAC, rejected by admission); local bugs are permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Read { source, .. }
            | Self::Apply { source, .. }
            | Self::Delete { source, .. }
            | Self::Status { source } => !is_permanent_api_error(source),
            Self::MissingField(_) | Self::Serialize { .. } => false,
        }
    }
}

/// 400 Bad Request, 403 Forbidden, 422 Invalid: retrying the same request cannot succeed.
fn is_permanent_api_error(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => matches!(status.code, 400 | 403 | 422),
        _ => false,
    }
}

/// Result alias for the operator.
pub type Result<T, E = Error> = std::result::Result<T, E>;
