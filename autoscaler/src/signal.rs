//! The load signal: what one observation window of an agent's traffic looked like.
//!
//! The sidecars' load reports (`soma_contract::load::LoadReport::since`, merged over an
//! Agent's ready replicas by the operator's scaling loop) give one [`LoadSignal`] per step. The simulator builds the same struct from its event log, so the autoscaler cannot
//! tell them apart.

use serde::{Deserialize, Serialize};

/// Traffic observed over one window ending at the step's `now`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadSignal {
    /// Length of the window, seconds (normally the time since the previous step).
    pub window_s: f64,
    /// Requests that arrived during the window.
    pub requests: u64,
    /// Requests accepted but not finished at the end of the window (in service + waiting).
    pub in_flight: u64,
    /// Of `in_flight`, those still waiting for a free slot.
    pub waiting: u64,
    /// Requests that finished during the window.
    pub completed: u64,
    /// Sum of the service latency (start of service to finish, excluding queueing) of the
    /// requests completed in the window, seconds.
    pub latency_sum_s: f64,
    /// Sum of the squares of those service latencies, seconds² (gives their variability).
    pub latency_sq_sum_s2: f64,
    /// P95 of the end-to-end latency of the requests completed in the window, if measured.
    pub latency_p95_s: Option<f64>,
    /// Prompt tokens of the requests completed in the window.
    pub input_tokens: u64,
    /// Generated tokens of the requests completed in the window.
    pub output_tokens: u64,
}

impl LoadSignal {
    /// Arrival rate over the window, requests per second.
    pub fn arrival_rate(&self) -> f64 {
        if self.window_s > 0.0 {
            self.requests as f64 / self.window_s
        } else {
            0.0
        }
    }

    /// Whether the window saw any traffic at all.
    pub fn is_active(&self) -> bool {
        self.requests > 0 || self.in_flight > 0
    }
}
