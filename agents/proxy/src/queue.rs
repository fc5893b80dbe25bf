//! The agent's own queue, reported to its sidecar (`PUT /v1/queue`, the contract's
//! [`QueueReport`]) and passed on to the operator's autoscaler as `waiting` in `GET /load`.
//!
//! ```text
//!  agent ─PUT /v1/queue {"waiting": N}─► authenticate ─► LoadMeter::queue_reported (counts for queueReportTtlMs)
//!  operator ─GET /load─► LoadReport.waiting ─► Autoscaler sizes for λ + waiting / backlogDrainS
//! ```
//!
//! The sidecar sees the calls an agent makes, not the work waiting in front of the agent, so
//! a backlog would otherwise reach the autoscaler only as the throughput of the replicas
//! already running. A report is not traffic: it is not counted in
//! `soma_proxy_requests_total`; a refused one is counted in `soma_proxy_errors_total`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use soma_contract::load::QueueReport;
use soma_metering::wire::Dialect;

use crate::error::ProxyError;
use crate::state::AppState;

pub use soma_contract::load::QUEUE_PATH as PATH;

/// `PUT /v1/queue`: 204 when the report is taken; the error in OpenAI's format otherwise,
/// and nothing changes.
pub async fn handle(State(state): State<Arc<AppState>>, req: Request) -> Response {
    match take(&state, req).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => {
            state.metrics.error(e.label());
            tracing::warn!(endpoint = "queue", reason = e.label(), error = %e, "queue report refused");
            e.into_wire(Dialect::OpenAi)
        }
    }
}

async fn take(state: &AppState, req: Request) -> Result<(), ProxyError> {
    crate::handler::authenticate(state, req.headers())?;
    let (parts, body) = req.into_parts();
    let bytes = crate::request::read_json_body(state, &parts, body).await?;
    let report: QueueReport = serde_json::from_slice(&bytes).map_err(|e| {
        ProxyError::Invalid(format!(
            "a queue report is {{\"waiting\": <requests waiting, a non-negative integer>}}: {e}"
        ))
    })?;
    let ttl = Duration::from_millis(state.config.queue_report_ttl_ms.get());
    state.load.queue_reported(report.waiting, ttl);
    Ok(())
}
