//! The HTTP routes: `POST /validate`, `GET /healthz`, `GET /readyz`, `GET /metrics`.
//!
//! The request path follows kubewarden's policy-server: the body is read under a size limit,
//! parsed, then evaluation (CPU-bound Rego) runs in `spawn_blocking`, carrying the request's
//! span, while a semaphore bounds how many evaluations run at once. A request that cannot get
//! a permit or an answer before the deadline is denied (or allowed with a warning when
//! `fail_open` is set).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State as AxumState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use prometheus_client::registry::Registry;
use soma_policy::{Action, PolicyStore};
use tokio::sync::Semaphore;
use tracing::{Instrument, Span, field};

use crate::error::AdmissionError;
use crate::metrics::{Metrics, ReasonLabels, RequestLabels, ViolationLabels};
use crate::review::{self, Response};

/// Settings of the webhook.
#[derive(Clone, Debug)]
pub struct Config {
    /// Time one decision may take, permit wait included. The API server's own timeout for
    /// the webhook (`timeoutSeconds`, default 10 s) should be larger.
    pub deadline: Duration,
    /// Evaluations running at once; more wait (up to the deadline) for a permit.
    pub max_in_flight: usize,
    /// Largest AdmissionReview body accepted.
    pub max_body_bytes: usize,
    /// When an evaluation cannot finish (deadline, overload, internal error): allow with a
    /// warning instead of denying. Policy violations always deny. Off by default.
    pub fail_open: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            deadline: Duration::from_millis(1500),
            max_in_flight: std::thread::available_parallelism().map_or(4, |n| n.get() * 2),
            // The API server caps request bodies at 3 MiB; an UPDATE carries two objects.
            max_body_bytes: 7 * 1024 * 1024,
            fail_open: false,
        }
    }
}

/// Shared state of the routes.
#[derive(Debug)]
pub struct State {
    /// The policies.
    pub store: Arc<PolicyStore>,
    /// Settings.
    pub config: Config,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    registry: Registry,
    permits: Arc<Semaphore>,
}

impl State {
    /// State over a policy store.
    pub fn new(store: Arc<PolicyStore>, config: Config) -> Arc<Self> {
        let metrics = Arc::new(Metrics::default());
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            store,
            config,
            metrics,
            registry,
        })
    }
}

/// The webhook's routes.
pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/validate", post(validate))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn ready(AxumState(state): AxumState<Arc<State>>) -> HttpResponse {
    let n = state.store.current().constraints().len();
    if n == 0 {
        (StatusCode::SERVICE_UNAVAILABLE, "no policies loaded").into_response()
    } else {
        (StatusCode::OK, format!("{n} constraints")).into_response()
    }
}

async fn metrics(AxumState(state): AxumState<Arc<State>>) -> HttpResponse {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &state.registry) {
        Ok(()) => (
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Reads at most `limit` bytes. Beyond that, the rest is drained (up to four times the limit)
/// and the error carries the first and last 4 KiB, where the request's uid can be found.
async fn read_limited(body: Body, limit: usize) -> Result<Bytes, (AdmissionError, Vec<u8>)> {
    const EDGE: usize = 4096;
    let mut body = body;
    let mut buf: Vec<u8> = Vec::new();
    let mut size = 0usize;
    let mut tail: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| (AdmissionError::Body(e.to_string()), Vec::new()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        size += data.len();
        if size <= limit {
            buf.extend_from_slice(&data);
            continue;
        }
        if buf.len() > EDGE {
            buf.truncate(EDGE);
        } else if buf.len() < EDGE {
            let take = (EDGE - buf.len()).min(data.len());
            buf.extend_from_slice(&data[..take]);
        }
        tail.extend_from_slice(&data[data.len().saturating_sub(EDGE)..]);
        if tail.len() > EDGE {
            tail.drain(..tail.len() - EDGE);
        }
        if size > limit.saturating_mul(4) {
            break;
        }
    }
    if size > limit {
        buf.extend_from_slice(&tail);
        return Err((AdmissionError::TooLarge { size, limit }, buf));
    }
    Ok(Bytes::from(buf))
}

#[tracing::instrument(skip_all, fields(uid = field::Empty, kind = field::Empty, namespace = field::Empty, name = field::Empty, operation = field::Empty, allowed = field::Empty))]
async fn validate(AxumState(state): AxumState<Arc<State>>, body: Body) -> HttpResponse {
    let started = Instant::now();
    let response = match read_limited(body, state.config.max_body_bytes).await {
        Err((err, prefix)) => {
            state
                .metrics
                .errors
                .get_or_create(&ReasonLabels {
                    reason: err.label(),
                })
                .inc();
            match review::sniff_uid(&prefix) {
                // A denial the API server can show, rather than a bare 413.
                Some(uid) => {
                    let message = format!("{err}; the object is too large for policy review");
                    axum::Json(
                        Response::deny(413, "RequestEntityTooLarge", message)
                            .into_review("admission.k8s.io/v1", &uid),
                    )
                    .into_response()
                }
                None => err.into_response(),
            }
        }
        Ok(bytes) => match review::parse(&bytes) {
            Err(err) => {
                state
                    .metrics
                    .errors
                    .get_or_create(&ReasonLabels {
                        reason: err.label(),
                    })
                    .inc();
                err.into_response()
            }
            Ok(request) => {
                let span = Span::current();
                span.record("uid", request.uid.as_str());
                span.record("kind", request.review.kind.as_str());
                span.record("namespace", request.review.namespace.as_str());
                span.record("name", request.review.name.as_str());
                span.record("operation", request.review.operation.as_str());
                let labels_kind = request.review.kind.clone();
                let labels_op = request.review.operation.clone();
                let (resp, decision_label) = decide(&state, request.review, started).await;
                span.record("allowed", resp.allowed);
                state
                    .metrics
                    .requests
                    .get_or_create(&RequestLabels {
                        kind: if review::KINDS.contains(&labels_kind.as_str()) {
                            labels_kind
                        } else {
                            "other".to_owned()
                        },
                        operation: labels_op,
                        decision: decision_label,
                    })
                    .inc();
                axum::Json(resp.into_review(&request.api_version, &request.uid)).into_response()
            }
        },
    };
    state
        .metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Decides one parsed request; returns the response and a metrics label.
async fn decide(
    state: &Arc<State>,
    review: soma_policy::Review,
    started: Instant,
) -> (Response, &'static str) {
    if let Some(why) = review::precheck(&review) {
        return (Response::deny(400, "BadRequest", why), "invalid");
    }
    if !matches!(review.operation.as_str(), "CREATE" | "UPDATE") {
        return (Response::allow(), "allowed");
    }
    // An object being deleted is only losing finalizers: a policy added since its creation
    // must not block the deletion.
    if review.operation == "UPDATE"
        && review
            .object
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|t| !t.is_null())
    {
        return (Response::allow(), "allowed");
    }
    let deadline = state.config.deadline;
    let permit = match tokio::time::timeout(deadline, state.permits.clone().acquire_owned()).await {
        Ok(Ok(permit)) => permit,
        _ => return unavailable(state, "overloaded", "too many policy evaluations in flight"),
    };
    let remaining = deadline.saturating_sub(started.elapsed());
    let set = state.store.current();
    let span = Span::current();
    // The permit is held by the blocking task, not this future: if the deadline passes, the
    // evaluation still counts against the bound until it stops (the regorus timer stops it).
    let task = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let _entered = span.enter();
        let decision = set.evaluate(&review, remaining);
        (review, decision)
    });
    match tokio::time::timeout(
        remaining + Duration::from_millis(50),
        task.in_current_span(),
    )
    .await
    {
        Ok(Ok((review, decision))) => {
            for v in &decision.violations {
                state
                    .metrics
                    .violations
                    .get_or_create(&ViolationLabels {
                        policy: v.policy.clone(),
                        action: v.action.as_str(),
                    })
                    .inc();
            }
            let failed = decision.failures.iter().any(|f| f.action == Action::Deny);
            let only_failures =
                failed && !decision.violations.iter().any(|v| v.action == Action::Deny);
            if only_failures && state.config.fail_open {
                let mut resp = Response::from_decision(&review, &decision);
                resp.allowed = true;
                resp.code = 200;
                resp.warnings.extend(decision.deny_messages());
                resp.audit
                    .insert("decision".to_owned(), "allowed-fail-open".to_owned());
                return (resp, "fail_open");
            }
            let resp = Response::from_decision(&review, &decision);
            let label = if resp.allowed {
                "allowed"
            } else if only_failures {
                "error"
            } else {
                "denied"
            };
            if only_failures {
                state
                    .metrics
                    .errors
                    .get_or_create(&ReasonLabels {
                        reason: "evaluation",
                    })
                    .inc();
            }
            (resp, label)
        }
        Ok(Err(join)) => {
            tracing::error!(error = %join, "policy evaluation panicked");
            unavailable(state, "internal", "policy evaluation failed")
        }
        Err(_) => unavailable(
            state,
            "deadline",
            "policy evaluation did not finish in time",
        ),
    }
}

fn unavailable(state: &State, reason: &'static str, what: &str) -> (Response, &'static str) {
    state
        .metrics
        .errors
        .get_or_create(&ReasonLabels { reason })
        .inc();
    if state.config.fail_open {
        let mut resp = Response::allow();
        resp.warnings.push(format!(
            "Soma policy was not checked ({what}); allowed because the webhook fails open"
        ));
        resp.audit
            .insert("decision".to_owned(), "allowed-fail-open".to_owned());
        (resp, "fail_open")
    } else {
        (
            Response::deny(
                503,
                "ServiceUnavailable",
                format!(
                    "Soma policy could not decide ({what}); the webhook fails closed, retry shortly"
                ),
            ),
            "error",
        )
    }
}
