//! The outcome of one autoscaling step, shaped for an Agent's status.
//!
//! Every number that led to the replica count is kept, so `kubectl get agent -o yaml` can
//! answer "why this many replicas?" and "why is traffic being shed?" without logs.
//! Non-finite values (an unstable queue) are `None`, because JSON has no infinity.

use serde::{Deserialize, Serialize};

use crate::config::BrownOutAction;
use crate::estimate::Estimate;

/// Which rule set the replica count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Reason {
    /// Conductance (sustained flow) asked for more than the queueing floor.
    Conductance,
    /// The Erlang-C floor asked for at least as much as conductance.
    ErlangFloor,
    /// A peak of offered load from the last `floorHoldS` is still held.
    FloorHold,
    /// Clamped up to `minReplicas`.
    MinReplicas,
    /// Clamped down to `maxReplicas` or the Budget's cap.
    Cap,
    /// No traffic and no queued work for the idle period: scaled to zero.
    Idle,
    /// Nothing asks for a replica, but the agent (`min_replicas` 0) has not been idle for
    /// `idle_to_zero_s` yet: one replica is kept until it has.
    IdleHold,
    /// Queued work that the load signal cannot show (the operator counts the Soma Jobs that
    /// reference the Agent) keeps at least one replica: woken from zero, or kept up.
    QueuedWork,
    /// A scale-down was held because pods started from zero are still warming up.
    ColdStartHold,
    /// A scale-down was held because the last scale-up was too recent (anti-flapping).
    ReversalHold,
}

/// Why a brown-out is in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BrownOutCause {
    /// No replica count up to `maxReplicas` meets the target.
    MaxReplicas,
    /// The Budget forbids the replicas that would meet the target.
    Budget,
}

/// Traffic that must be shed or downgraded because the target cannot be met.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BrownOut {
    /// What stands in the way.
    pub cause: BrownOutCause,
    /// What happens to the excess traffic.
    pub action: BrownOutAction,
    /// Share of arriving traffic (lowest priority first) to shed or downgrade, in `[0, 1]`,
    /// so that the rest meets `ρ ≤ ρmax` and the wait target on the allowed replicas.
    pub fraction: f64,
    /// Replicas that would meet the target, when some count (≤ 100 000) does.
    pub needed_replicas: Option<u32>,
    /// Replicas allowed.
    pub allowed_replicas: u32,
    /// A sentence for the Agent's status condition.
    pub message: String,
}

/// One step's decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// When the step ran, seconds on the caller's clock.
    pub at_s: f64,
    /// Replicas the workload should have now.
    pub desired_replicas: u32,
    /// Replicas decided by the previous step.
    pub previous_replicas: u32,
    /// Which rule set `desired_replicas`.
    pub reason: Reason,
    /// Conductance `C` of the agent's route, in replicas.
    pub conductance: f64,
    /// `⌈C⌉`.
    pub conductance_replicas: u32,
    /// Smallest replica count meeting `ρ ≤ ρmax` and the wait target (with headroom) at
    /// `sizing_arrival_rate` (capped at the allowed maximum).
    pub erlang_floor: u32,
    /// Smallest replica count on which the highest offered load (λ·S) of the last
    /// `floorHoldS` would meet the wait target (with headroom) at `ρ < 1`; never below
    /// `erlang_floor`.
    pub held_floor: u32,
    /// Arrival rate and service time the floor was computed from.
    pub estimate: Estimate,
    /// Arrival rate used for the floor, requests per second: the larger of the EMA and the
    /// last window less two Poisson standard deviations, plus the backlog to drain
    /// (`waiting / backlogDrainS`).
    pub sizing_arrival_rate: f64,
    /// Predicted utilisation at `desired_replicas`; `None` when it has no finite value.
    pub utilisation: Option<f64>,
    /// Predicted Erlang-C probability of waiting at `desired_replicas`.
    pub p_wait: f64,
    /// Predicted wait quantile (P95) at `desired_replicas`, seconds; `None` when unstable.
    pub p95_wait_s: Option<f64>,
    /// Set while the target cannot be met.
    pub brown_out: Option<BrownOut>,
}

impl Decision {
    /// Whether this step changed the replica count.
    pub fn is_scaling(&self) -> bool {
        self.desired_replicas != self.previous_replicas
    }
}
