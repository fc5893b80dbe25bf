//! Soma's autoscaler inside the simulator: each tick's window becomes a [`LoadSignal`].
//!
//! The signal carries only what the metering sidecar can see — arrivals, completions with
//! their service latency and tokens, and what is in flight or waiting now. Soma never sees
//! the simulator's service model or pod start delay.

use crate::autoscaler::Autoscaler;
use crate::config::AutoscalerConfig;
use crate::error::Error;
use crate::signal::LoadSignal;
use crate::sim::engine::{Observation, Scaler};

/// [`Autoscaler`] driven by simulator observations.
#[derive(Debug, Clone)]
pub struct SomaScaler {
    autoscaler: Autoscaler,
    interval_s: f64,
    /// Ticks during which the decision carried a brown-out.
    pub brown_out_ticks: u32,
}

impl SomaScaler {
    /// Soma with `config`, stepping every `interval_s`, starting at `replicas`.
    pub fn new(config: AutoscalerConfig, interval_s: f64, replicas: u32) -> Result<Self, Error> {
        Ok(Self {
            autoscaler: Autoscaler::new(config, replicas)?,
            interval_s,
            brown_out_ticks: 0,
        })
    }
}

/// The load signal the operator would build for the same window.
pub fn signal(obs: &Observation) -> LoadSignal {
    LoadSignal {
        window_s: obs.window_s,
        requests: obs.arrivals,
        in_flight: obs.in_service + obs.waiting,
        waiting: obs.waiting,
        completed: obs.completed,
        latency_sum_s: obs.service_sum_s,
        latency_sq_sum_s2: obs.service_sq_sum_s2,
        latency_p95_s: None,
        input_tokens: obs.input_tokens,
        output_tokens: obs.output_tokens,
    }
}

impl Scaler for SomaScaler {
    fn name(&self) -> String {
        "soma".into()
    }

    fn interval_s(&self) -> f64 {
        self.interval_s
    }

    fn decide(&mut self, obs: &Observation) -> u32 {
        let d = self.autoscaler.step(obs.now_s, &signal(obs));
        if d.brown_out.is_some() {
            self.brown_out_ticks += 1;
        }
        d.desired_replicas
    }
}
