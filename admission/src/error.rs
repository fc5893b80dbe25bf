//! The webhook's one error type. Each maps to an HTTP status and, where the request's uid is
//! known, to a denying AdmissionReview: the API server shows its message to the user.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// What can go wrong serving one AdmissionReview.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    /// The body is not JSON or not an AdmissionReview.
    #[error("malformed AdmissionReview: {0}")]
    Malformed(String),
    /// The body is larger than the webhook accepts.
    #[error(
        "the request is {size} bytes or more; Soma's webhook accepts AdmissionReviews up to {limit} bytes"
    )]
    TooLarge {
        /// Bytes read before giving up.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Reading the body failed.
    #[error("could not read the request body: {0}")]
    Body(String),
}

impl AdmissionError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::TooLarge { .. } => "too_large",
            Self::Body(_) => "body",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Malformed(_) | Self::Body(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }
}

impl IntoResponse for AdmissionError {
    /// A `metav1.Status`, which the API server reports when no AdmissionReview can be built.
    fn into_response(self) -> Response {
        tracing::warn!(error = %self, label = self.label(), "rejecting admission request");
        let status = self.status();
        let body = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": self.to_string(), "code": status.as_u16(),
        });
        (status, axum::Json(body)).into_response()
    }
}
