//! The operator's HTTP server: `/healthz` (the process is alive), `/readyz` (it has started
//! and is either leading or standing by), `/metrics` (Prometheus text format).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::metrics::Metrics;

/// Where the operator is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Starting up.
    Starting = 0,
    /// Waiting for the leader lease.
    Standby = 1,
    /// Holding the lease and reconciling.
    Leading = 2,
    /// Shutting down.
    Stopping = 3,
}

/// State the handlers read.
#[derive(Debug, Default)]
pub struct Health {
    phase: AtomicU8,
}

impl Health {
    /// Records a new phase.
    pub fn set(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::SeqCst);
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            1 => Phase::Standby,
            2 => Phase::Leading,
            3 => Phase::Stopping,
            _ => Phase::Starting,
        }
    }
}

/// Shared state of the HTTP server.
#[derive(Clone, Debug)]
pub struct HttpState {
    /// Operator phase.
    pub health: Arc<Health>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
}

/// The router; tests drive it in process.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<HttpState>) -> Response {
    match state.health.phase() {
        Phase::Leading => (StatusCode::OK, "leading").into_response(),
        Phase::Standby => (StatusCode::OK, "standby").into_response(),
        Phase::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response(),
        Phase::Stopping => (StatusCode::SERVICE_UNAVAILABLE, "stopping").into_response(),
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    match state.metrics.encode() {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed").into_response(),
    }
}
