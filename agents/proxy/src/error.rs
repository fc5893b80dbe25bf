//! The proxy's one error type, and how each error reaches the client: a status and a body in
//! the wire format the client speaks (OpenAI's `{"error": {...}}` or Anthropic's
//! `{"type": "error", "error": {...}}`). Details go to the log; the body says what the client
//! can act on and never carries the provider key or an internal cause.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use soma_metering::Refusal;
use soma_metering::wire::Dialect;

/// What can go wrong on the request path.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No or wrong client token.
    #[error("missing or invalid client token")]
    Unauthorized,
    /// No such endpoint here.
    #[error("no endpoint {0}")]
    NotFound(String),
    /// The endpoint belongs to the other provider.
    #[error("{path} is not served: this sidecar's provider is {provider}")]
    WrongProvider {
        /// Path asked for.
        path: String,
        /// Configured provider kind.
        provider: &'static str,
    },
    /// Not `application/json`.
    #[error("content type must be application/json")]
    ContentType,
    /// Body over the configured limit.
    #[error("request body exceeds {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The body could not be read.
    #[error("could not read the request body")]
    BodyRead(#[source] axum::Error),
    /// Not JSON, or not an object.
    #[error("request body is not a JSON object: {0}")]
    Json(String),
    /// A body of the sidecar's own API (such as a queue report) that does not have its shape.
    #[error("{0}")]
    Invalid(String),
    /// No `model`.
    #[error("request has no \"model\"")]
    NoModel,
    /// A model without a price.
    #[error("model {0:?} is not in this sidecar's price table")]
    UnknownModel(String),
    /// A Budget refused.
    #[error("budget {} refused the request", .0.budget)]
    Budget(Box<Refusal>),
    /// The Budget chain cannot be enforced (a Budget missing, a parent that does not grant
    /// the child's namespace, a loop): fail closed.
    #[error("the Budget chain cannot be enforced: {0}")]
    BudgetUndefined(String),
    /// The budget authority cannot decide; the request is refused rather than risk overspend.
    #[error("budget authority unavailable: {0}; the request was not sent")]
    BudgetUnavailable(String),
    /// The upstream could not be reached.
    #[error("upstream unreachable")]
    Upstream(#[source] crate::connections::CallError),
    /// The upstream did not answer in time.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// The outbox could not record usage: the request is refused rather than unmetered.
    #[error("usage could not be recorded")]
    Outbox(#[source] crate::outbox::WriteError),
    /// The request could not be built (should not happen with validated config).
    #[error("internal error building the upstream request")]
    Internal(String),
    /// The provider's response broke off before its end.
    #[error("the provider's response broke off")]
    UpstreamCut,
    /// No provider key: Vault could not be read, or the provider refused the key.
    #[error("no provider key ({}): {}", .0.reason.as_str(), .0.message)]
    CredentialsUnavailable(crate::keys::Problem),
    /// As many requests are in flight as the sidecar serves at once (`maxInFlight`).
    #[error("{limit} requests are in flight, the sidecar's limit")]
    Overloaded {
        /// The limit.
        limit: usize,
    },
    /// The `x-soma-priority` header is not `low`, `normal` or `high`.
    #[error("header x-soma-priority must be low, normal or high")]
    Priority,
    /// `POST /v1/recall` refused (`crate::recall`).
    #[error(transparent)]
    Recall(#[from] crate::recall::RecallError),
    /// Shed by the Agent's brown-out (the autoscaler's reason in the message).
    #[error("shed by brown-out")]
    Shed {
        /// Why, in the autoscaler's words.
        message: String,
    },
}

/// `Retry-After` of a request shed by brown-out: about one step of the operator's scaling loop.
pub const SHED_RETRY_AFTER_S: u64 = 15;

/// Every reason `soma_proxy_errors_total` counts, for series that start at 0: each
/// [`ProxyError::label`], then the ways a stream that was already answered can fail
/// ([`STREAM_FAILURES`]).
pub const REASONS: [&str; 30] = [
    "unauthorized",
    "not_found",
    "wrong_provider",
    "content_type",
    "too_large",
    "body_read",
    "json",
    "no_model",
    "unknown_model",
    "budget",
    "budget_undefined",
    "budget_unavailable",
    "upstream",
    "upstream_timeout",
    "outbox",
    "internal",
    "overloaded",
    "priority",
    "brown_out",
    "credentials_unavailable",
    "recall_invalid",
    "recall_query_too_large",
    "capsule_not_found",
    "capsule_revoked",
    "capsule_unavailable",
    "recall_embedding",
    "upstream_cut",
    "stream_cut",
    "stream_idle_timeout",
    "stream_error_event",
];

/// Reasons for a stream the client was already answering (status 200 sent): the provider
/// broke the connection, went silent past `timeouts.idleMs`, or sent an error event.
pub const STREAM_FAILURES: [&str; 3] = ["stream_cut", "stream_idle_timeout", "stream_error_event"];

impl ProxyError {
    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            ProxyError::Unauthorized => "unauthorized",
            ProxyError::NotFound(_) => "not_found",
            ProxyError::WrongProvider { .. } => "wrong_provider",
            ProxyError::ContentType => "content_type",
            ProxyError::TooLarge { .. } => "too_large",
            ProxyError::BodyRead(_) => "body_read",
            ProxyError::Json(_) => "json",
            ProxyError::Invalid(_) => "invalid",
            ProxyError::NoModel => "no_model",
            ProxyError::UnknownModel(_) => "unknown_model",
            ProxyError::Budget(_) => "budget",
            ProxyError::BudgetUndefined(_) => "budget_undefined",
            ProxyError::BudgetUnavailable(_) => "budget_unavailable",
            ProxyError::Upstream(_) => "upstream",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::UpstreamCut => "upstream_cut",
            ProxyError::Outbox(_) => "outbox",
            ProxyError::Internal(_) => "internal",
            ProxyError::Overloaded { .. } => "overloaded",
            ProxyError::Priority => "priority",
            ProxyError::Shed { .. } => "brown_out",
            ProxyError::Recall(r) => r.label(),
            ProxyError::CredentialsUnavailable(_) => "credentials_unavailable",
        }
    }

    /// The HTTP status the client receives for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Unauthorized => StatusCode::UNAUTHORIZED,
            ProxyError::NotFound(_) | ProxyError::WrongProvider { .. } => StatusCode::NOT_FOUND,
            ProxyError::ContentType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ProxyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyRead(_)
            | ProxyError::Json(_)
            | ProxyError::Invalid(_)
            | ProxyError::NoModel
            | ProxyError::Priority
            | ProxyError::UnknownModel(_) => StatusCode::BAD_REQUEST,
            ProxyError::Budget(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::BudgetUndefined(_)
            | ProxyError::BudgetUnavailable(_)
            | ProxyError::Outbox(_)
            | ProxyError::Shed { .. }
            | ProxyError::Overloaded { .. }
            | ProxyError::CredentialsUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream(_) | ProxyError::UpstreamCut => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::Recall(r) => r.status(),
        }
    }

    /// (OpenAI type, Anthropic type, code)
    fn kinds(&self) -> (&'static str, &'static str, &'static str) {
        match self {
            ProxyError::Unauthorized => (
                "invalid_request_error",
                "authentication_error",
                "invalid_api_key",
            ),
            ProxyError::NotFound(_) | ProxyError::WrongProvider { .. } => {
                ("invalid_request_error", "not_found_error", "not_found")
            }
            ProxyError::UnknownModel(_) => (
                "invalid_request_error",
                "not_found_error",
                "model_not_found",
            ),
            ProxyError::TooLarge { .. } => (
                "invalid_request_error",
                "request_too_large",
                "request_too_large",
            ),
            ProxyError::ContentType
            | ProxyError::BodyRead(_)
            | ProxyError::Json(_)
            | ProxyError::Invalid(_)
            | ProxyError::Priority
            | ProxyError::NoModel => (
                "invalid_request_error",
                "invalid_request_error",
                "invalid_request",
            ),
            ProxyError::Budget(r) => match r.limit {
                soma_metering::budget::LimitKind::TokensPerMinute
                | soma_metering::budget::LimitKind::RequestsPerMinute => {
                    ("requests", "rate_limit_error", "rate_limit_exceeded")
                }
                _ => ("insufficient_quota", "rate_limit_error", "budget_exceeded"),
            },
            ProxyError::Upstream(_) | ProxyError::UpstreamTimeout | ProxyError::UpstreamCut => {
                ("api_error", "api_error", "upstream_unavailable")
            }
            ProxyError::BudgetUnavailable(_) => {
                ("api_error", "overloaded_error", "budget_unavailable")
            }
            ProxyError::Overloaded { .. } => ("api_error", "overloaded_error", "overloaded"),
            ProxyError::Shed { .. } => ("api_error", "overloaded_error", "brown_out"),
            ProxyError::CredentialsUnavailable(_) => {
                ("api_error", "api_error", "credentials_unavailable")
            }
            ProxyError::BudgetUndefined(_) | ProxyError::Outbox(_) | ProxyError::Internal(_) => {
                ("api_error", "api_error", "sidecar_unavailable")
            }
            ProxyError::Recall(r) => {
                let (openai, code) = r.kinds();
                (openai, "invalid_request_error", code)
            }
        }
    }

    /// The message the client sees.
    pub fn message(&self) -> String {
        match self {
            ProxyError::Unauthorized => "Missing or invalid client token: present the pod's \
                SOMA_PROXY_TOKEN as the API key (Authorization: Bearer or x-api-key)."
                .into(),
            ProxyError::Budget(r) => refusal_message(r),
            ProxyError::BodyRead(_) => "The request body could not be read.".into(),
            ProxyError::Upstream(_) => "The model provider could not be reached.".into(),
            ProxyError::Outbox(_) => "The sidecar could not record usage, so the request was \
                not sent to the provider. Try again."
                .into(),
            ProxyError::CredentialsUnavailable(p) => format!(
                "The sidecar has no usable provider key ({}): {}. The request was not sent to \
                 the provider; the sidecar retries and reports it on /readyz.",
                p.reason.as_str(),
                p.message
            ),
            ProxyError::Overloaded { limit } => format!(
                "The sidecar is serving its limit of {limit} requests at once; this one was not \
                 sent to the provider. Retry shortly."
            ),
            ProxyError::Shed { message } => format!(
                "This Agent is browning out: {message}. This request (priority low or normal, \
                 from the x-soma-priority header) was not sent to the provider. Retry later."
            ),
            other => {
                let mut s = other.to_string();
                if let Some(first) = s.get_mut(..1) {
                    first.make_ascii_uppercase();
                }
                s.push('.');
                s
            }
        }
    }

    /// The response in `dialect`'s format.
    pub fn into_wire(self, dialect: Dialect) -> Response {
        let status = self.status();
        let (openai_type, anthropic_type, code) = self.kinds();
        let message = self.message();
        let mut body = match dialect {
            Dialect::OpenAi => json!({"error": {
                "message": message, "type": openai_type, "param": Value::Null, "code": code,
            }}),
            Dialect::Anthropic => json!({"type": "error", "error": {
                "type": anthropic_type, "message": message,
            }}),
        };
        let mut headers = Vec::new();
        if let ProxyError::Overloaded { .. } | ProxyError::CredentialsUnavailable(_) = &self {
            headers.push((header::RETRY_AFTER, "1".to_owned()));
        }
        if let ProxyError::Shed { .. } = &self {
            headers.push((header::RETRY_AFTER, SHED_RETRY_AFTER_S.to_string()));
        }
        if let ProxyError::Budget(r) = &self {
            body["soma_budget"] = json!({
                "budget": r.budget,
                "limit": r.limit.field(),
                "cap": r.cap,
                "used": r.used,
                "requested": r.requested,
                "remaining": r.remaining,
                "resets_at": r.resets_at.to_string(),
            });
            let secs = r
                .resets_at
                .duration_since(jiff::Timestamp::now())
                .as_secs()
                .max(1);
            headers.push((header::RETRY_AFTER, secs.to_string()));
        }
        let mut resp = (status, axum::Json(body)).into_response();
        for (k, v) in headers {
            if let Ok(v) = HeaderValue::from_str(&v) {
                resp.headers_mut().insert(k, v);
            }
        }
        resp
    }
}

fn refusal_message(r: &Refusal) -> String {
    let unit = match r.limit {
        soma_metering::budget::LimitKind::CostMicros => format!("micro-{}", r.currency),
        soma_metering::budget::LimitKind::RequestsPerMinute => "requests".into(),
        _ => "tokens".into(),
    };
    format!(
        "Budget \"{}\" refused this request: limits.{} is {} {unit}, {} are used or reserved, \
         {} remain, and this request needs up to {}. It resets at {}.",
        r.budget,
        r.limit.field(),
        r.cap,
        r.used,
        r.remaining,
        r.requested,
        r.resets_at
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    async fn body(resp: Response) -> Value {
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn every_label_is_a_listed_reason() {
        let errors = [
            ProxyError::Unauthorized,
            ProxyError::NotFound("/x".into()),
            ProxyError::WrongProvider {
                path: "/x".into(),
                provider: "openai",
            },
            ProxyError::ContentType,
            ProxyError::TooLarge { limit: 1 },
            ProxyError::BodyRead(axum::Error::new(std::io::Error::other("x"))),
            ProxyError::Json("x".into()),
            ProxyError::NoModel,
            ProxyError::UnknownModel("m".into()),
            ProxyError::BudgetUndefined("x".into()),
            ProxyError::BudgetUnavailable("x".into()),
            ProxyError::UpstreamTimeout,
            ProxyError::UpstreamCut,
            ProxyError::Internal("x".into()),
            ProxyError::Overloaded { limit: 1 },
            ProxyError::Priority,
            ProxyError::Shed {
                message: "x".into(),
            },
            ProxyError::CredentialsUnavailable(crate::keys::Problem::new(
                crate::keys::Reason::VaultUnreachable,
                "x",
            )),
        ];
        use crate::recall::RecallError as R;
        let recall = [
            R::Invalid("x".into()),
            R::QueryTooLarge { limit: 1, got: 2 },
            R::UnknownCapsule("x".into()),
            R::Revoked {
                capsule: "x".into(),
                digest: "d".into(),
                reason: "r".into(),
            },
            R::Unavailable {
                capsule: "x".into(),
                reason: "r".into(),
            },
            R::Embedding("x".into()),
        ];
        let errors: Vec<ProxyError> = errors
            .into_iter()
            .chain(recall.into_iter().map(ProxyError::Recall))
            .collect();
        for e in &errors {
            assert!(
                REASONS.contains(&e.label()),
                "{} is not in REASONS",
                e.label()
            );
        }
        // The three variants not built above (they wrap library errors or a refusal).
        for label in ["budget", "upstream", "outbox"] {
            assert!(REASONS.contains(&label));
        }
        for label in STREAM_FAILURES {
            assert!(REASONS.contains(&label));
        }
        assert_eq!(REASONS.len(), errors.len() + 3 + STREAM_FAILURES.len());
    }

    #[tokio::test]
    async fn overload_is_a_503_with_retry_after_in_both_wire_formats() {
        let openai = ProxyError::Overloaded { limit: 7 }.into_wire(Dialect::OpenAi);
        assert_eq!(openai.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(openai.headers()[header::RETRY_AFTER], "1");
        let b = body(openai).await;
        assert_eq!(
            (b["error"]["type"].as_str(), b["error"]["code"].as_str()),
            (Some("api_error"), Some("overloaded"))
        );

        let anthropic = ProxyError::Overloaded { limit: 7 }.into_wire(Dialect::Anthropic);
        assert_eq!(anthropic.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(anthropic.headers()[header::RETRY_AFTER], "1");
        let b = body(anthropic).await;
        assert_eq!(
            (b["type"].as_str(), b["error"]["type"].as_str()),
            (Some("error"), Some("overloaded_error"))
        );
        assert!(
            b["error"]["message"]
                .as_str()
                .unwrap()
                .contains("limit of 7 requests")
        );
    }

    #[tokio::test]
    async fn a_shed_request_is_a_503_with_retry_after_and_the_reason_in_both_wire_formats() {
        let shed = || ProxyError::Shed {
            message: "maxReplicas is 2".into(),
        };
        let openai = shed().into_wire(Dialect::OpenAi);
        assert_eq!(openai.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(openai.headers()[header::RETRY_AFTER], "15");
        let b = body(openai).await;
        assert_eq!(b["error"]["code"].as_str(), Some("brown_out"));
        assert!(
            b["error"]["message"]
                .as_str()
                .unwrap()
                .contains("maxReplicas is 2")
        );
        let anthropic = shed().into_wire(Dialect::Anthropic);
        assert_eq!(anthropic.headers()[header::RETRY_AFTER], "15");
        let b = body(anthropic).await;
        assert_eq!(b["error"]["type"].as_str(), Some("overloaded_error"));
    }
}
