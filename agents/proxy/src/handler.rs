//! The request path, one step per function, in the order a request meets them:
//!
//! ```text
//!  admit ─► authenticate ─► parse and estimate ─► shed or downgrade ─► reserve or brown out ─► record (journal)
//!    │  (in-flight bound)      (request.rs)        (brownout.rs: the      (reserve.rs: a      │
//!    └─ 503                                        Agent's load)           Budget's)          ▼
//!        forward (forward.rs) ─► meter: body (forward.rs) or stream (relay.rs) ─► settle and record
//! ```
//!
//! [`handle`] runs the steps in their own task, so a client that disconnects while the provider
//! is still working does not cancel metering: the call finishes and is settled. It is also the
//! one place that counts the request in `soma_proxy_requests_total` (once, with its model when
//! known) and turns an error into the client's wire format.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::Request;
use axum::http::{HeaderMap, header};
use axum::response::Response;
use tracing::Instrument;

use crate::endpoint::Endpoint;
use crate::error::ProxyError;
use crate::state::AppState;
use crate::{brownout, forward, genai_span, request, reserve};

/// What a served request tells the metrics: its model, when the request named one.
pub struct Served {
    /// The response to send.
    pub response: Response,
    /// The model the request was sent with.
    pub model: Option<String>,
}

/// A failed request and its model, when known.
pub struct Failed {
    /// What went wrong.
    pub error: ProxyError,
    /// The model, when the request was read that far.
    pub model: Option<String>,
}

impl From<ProxyError> for Failed {
    fn from(error: ProxyError) -> Failed {
        Failed { error, model: None }
    }
}

/// Serves one request to `endpoint`.
pub async fn handle(state: Arc<AppState>, endpoint: Endpoint, req: Request) -> Response {
    let t0 = Instant::now();
    let outcome = match state.admit() {
        // Beyond the bound: refused at once, before anything is read.
        None => {
            // Demand all the same: the autoscaler must see what this replica turned away.
            let priority = req
                .headers()
                .get(soma_contract::load::PRIORITY_HEADER)
                .and_then(|v| soma_contract::load::Priority::parse(v.as_bytes()))
                .unwrap_or_default();
            if endpoint.metered() {
                state.load.refused(priority, false);
            }
            Err(Failed::from(ProxyError::Overloaded {
                limit: state.config.max_in_flight.get(),
            }))
        }
        Some(permit) => {
            let span = genai_span::open(
                endpoint,
                &state.config.provider,
                state.config.budget.as_deref(),
            );
            let task_state = state.clone();
            let task_span = span.clone();
            // Boxed: the task then holds a pointer, not the whole request state machine
            // (about 10 KiB) that would otherwise be copied into and out of it.
            let served = tokio::spawn(Box::pin(
                async move {
                    let result = serve(&task_state, endpoint, req, t0, permit).await;
                    if let Err(f) = &result {
                        if let ProxyError::Budget(refusal) = &f.error {
                            task_span.record(
                                "soma.budget.refused_by",
                                refusal.budget.to_string().as_str(),
                            );
                        }
                        genai_span::record_refusal(
                            &task_span,
                            f.error.label(),
                            f.error.status().as_u16(),
                        );
                    }
                    result
                }
                .instrument(span),
            ))
            .await;
            served.unwrap_or_else(|join| {
                tracing::error!(error = %join, "request task failed");
                Err(Failed::from(ProxyError::Internal(
                    "request task failed".into(),
                )))
            })
        }
    };
    // The one place a request is counted.
    let (response, model) = match outcome {
        Ok(served) => (served.response, served.model),
        Err(failed) => {
            let e = failed.error;
            state.metrics.error(e.label());
            // ProxyError's Display never includes the key, and its sources are library errors
            // about connections and files, which do not carry request headers.
            let source = std::error::Error::source(&e).map(|s| s.to_string());
            tracing::warn!(endpoint = endpoint.label(), reason = e.label(), error = %e, source, "request failed");
            (e.into_wire(endpoint.dialect()), failed.model)
        }
    };
    state.metrics.request(
        endpoint.label(),
        model.as_deref().unwrap_or(""),
        response.status().as_u16(),
    );
    response
}

/// The steps after admission.
async fn serve(
    state: &Arc<AppState>,
    endpoint: Endpoint,
    req: Request,
    t0: Instant,
    permit: crate::state::InFlight,
) -> Result<Served, Failed> {
    authenticate(state, req.headers())?;
    served_here(state, endpoint)?;
    // No key: refused before the body is read or a Budget reserved.
    if let Err(p) = state.keys.current() {
        return Err(ProxyError::CredentialsUnavailable(p).into());
    }
    let (parts, body) = req.into_parts();
    if !endpoint.metered() {
        let body = request::read_unmetered(state, &parts, body).await?;
        let response = forward::unmetered(state, endpoint, &parts, body).await?;
        return Ok(Served {
            response,
            model: None,
        });
    }
    let mut call = request::parse(state, endpoint, &parts, body).await?;
    brownout::apply(state, &mut call).map_err(|error| Failed {
        error,
        model: Some(call.model.clone()),
    })?;
    let model = Some(call.model.clone());
    // A model the price table lacks is the client's text, not a label value.
    let with_model = |error: ProxyError| Failed {
        model: model
            .clone()
            .filter(|_| !matches!(error, ProxyError::UnknownModel(_))),
        error,
    };
    let charge = reserve::reserve(state, endpoint, &mut call, permit)
        .await
        .map_err(with_model)?;
    let model = Some(charge.model.clone());
    let response = forward::metered(state, endpoint, &parts, call, charge, t0)
        .await
        .map_err(|error| Failed {
            error,
            model: model.clone(),
        })?;
    Ok(Served { response, model })
}

/// The agent presents the per-pod token as its API key (`Authorization: Bearer` or
/// `x-api-key`), compared in constant time.
pub(crate) fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<(), ProxyError> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    let ok = [bearer, api_key]
        .into_iter()
        .flatten()
        .any(|t| constant_time_eq(t.trim().as_bytes(), state.client_token.as_bytes()));
    if ok {
        Ok(())
    } else {
        Err(ProxyError::Unauthorized)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An endpoint of the other provider's API is not served.
fn served_here(state: &AppState, endpoint: Endpoint) -> Result<(), ProxyError> {
    let kind = state.config.provider.kind;
    if endpoint.served_by(kind) {
        Ok(())
    } else {
        Err(ProxyError::WrongProvider {
            path: endpoint.path().into(),
            provider: kind.as_str(),
        })
    }
}
