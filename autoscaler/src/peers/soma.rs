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

/// Where the autoscaler's signal comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SignalView {
    /// The queue in front of the pods is visible: arrivals as they join it, and its length
    /// as `waiting` (the simulator's comparison with HPA and KEDA).
    #[default]
    Queue,
    /// Only what a sidecar inside each pod sees when the queue is in front of the pods: a
    /// request "arrives" when it starts service and nothing is ever waiting
    /// (`LoadReport::waiting` is 0). This is what the operator reads when the agent does not
    /// report its queue.
    Sidecar,
    /// The sidecars' view plus the queue in front of the pods as the agents report it to
    /// their sidecars (`PUT /v1/queue`): arrivals as requests start service, and the queue's
    /// length as `waiting`. What the operator reads from agents that report their queue.
    Reported,
}

/// [`Autoscaler`] driven by simulator observations.
#[derive(Debug, Clone)]
pub struct SomaScaler {
    autoscaler: Autoscaler,
    interval_s: f64,
    view: SignalView,
    /// Ticks during which the decision carried a brown-out.
    pub brown_out_ticks: u32,
}

impl SomaScaler {
    /// Soma with `config`, stepping every `interval_s`, starting at `replicas`.
    pub fn new(config: AutoscalerConfig, interval_s: f64, replicas: u32) -> Result<Self, Error> {
        Ok(Self {
            autoscaler: Autoscaler::new(config, replicas)?,
            interval_s,
            view: SignalView::Queue,
            brown_out_ticks: 0,
        })
    }

    /// The same scaler fed the signal of `view`.
    pub fn with_view(self, view: SignalView) -> Self {
        Self { view, ..self }
    }
}

/// The load signal of `obs` as `view` sees it.
pub fn signal_as(view: SignalView, obs: &Observation) -> LoadSignal {
    match view {
        SignalView::Queue => signal(obs),
        SignalView::Sidecar => LoadSignal {
            requests: obs.started,
            in_flight: obs.in_service,
            waiting: 0,
            ..signal(obs)
        },
        SignalView::Reported => LoadSignal {
            requests: obs.started,
            in_flight: obs.in_service,
            ..signal(obs)
        },
    }
}

/// The load signal the operator would build for the same window, were the queue in front
/// of the pods visible to it ([`SignalView::Queue`]).
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
        let d = self.autoscaler.step(obs.now_s, &signal_as(self.view, obs));
        if d.brown_out.is_some() {
            self.brown_out_ticks += 1;
        }
        d.desired_replicas
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_view_sees_what_its_source_can() {
        let obs = Observation {
            window_s: 15.0,
            arrivals: 40,
            started: 12,
            in_service: 4,
            waiting: 28,
            ..Observation::default()
        };
        let queue = signal_as(SignalView::Queue, &obs);
        assert_eq!(
            (queue.requests, queue.in_flight, queue.waiting),
            (40, 32, 28)
        );
        let sidecar = signal_as(SignalView::Sidecar, &obs);
        assert_eq!(
            (sidecar.requests, sidecar.in_flight, sidecar.waiting),
            (12, 4, 0)
        );
        let reported = signal_as(SignalView::Reported, &obs);
        assert_eq!(
            (reported.requests, reported.in_flight, reported.waiting),
            (12, 4, 28)
        );
    }
}
