//! The per-Agent autoscaler: estimates → conductance and Erlang-C floors → guarded decision.
//!
//! ```text
//!  LoadSignal ─► Estimator ─► λ̂, Ŝ, c² ─┬─► flow = λ̂Ŝ/slots ─► Conductance C ─────────► ⌈C⌉ ──┐
//!                                      ├─► λ↑ = max(λ̂, (n − 2√n)/Δt)                         │
//!                                      │    ├─► λ↑ + waiting/drain ─► Erlang-C (G/G/k),       │
//!                                      │    │     ρ ≤ ρmax, P95 ≤ headroom·target ─► floor ───┤
//!                                      │    └─► highest λ↑·Ŝ of floor_hold_s and highest      │
//!                                      │        (λ↑ + waiting/drain)·Ŝ of drained_hold_s ─►   │
//!                                      │        Erlang-C, ρ < 1, P95 ≤ headroom·target ─►     │
//!                                      │        held floor ───────────────────────────────────┤
//!                                      ▼                                                      ▼
//!             desired = clamp(max(⌈C⌉, floor, held floor), min, min(max, budget cap))
//!             (budget cap: the replicas the Budgets' rate caps can keep busy, set_budget_rate)
//!             → idle (no traffic, no queued work) for idle_to_zero_s? 0
//!             → queued work (set_queued_work) and 0? 1
//!             → scale-down held during cold start and for reversal_hold_s after a scale-up
//!             → brown-out when the floor could not be met within the cap
//! ```
//!
//! `c²` is both variabilities: of service time (`c_s²`) and of arrivals (`c_a²`, burstiness);
//! the G/G/k wait scales with `(c_a² + c_s²)/2` ([`crate::erlang`]).
//!
//! Three rules keep noise from buying replicas: a window raises the arrival rate only by what
//! it shows beyond Poisson noise; a backlog sizes the step that sees it and is held only for
//! `reversal_hold_s + cold_start_hold_s`, not for `floor_hold_s`;
//! and the hold remembers offered load (not a replica count computed from noisy inputs) and
//! sizes it to *meet the target if it returns*, not to the comfortable `ρmax` plan, which
//! the floor restores within one pod start once it does.
//!
//! Scale-ups are never delayed: a queue that is too small costs SLO at once, while a queue
//! that is too large for another minute only costs replica-seconds.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::conductance::Conductance;
use crate::config::{AutoscalerConfig, BrownOutAction};
use crate::decision::{BrownOut, BrownOutCause, Decision, Reason};
use crate::erlang::SizingRequest;
use crate::error::Error;
use crate::estimate::Estimator;
use crate::signal::LoadSignal;

/// The most traffic the Agent's Budgets let through per second (their `requestsPerMinute` and
/// `tokensPerMinute` caps, the smallest along the Budget chain): replicas beyond what that
/// traffic keeps busy would only see the Budget refuse the calls they could take.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BudgetRate {
    /// Requests per second.
    pub requests_per_s: Option<f64>,
    /// Tokens (prompt and generated) per second; turned into requests with the tokens per
    /// request the load signal shows.
    pub tokens_per_s: Option<f64>,
}

/// Records `value` at `now_s` in `peaks`, forgets what is older than `horizon_s`, and
/// returns the highest value left.
fn remember_peak(peaks: &mut VecDeque<(f64, f64)>, now_s: f64, value: f64, horizon_s: f64) -> f64 {
    peaks.push_back((now_s, value));
    while peaks.front().is_some_and(|&(t, _)| now_s - t > horizon_s) {
        peaks.pop_front();
    }
    peaks.iter().map(|&(_, v)| v).fold(0.0, f64::max)
}

/// The `(time, value)` pairs of a snapshot whose both halves are finite numbers.
fn finite_pairs(pairs: Vec<(f64, f64)>) -> VecDeque<(f64, f64)> {
    pairs
        .into_iter()
        .filter(|(t, v)| t.is_finite() && v.is_finite())
        .collect()
}

/// Largest replica count the brown-out message searches when reporting what would be needed.
const NEEDED_SEARCH_LIMIT: u32 = 100_000;

/// What an [`Autoscaler`] remembers between steps ([`Autoscaler::snapshot`],
/// [`Autoscaler::resume`]): serde, camelCase, finite numbers only (JSON has no infinity).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// Replicas decided by the last step.
    pub replicas: u32,
    /// Arrival-rate and service-time estimates.
    pub estimator: Estimator,
    /// The conductance of the Agent's route.
    pub conductance: Conductance,
    /// When traffic was last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_active_s: Option<f64>,
    /// When the last scale-up was decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_up_s: Option<f64>,
    /// Until when a scale-down is held after a start from zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start_until_s: Option<f64>,
    /// `(time, offered load)` of the last `floorHoldS`.
    #[serde(default)]
    pub loads: Vec<(f64, f64)>,
    /// `(time, offered load with the backlog drained)` of the last drained hold
    /// ([`AutoscalerConfig::drained_hold_s`]); absent in a snapshot from before it existed.
    #[serde(default)]
    pub drained_loads: Vec<(f64, f64)>,
    /// Tokens per completed request, as last measured (for a Budget's `tokensPerMinute`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_request: Option<f64>,
}

/// One Agent's autoscaler. Feed it one [`LoadSignal`] per step.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    config: AutoscalerConfig,
    estimator: Estimator,
    conductance: Conductance,
    replicas: u32,
    budget_rate: BudgetRate,
    /// The replicas the Budget rate allows, as of the last step.
    budget_cap: Option<u32>,
    tokens_per_request: Option<f64>,
    queued_work: u64,
    last_active_s: Option<f64>,
    last_scale_up_s: Option<f64>,
    cold_start_until_s: f64,
    /// `(time, offered load)` of the last `floor_hold_s`.
    loads: VecDeque<(f64, f64)>,
    /// `(time, offered load with the backlog drained)` of the last drained hold.
    drained_loads: VecDeque<(f64, f64)>,
}

impl Autoscaler {
    /// An autoscaler that believes the workload currently has `replicas` replicas.
    pub fn new(config: AutoscalerConfig, replicas: u32) -> Result<Self, Error> {
        config.validate()?;
        Ok(Self {
            estimator: Estimator::new(config.estimator),
            config,
            conductance: Conductance::default(),
            replicas,
            budget_rate: BudgetRate::default(),
            budget_cap: None,
            tokens_per_request: None,
            queued_work: 0,
            last_active_s: None,
            last_scale_up_s: None,
            cold_start_until_s: f64::NEG_INFINITY,
            loads: VecDeque::new(),
            drained_loads: VecDeque::new(),
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &AutoscalerConfig {
        &self.config
    }

    /// Replicas decided by the last step.
    pub fn replicas(&self) -> u32 {
        self.replicas
    }

    /// What the autoscaler remembers between steps, to be kept where it survives a restart
    /// (the operator keeps it in the Agent's status), so that a new leader continues where the
    /// old one stopped instead of starting from the priors with a jump in replicas.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            replicas: self.replicas,
            estimator: self.estimator.clone(),
            conductance: self.conductance,
            last_active_s: self.last_active_s,
            last_scale_up_s: self.last_scale_up_s,
            cold_start_until_s: self
                .cold_start_until_s
                .is_finite()
                .then_some(self.cold_start_until_s),
            loads: self.loads.iter().copied().collect(),
            drained_loads: self.drained_loads.iter().copied().collect(),
            tokens_per_request: self.tokens_per_request,
        }
    }

    /// An autoscaler with `config` that continues from `snapshot` (taken with the same clock).
    /// The estimator's settings come from `config`, not from the snapshot, so an edited
    /// setting applies at once.
    pub fn resume(config: AutoscalerConfig, snapshot: Snapshot) -> Result<Self, Error> {
        let mut scaler = Self::new(config, snapshot.replicas)?;
        scaler.estimator = snapshot.estimator.with_params(config.estimator);
        scaler.conductance = snapshot.conductance;
        scaler.last_active_s = snapshot.last_active_s;
        scaler.tokens_per_request = snapshot
            .tokens_per_request
            .filter(|t| t.is_finite() && *t > 0.0);
        scaler.last_scale_up_s = snapshot.last_scale_up_s;
        scaler.cold_start_until_s = snapshot.cold_start_until_s.unwrap_or(f64::NEG_INFINITY);
        scaler.loads = finite_pairs(snapshot.loads);
        scaler.drained_loads = finite_pairs(snapshot.drained_loads);
        Ok(scaler)
    }

    /// Sets the most traffic the agent's Budgets let through ([`BudgetRate`]); each step caps
    /// the replicas at the Erlang-C size of that traffic (at least one), so that a brown-out,
    /// lowest priority first, takes what the Budget would otherwise refuse at random.
    pub fn set_budget_rate(&mut self, rate: BudgetRate) {
        self.budget_rate = rate;
    }

    /// The replicas the Budget rate allows at the current estimates, if it sets a bound.
    fn budget_cap(&self, request: &SizingRequest) -> Option<u32> {
        let by_requests = self.budget_rate.requests_per_s;
        let by_tokens = self
            .budget_rate
            .tokens_per_s
            .zip(self.tokens_per_request)
            .map(|(tokens, per)| tokens / per);
        let rate = match (by_requests, by_tokens) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        if !rate.is_finite() || rate < 0.0 {
            return None;
        }
        let sized = SizingRequest {
            arrival_rate: rate,
            ..*request
        };
        let replicas = match sized.smallest(self.config.max_replicas) {
            Ok(s) | Err(s) => s.replicas,
        };
        Some(replicas.max(1))
    }

    /// Sets the work queued for the agent outside its load signal, such as tasks waiting for
    /// it or running on it (the operator counts the Soma Jobs that reference the Agent). While
    /// it is above zero the agent counts as active (the idle timer restarts) and has at least
    /// one replica ([`Reason::QueuedWork`]): this is what wakes an agent scaled to zero, whose
    /// load signal is empty because it has no pods to measure.
    pub fn set_queued_work(&mut self, items: u64) {
        self.queued_work = items;
    }

    /// Tells the autoscaler that something else changed the replica count (a user edit).
    pub fn observe_replicas(&mut self, replicas: u32) {
        self.replicas = replicas;
    }

    /// Runs one step at `now_s` (seconds on any monotonic clock) with the window ending now.
    pub fn step(&mut self, now_s: f64, signal: &LoadSignal) -> Decision {
        let cfg = self.config;
        let estimate = self.estimator.observe(signal);
        let slots = cfg.slots_per_replica;

        let flow = estimate.arrival_rate * estimate.service_time / f64::from(slots);
        let conductance = self
            .conductance
            .update(&cfg.conductance, signal.window_s, flow);
        let conductance_replicas = ceil_replicas(conductance);

        if signal.completed > 0 && signal.input_tokens + signal.output_tokens > 0 {
            self.tokens_per_request =
                Some((signal.input_tokens + signal.output_tokens) as f64 / signal.completed as f64);
        }
        // A window counts as a rise only beyond its own Poisson noise: steady traffic then
        // sizes on the EMA, a burst of 100+ requests in a window is acted on at once.
        let arrival_rate = estimate
            .arrival_rate
            .max(poisson_lower_bound(signal.requests, signal.window_s));
        // The backlog is drained, not merely kept from growing; it is a transient, so it
        // sizes this step and is held only briefly (below).
        let sizing_arrival_rate = arrival_rate + signal.waiting as f64 / cfg.backlog_drain_s;
        let request = SizingRequest {
            arrival_rate: sizing_arrival_rate,
            service_time: estimate.service_time,
            service_scv: estimate.service_scv,
            arrival_scv: estimate.arrival_scv,
            slots_per_replica: slots,
            rho_max: cfg.rho_max,
            wait_target: cfg.wait_target_s * cfg.wait_headroom,
            quantile: cfg.wait_quantile,
        };
        self.budget_cap = self.budget_cap(&request);
        let cap = self
            .budget_cap
            .map_or(cfg.max_replicas, |b| b.min(cfg.max_replicas));
        let (erlang_floor, brown_out) = match request.smallest(cap) {
            Ok(s) => (s.replicas, None),
            Err(s) => (s.replicas, Some(self.brown_out(&request, cap))),
        };

        // Held: the highest offered load (λ·S, Erlangs) of the last floor_hold_s, sized so
        // that it would meet the wait target if it came back — with no utilisation ceiling:
        // ρmax is the margin of the plan; the hold only has to carry a returning peak until
        // the pods it triggers are Ready. The load it took to drain a backlog is held too, but
        // only for drained_hold_s: long enough for a burst that returns as the reversal hold
        // ends, not for floor_hold_s (a cold start's backlog would keep the cap for minutes).
        let held_load = remember_peak(
            &mut self.loads,
            now_s,
            arrival_rate * estimate.service_time,
            cfg.floor_hold_s,
        )
        .max(remember_peak(
            &mut self.drained_loads,
            now_s,
            sizing_arrival_rate * estimate.service_time,
            cfg.drained_hold_s(),
        ));
        let held = SizingRequest {
            arrival_rate: held_load / estimate.service_time,
            rho_max: 1.0,
            ..request
        };
        let held_floor = match held.smallest(cap) {
            Ok(s) | Err(s) => s.replicas,
        }
        .max(erlang_floor);

        let busy = u32::from(signal.in_flight > 0);
        let wanted = conductance_replicas.max(held_floor).max(busy);
        let mut reason = if conductance_replicas > held_floor {
            Reason::Conductance
        } else if held_floor > erlang_floor {
            Reason::FloorHold
        } else {
            Reason::ErlangFloor
        };
        let mut desired = wanted;
        if desired < cfg.min_replicas {
            desired = cfg.min_replicas;
            reason = Reason::MinReplicas;
        }
        if desired > cap {
            desired = cap;
            reason = Reason::Cap;
        }

        let queued = self.queued_work > 0;
        if signal.is_active() || queued || self.last_active_s.is_none() {
            self.last_active_s = Some(now_s);
        }
        let idle_for = self.last_active_s.map_or(0.0, |t| now_s - t);
        let idle = cfg.min_replicas == 0 && cfg.idle_to_zero_s.is_some_and(|t| idle_for >= t);
        if idle {
            desired = 0;
            reason = Reason::Idle;
        }
        if desired == 0 && queued {
            desired = 1;
            reason = Reason::QueuedWork;
        } else if desired == 0 && !idle {
            // Only the idle rule takes an agent to zero: an estimate that has reached zero
            // (no traffic yet) does not skip the idle period.
            desired = 1;
            reason = Reason::IdleHold;
        }

        if desired < self.replicas {
            if now_s < self.cold_start_until_s {
                desired = self.replicas;
                reason = Reason::ColdStartHold;
            } else if self
                .last_scale_up_s
                .is_some_and(|t| now_s - t < cfg.reversal_hold_s)
            {
                desired = self.replicas;
                reason = Reason::ReversalHold;
            }
        }
        // The Budget's cap is a hard limit: holds never keep replicas above it.
        if desired > cap {
            desired = cap;
            reason = Reason::Cap;
        }
        if desired > self.replicas {
            self.last_scale_up_s = Some(now_s);
            if self.replicas == 0 {
                self.cold_start_until_s = now_s + cfg.cold_start_hold_s;
            }
        }

        let previous_replicas = self.replicas;
        self.replicas = desired;
        let at = request.at(desired);
        Decision {
            at_s: now_s,
            desired_replicas: desired,
            previous_replicas,
            reason,
            conductance,
            conductance_replicas,
            erlang_floor,
            held_floor,
            estimate,
            sizing_arrival_rate,
            utilisation: finite(at.utilisation),
            p_wait: at.p_wait,
            p95_wait_s: finite(at.wait_quantile),
            brown_out,
        }
    }

    fn brown_out(&self, request: &SizingRequest, cap: u32) -> BrownOut {
        let cfg = &self.config;
        let needed_replicas = request
            .smallest(NEEDED_SEARCH_LIMIT)
            .ok()
            .map(|s| s.replicas);
        // Largest arrival rate the allowed replicas can serve within target, by bisection.
        let (mut lo, mut hi) = (0.0, request.arrival_rate);
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            let trial = SizingRequest {
                arrival_rate: mid,
                ..*request
            };
            if trial.at(cap).meets_target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let fraction = if request.arrival_rate > 0.0 {
            (1.0 - lo / request.arrival_rate).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let cause = if self.budget_cap.is_some_and(|b| b < cfg.max_replicas) {
            BrownOutCause::Budget
        } else {
            BrownOutCause::MaxReplicas
        };
        let limit = match cause {
            BrownOutCause::Budget => format!("the Budget allows only {cap} replicas"),
            BrownOutCause::MaxReplicas => format!("maxReplicas is {cap}"),
        };
        let needed = needed_replicas.map_or_else(
            || format!("more than {NEEDED_SEARCH_LIMIT} replicas"),
            |n| format!("{n} replicas"),
        );
        let verb = match cfg.brown_out_action {
            BrownOutAction::Shed => "shedding",
            BrownOutAction::Downgrade => "downgrading",
        };
        let message = format!(
            "P{q:.0} wait ≤ {t}s at {rate:.2} req/s × {s:.2}s needs {needed}, but {limit}; \
             {verb} {pct:.0}% of lowest-priority traffic",
            q = cfg.wait_quantile * 100.0,
            t = cfg.wait_target_s,
            rate = request.arrival_rate,
            s = request.service_time,
            pct = fraction * 100.0,
        );
        BrownOut {
            cause,
            action: cfg.brown_out_action,
            fraction,
            needed_replicas,
            allowed_replicas: cap,
            message,
        }
    }
}

/// The window's arrival rate less two Poisson standard deviations (`(n − 2√n) / Δt`): a
/// rate the window shows beyond sampling noise.
pub fn poisson_lower_bound(requests: u64, window_s: f64) -> f64 {
    if window_s <= 0.0 {
        return 0.0;
    }
    let n = requests as f64;
    ((n - 2.0 * n.sqrt()).max(0.0)) / window_s
}

fn ceil_replicas(c: f64) -> u32 {
    // A hair of tolerance keeps C = 3.0000000001 from asking for a fourth replica.
    let r = (c - 1e-6).ceil();
    if r.is_finite() && r > 0.0 {
        r.min(f64::from(u32::MAX)) as u32
    } else {
        0
    }
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(requests: u64, service_s: f64) -> LoadSignal {
        LoadSignal {
            window_s: 15.0,
            requests,
            in_flight: 0,
            waiting: 0,
            completed: requests,
            latency_sum_s: requests as f64 * service_s,
            ..LoadSignal::default()
        }
    }

    #[test]
    fn a_resumed_autoscaler_decides_as_the_one_it_was_taken_from() {
        let mut a = scaler();
        for (i, n) in [30, 90, 150, 150, 60].into_iter().enumerate() {
            a.step(15.0 * (i as f64 + 1.0), &window(n, 1.0));
        }
        let json = serde_json::to_string(&a.snapshot()).expect("serializes");
        let snapshot: Snapshot = serde_json::from_str(&json).expect("deserializes");
        let mut b = Autoscaler::resume(AutoscalerConfig::default(), snapshot).expect("valid");
        for (i, n) in [10, 0, 0, 200].into_iter().enumerate() {
            let now = 90.0 + 15.0 * i as f64;
            let (da, db) = (a.step(now, &window(n, 1.0)), b.step(now, &window(n, 1.0)));
            // The decision is the same; an estimate may differ in its last bit, because
            // serde_json (without `float_roundtrip`) may read a float back one ulp away.
            assert_eq!(
                (
                    da.desired_replicas,
                    da.reason,
                    da.erlang_floor,
                    da.held_floor
                ),
                (
                    db.desired_replicas,
                    db.reason,
                    db.erlang_floor,
                    db.held_floor
                ),
            );
            assert_eq!(da.conductance_replicas, db.conductance_replicas);
            let close = |x: f64, y: f64| (x - y).abs() <= 1e-9 * x.abs().max(1.0);
            assert!(
                close(da.estimate.arrival_scv, db.estimate.arrival_scv)
                    && close(da.estimate.arrival_rate, db.estimate.arrival_rate)
                    && close(da.conductance, db.conductance),
                "{da:?} {db:?}"
            );
        }
        // A fresh one (a leader that forgot) would not: it starts from the priors.
        let mut fresh = Autoscaler::new(AutoscalerConfig::default(), a.replicas()).expect("valid");
        assert_ne!(
            a.step(150.0, &window(20, 1.0)).desired_replicas,
            fresh.step(150.0, &window(20, 1.0)).desired_replicas
        );
    }

    fn scaler() -> Autoscaler {
        Autoscaler::new(AutoscalerConfig::default(), 1).expect("valid")
    }

    #[test]
    fn steady_load_lands_on_the_erlang_floor_and_meets_target() {
        let mut a = scaler();
        let mut last = None;
        for i in 0..200 {
            last = Some(a.step(15.0 * f64::from(i), &window(150, 1.0)));
        }
        let d = last.expect("stepped");
        // 10 req/s × 1 s = 10 Erlangs: ρ ≤ 0.7 needs 15 replicas, P95 ≤ 2 s is then met.
        assert_eq!(d.erlang_floor, 15);
        assert_eq!(d.desired_replicas, 15);
        assert!(d.utilisation.expect("finite") <= 0.7);
        assert!(d.p95_wait_s.expect("finite") <= 2.0);
        assert!(d.brown_out.is_none());
        // Conductance converged to α·flow/β = 10 / 0.7.
        assert!(
            (d.conductance - 10.0 / 0.7).abs() < 0.01,
            "{}",
            d.conductance
        );
    }

    #[test]
    fn bursts_scale_up_at_once_hold_the_peak_load_then_come_down() {
        let mut a = scaler();
        let cfg = *a.config();
        let mut t = 0.0;
        for _ in 0..80 {
            a.step(t, &window(15, 1.0));
            t += 15.0;
        }
        let base = a.replicas();
        let burst = a.step(t, &window(600, 1.0));
        let burst_at = t;
        assert!(burst.desired_replicas > 3 * base, "{burst:?}");
        t += 15.0;
        let mut seen = vec![];
        let mut held_seen = None;
        while t < burst_at + cfg.floor_hold_s + 1_200.0 {
            let d = a.step(t, &window(15, 1.0));
            let since = t - burst_at;
            if since < cfg.reversal_hold_s {
                assert_eq!(d.desired_replicas, burst.desired_replicas, "at +{since}");
                assert_eq!(d.reason, Reason::ReversalHold);
            } else if since <= cfg.floor_hold_s {
                // The burst's load is held: enough replicas to meet the wait target if it
                // came back, fewer than the ρmax plan the burst itself was sized to.
                assert_eq!(d.reason, Reason::FloorHold, "at +{since}");
                assert!(d.desired_replicas > base && d.desired_replicas < burst.desired_replicas);
                held_seen.get_or_insert(d.held_floor);
            }
            seen.push(d.desired_replicas);
            t += 15.0;
        }
        assert!(held_seen.is_some());
        assert!(seen.windows(2).all(|w| w[1] <= w[0]), "{seen:?}");
        assert_eq!(*seen.last().expect("steps"), base);
    }

    #[test]
    fn the_held_floor_carries_the_peak_load_within_the_wait_target() {
        // Property over a table of peaks: after the peak has passed, the held floor is the
        // smallest count on which the peak's offered load meets the wait target at ρ < 1.
        for (base, peak, service) in [
            (15, 600, 1.0),
            (30, 300, 0.5),
            (5, 150, 3.0),
            (60, 900, 0.8),
        ] {
            let cfg = AutoscalerConfig {
                reversal_hold_s: 0.0,
                ..AutoscalerConfig::default()
            };
            let mut a = Autoscaler::new(cfg, 1).expect("valid");
            let mut t = 0.0;
            for _ in 0..80 {
                a.step(t, &window(base, service));
                t += 15.0;
            }
            let p = a.step(t, &window(peak, service));
            t += 15.0;
            let d = a.step(t, &window(base, service));
            let peak_load = p.estimate.arrival_rate.max(poisson_lower_bound(peak, 15.0))
                * p.estimate.service_time;
            let want = SizingRequest {
                arrival_rate: peak_load / d.estimate.service_time,
                service_time: d.estimate.service_time,
                service_scv: d.estimate.service_scv,
                arrival_scv: d.estimate.arrival_scv,
                slots_per_replica: 1,
                rho_max: 1.0,
                wait_target: cfg.wait_target_s * cfg.wait_headroom,
                quantile: cfg.wait_quantile,
            }
            .smallest(cfg.max_replicas)
            .expect("reachable")
            .replicas;
            assert_eq!(d.held_floor, want, "base {base} peak {peak} S {service}");
            assert_eq!(d.desired_replicas, want);
            assert_eq!(d.reason, Reason::FloorHold);
            // It is below the ρmax plan of the peak and above the base's plan.
            assert!(
                want < p.erlang_floor && want > d.erlang_floor,
                "{want} {p:?}"
            );
        }
    }

    #[test]
    fn noise_within_poisson_bounds_does_not_raise_the_floor() {
        // Windows alternating 60 ± √60 requests (Poisson's own spread): the floor sizes on the
        // EMA as for Poisson arrivals, and the held floor does not climb to the windows' highs.
        let mut a = scaler();
        let noisy = [60, 68, 52, 68, 60, 52, 68, 60];
        let mut t = 0.0;
        let mut last = None;
        for i in 0..400 {
            last = Some(a.step(t, &window(noisy[i % noisy.len()], 2.0)));
            t += 15.0;
        }
        let d = last.expect("stepped");
        let steady = SizingRequest {
            arrival_rate: 4.0 * 1.01,
            service_time: 2.0,
            service_scv: 0.0,
            arrival_scv: 1.0,
            slots_per_replica: 1,
            rho_max: 0.7,
            wait_target: 1.0,
            quantile: 0.95,
        }
        .smallest(64)
        .expect("reachable")
        .replicas;
        assert!(
            d.desired_replicas <= steady,
            "{} > {steady}: {d:?}",
            d.desired_replicas
        );
    }

    #[test]
    fn bursty_arrivals_raise_the_floor_and_poisson_ones_do_not() {
        // The same mean, 4 requests/s, arriving Poisson-like or in bursts (windows of 15 and
        // 105 requests): the bursty agent waits longer at the same replica count, so the
        // Erlang floor (G/G/k: the wait scales with (c_a² + c_s²) / 2) asks for more.
        let run = |pattern: &[u64]| {
            let mut a = scaler();
            let mut t = 0.0;
            let mut last = None;
            for i in 0..200 {
                last = Some(a.step(t, &window(pattern[i % pattern.len()], 2.0)));
                t += 15.0;
            }
            last.expect("stepped")
        };
        let calm = run(&[60, 68, 52, 60]);
        let bursty = run(&[15, 105, 15, 105]);
        assert!(calm.estimate.arrival_scv < 1.0 + 1e-9, "{calm:?}");
        assert!(bursty.estimate.arrival_scv > 10.0, "{bursty:?}");
        assert!(
            bursty.erlang_floor > calm.erlang_floor,
            "{} <= {}",
            bursty.erlang_floor,
            calm.erlang_floor
        );
    }

    #[test]
    fn a_backlog_sizes_its_step_and_is_held_only_for_the_drained_hold() {
        let cfg = AutoscalerConfig::default();
        let mut a = scaler();
        let mut t = 0.0;
        for _ in 0..80 {
            a.step(t, &window(30, 1.0));
            t += 15.0;
        }
        let base = a.replicas();
        let backlog = a.step(
            t,
            &LoadSignal {
                waiting: 300,
                in_flight: 300 + u64::from(base),
                ..window(30, 1.0)
            },
        );
        // 300 waiting, drained within backlogDrainS = 15 s: 20 req/s more.
        assert!(backlog.desired_replicas >= 20, "{backlog:?}");
        assert!((backlog.sizing_arrival_rate - (2.0 + 20.0)).abs() < 0.1);
        assert_eq!(cfg.drained_hold_s(), 180.0);
        let drained_at = t;

        // Past the reversal hold, the load that drained the backlog is still held (sized
        // to meet the target at ρ < 1, so below the step's own size)...
        let mut held = Vec::new();
        while t < drained_at + cfg.drained_hold_s() {
            t += 15.0;
            held.push((t - drained_at, a.step(t, &window(30, 1.0))));
        }
        let (_, late) = held
            .iter()
            .rev()
            .find(|(since, _)| *since <= cfg.drained_hold_s())
            .expect("a step within the hold");
        assert!(late.desired_replicas > base, "{late:?}");
        assert!(late.desired_replicas < backlog.desired_replicas, "{late:?}");
        assert_eq!(late.reason, Reason::FloorHold);
        // ... and it survives a failover...
        let snapshot: Snapshot =
            serde_json::from_str(&serde_json::to_string(&a.snapshot()).expect("serializes"))
                .expect("deserializes");
        assert!(!snapshot.drained_loads.is_empty());
        let mut b = Autoscaler::resume(cfg, snapshot).expect("valid");
        assert_eq!(
            b.step(t, &window(30, 1.0)).held_floor,
            a.step(t, &window(30, 1.0)).held_floor
        );
        // ... until drained_hold_s has passed; then only the arrivals are held.
        t = drained_at + cfg.drained_hold_s() + 15.0;
        for scaler in [&mut a, &mut b] {
            let after = scaler.step(t, &window(30, 1.0));
            assert_eq!(after.desired_replicas, base, "{after:?}");
        }
    }

    #[test]
    fn a_snapshot_without_drained_loads_still_resumes() {
        let mut a = scaler();
        a.step(0.0, &window(30, 1.0));
        let mut json = serde_json::to_value(a.snapshot()).expect("serializes");
        json.as_object_mut()
            .expect("an object")
            .remove("drainedLoads");
        let snapshot: Snapshot = serde_json::from_value(json).expect("deserializes");
        assert!(snapshot.drained_loads.is_empty());
        Autoscaler::resume(AutoscalerConfig::default(), snapshot).expect("valid");
    }

    #[test]
    fn scales_to_zero_after_idle_period_and_holds_cold_start() {
        // Without the floor hold, so that the cold-start hold is what keeps replicas.
        let cfg = AutoscalerConfig {
            floor_hold_s: 0.0,
            ..AutoscalerConfig::default()
        };
        let mut a = Autoscaler::new(cfg, 1).expect("valid");
        let mut t = 0.0;
        a.step(t, &window(30, 1.0));
        let mut zero_at = None;
        for _ in 0..100 {
            t += 15.0;
            let d = a.step(t, &window(0, 1.0));
            if d.desired_replicas == 0 {
                zero_at = Some(t);
                assert_eq!(d.reason, Reason::Idle);
                break;
            }
        }
        let zero_at = zero_at.expect("scaled to zero");
        assert!(zero_at >= 300.0);
        // Wake up: replicas come back, and a quiet window right after does not drop them.
        t += 15.0;
        let up = a.step(t, &window(30, 1.0));
        assert!(up.desired_replicas >= 1);
        t += 15.0;
        let held = a.step(
            t,
            &LoadSignal {
                window_s: 15.0,
                ..LoadSignal::default()
            },
        );
        assert_eq!(held.desired_replicas, up.desired_replicas);
        assert_eq!(held.reason, Reason::ColdStartHold);
    }

    #[test]
    fn queued_work_wakes_from_zero_keeps_a_replica_and_then_idles_out() {
        // A worker agent: no traffic of its own; tasks queued for it are what wakes it.
        let cfg = AutoscalerConfig {
            idle_to_zero_s: Some(60.0),
            cold_start_hold_s: 30.0,
            ..AutoscalerConfig::default()
        };
        let quiet = LoadSignal {
            window_s: 15.0,
            ..LoadSignal::default()
        };
        let mut a = Autoscaler::new(cfg, 1).expect("valid");
        // Nothing asks for a replica, but the idle period is not over: one stays.
        let d = a.step(0.0, &quiet);
        assert_eq!((d.desired_replicas, d.reason), (1, Reason::IdleHold));
        let mut t = 0.0;
        while a.replicas() > 0 {
            t += 15.0;
            assert!(t <= 60.0, "idle for idle_to_zero_s means zero");
            let d = a.step(t, &quiet);
            if d.desired_replicas == 0 {
                assert_eq!(d.reason, Reason::Idle);
            }
        }
        assert_eq!(t, 60.0);
        // At zero the signal stays empty (no pods): only queued work wakes the agent.
        t += 15.0;
        assert_eq!(a.step(t, &quiet).desired_replicas, 0);
        a.set_queued_work(2);
        t += 15.0;
        let woken = a.step(t, &quiet);
        assert_eq!(
            (woken.desired_replicas, woken.reason),
            (1, Reason::QueuedWork)
        );
        // Kept up while the work lasts, far beyond the idle period.
        for _ in 0..20 {
            t += 15.0;
            assert_eq!(a.step(t, &quiet).desired_replicas, 1);
        }
        // The work is done: the idle period counts from then, and the agent goes back to zero.
        a.set_queued_work(0);
        let done = t;
        let mut zero_at = None;
        for _ in 0..10 {
            t += 15.0;
            let d = a.step(t, &quiet);
            if d.desired_replicas == 0 {
                zero_at = Some(t);
                break;
            }
            assert_eq!(d.reason, Reason::IdleHold, "at +{}", t - done);
        }
        assert_eq!(zero_at, Some(done + 60.0));
    }

    #[test]
    fn a_start_from_zero_is_held_through_the_cold_start() {
        // Woken by work; the work ends at once, before the new pod could report anything:
        // the cold-start hold keeps the replica for cold_start_hold_s (the reversal hold off,
        // so that it is the one holding).
        let cfg = AutoscalerConfig {
            idle_to_zero_s: Some(0.0),
            cold_start_hold_s: 45.0,
            reversal_hold_s: 0.0,
            ..AutoscalerConfig::default()
        };
        let quiet = LoadSignal {
            window_s: 15.0,
            ..LoadSignal::default()
        };
        let mut a = Autoscaler::new(cfg, 0).expect("valid");
        assert_eq!(a.step(0.0, &quiet).desired_replicas, 0);
        a.set_queued_work(1);
        assert_eq!(a.step(15.0, &quiet).desired_replicas, 1);
        a.set_queued_work(0);
        let held = a.step(30.0, &quiet);
        assert_eq!(
            (held.desired_replicas, held.reason),
            (1, Reason::ColdStartHold)
        );
        assert_eq!(a.step(45.0, &quiet).reason, Reason::ColdStartHold);
        assert_eq!(a.step(60.0, &quiet).desired_replicas, 0);
    }

    #[test]
    fn bounded_reversals_on_noisy_input() {
        // A deterministic noisy arrival sequence (LCG), alternating quiet and busy windows.
        let mut a = scaler();
        let mut state: u64 = 12345;
        let mut reversals = 0;
        let mut last_dir = 0i32;
        let steps = 2_000;
        for i in 0..steps {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let noise = (state >> 33) % 200;
            let requests = if i % 2 == 0 { noise } else { noise / 4 };
            let d = a.step(15.0 * f64::from(i), &window(requests, 1.0));
            let dir = i32::try_from(d.desired_replicas).unwrap_or(0)
                - i32::try_from(d.previous_replicas).unwrap_or(0);
            if dir != 0 {
                if last_dir != 0 && dir.signum() != last_dir {
                    reversals += 1;
                }
                last_dir = dir.signum();
            }
        }
        let horizon = 15.0 * f64::from(steps);
        let bound = 2.0 * (horizon / AutoscalerConfig::default().reversal_hold_s).ceil() + 1.0;
        assert!(f64::from(reversals) <= bound, "{reversals} > {bound}");
        // And the guard is doing real work: far fewer reversals than steps.
        assert!(reversals < steps / 4, "{reversals}");
    }

    #[test]
    fn brown_out_when_max_replicas_cannot_meet_target() {
        let cfg = AutoscalerConfig {
            max_replicas: 10,
            ..AutoscalerConfig::default()
        };
        let mut a = Autoscaler::new(cfg, 1).expect("valid");
        let d = a.step(0.0, &window(300, 1.0)); // 20 Erlangs on ≤ 10 servers
        assert_eq!(d.desired_replicas, 10);
        let b = d.brown_out.expect("brown-out");
        assert_eq!(b.cause, BrownOutCause::MaxReplicas);
        assert_eq!(b.action, BrownOutAction::Shed);
        assert_eq!(b.needed_replicas, Some(29));
        // 10 servers at ρ ≤ 0.7 carry at most 7 req/s of the 20: shed at least 65 %.
        assert!(
            b.fraction >= 0.65 - 1e-9 && b.fraction < 1.0,
            "{}",
            b.fraction
        );
        let kept = SizingRequest {
            arrival_rate: 20.0 * (1.0 - b.fraction) * (1.0 - 1e-9),
            service_time: 1.0,
            service_scv: 1.0,
            arrival_scv: 1.0,
            slots_per_replica: 1,
            rho_max: 0.7,
            wait_target: 2.0,
            quantile: 0.95,
        };
        assert!(kept.at(10).meets_target);
        assert!(b.message.contains("maxReplicas is 10"), "{}", b.message);
    }

    #[test]
    fn brown_out_blames_the_budget_when_it_binds() {
        let mut a = scaler();
        // 10 req/s of 1 s calls want 15 replicas; a Budget that lets 2 req/s through keeps
        // 4 busy within the target (ρ ≤ 0.7 needs 3; the P95 wait needs one more).
        a.set_budget_rate(BudgetRate {
            requests_per_s: Some(2.0),
            tokens_per_s: None,
        });
        let d = a.step(0.0, &window(150, 1.0));
        assert_eq!(d.desired_replicas, 4);
        let b = d.brown_out.expect("brown-out");
        assert_eq!(b.cause, BrownOutCause::Budget);
        assert!(
            b.message.contains("the Budget allows only 4 replicas"),
            "{}",
            b.message
        );
        // Lifted: the 15 the load needs, no brown-out.
        a.set_budget_rate(BudgetRate::default());
        let d = a.step(15.0, &window(150, 1.0));
        assert_eq!(d.desired_replicas, 15);
        assert!(d.brown_out.is_none());
    }

    #[test]
    fn a_token_rate_caps_through_the_tokens_per_request_the_signal_shows() {
        let mut a = scaler();
        // 1,000 tokens per call; 2,000 tokens/s is 2 calls/s: the same cap as above.
        let mut w = window(150, 1.0);
        w.input_tokens = 100_000;
        w.output_tokens = 50_000;
        a.set_budget_rate(BudgetRate {
            requests_per_s: None,
            tokens_per_s: Some(2_000.0),
        });
        let d = a.step(0.0, &w);
        assert_eq!(d.desired_replicas, 4);
        assert_eq!(d.brown_out.expect("brown-out").cause, BrownOutCause::Budget);
        // Remembered across a failover, so a window without completions still caps.
        let json = serde_json::to_string(&a.snapshot()).expect("serializes");
        let mut b = Autoscaler::resume(
            AutoscalerConfig::default(),
            serde_json::from_str(&json).expect("deserializes"),
        )
        .expect("valid");
        b.set_budget_rate(BudgetRate {
            requests_per_s: None,
            tokens_per_s: Some(2_000.0),
        });
        let quiet_but_queued = LoadSignal {
            window_s: 15.0,
            waiting: 150,
            ..LoadSignal::default()
        };
        assert!(b.step(15.0, &quiet_but_queued).desired_replicas <= 4);
    }

    #[test]
    fn decision_serializes_for_status() {
        let mut a = scaler();
        let d = a.step(0.0, &window(0, 1.0));
        let json = serde_json::to_value(&d).expect("serializes");
        assert!(json.get("erlangFloor").is_some());
        assert!(json.get("desiredReplicas").is_some());
        let back: Decision = serde_json::from_value(json).expect("round-trips");
        assert_eq!(back, d);
    }
}
