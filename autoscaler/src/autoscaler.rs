//! The per-Agent autoscaler: estimates → conductance and Erlang-C floor → guarded decision.
//!
//! ```text
//!  LoadSignal ─► Estimator ─► λ̂, Ŝ, c² ─┬─► flow = λ̂Ŝ/slots ─► Conductance C ─► ⌈C⌉ ───┐
//!                                      └─► λ* = max(λ̂, λ_window) + waiting/drain       │
//!                                           └─► Erlang-C (M/G/k) smallest k ─► floor   │
//!                                                └─► highest floor of floor_hold_s ────┤
//!                                                                                      ▼
//!             desired = clamp(max(⌈C⌉, held floor), min, min(max, budget cap))
//!             → idle for idle_to_zero_s? 0
//!             → scale-down held during cold start and for reversal_hold_s after a scale-up
//!             → brown-out when the floor could not be met within the cap
//! ```
//!
//! Scale-ups are never delayed: a queue that is too small costs SLO at once, while a queue
//! that is too large for another minute only costs replica-seconds.

use std::collections::VecDeque;

use crate::conductance::Conductance;
use crate::config::{AutoscalerConfig, BrownOutAction};
use crate::decision::{BrownOut, BrownOutCause, Decision, Reason};
use crate::erlang::SizingRequest;
use crate::error::Error;
use crate::estimate::Estimator;
use crate::signal::LoadSignal;

/// Largest replica count the brown-out message searches when reporting what would be needed.
const NEEDED_SEARCH_LIMIT: u32 = 100_000;

/// One Agent's autoscaler. Feed it one [`LoadSignal`] per step.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    config: AutoscalerConfig,
    estimator: Estimator,
    conductance: Conductance,
    replicas: u32,
    budget_cap: Option<u32>,
    last_active_s: Option<f64>,
    last_scale_up_s: Option<f64>,
    cold_start_until_s: f64,
    floors: VecDeque<(f64, u32)>,
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
            budget_cap: None,
            last_active_s: None,
            last_scale_up_s: None,
            cold_start_until_s: f64::NEG_INFINITY,
            floors: VecDeque::new(),
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

    /// Sets (or clears) the most replicas the agent's Budget currently allows.
    pub fn set_budget_cap(&mut self, cap: Option<u32>) {
        self.budget_cap = cap;
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

        let cap = self
            .budget_cap
            .map_or(cfg.max_replicas, |b| b.min(cfg.max_replicas));
        let sizing_arrival_rate = estimate.arrival_rate.max(estimate.window_arrival_rate)
            + signal.waiting as f64 / cfg.backlog_drain_s;
        let request = SizingRequest {
            arrival_rate: sizing_arrival_rate,
            service_time: estimate.service_time,
            service_scv: estimate.service_scv,
            slots_per_replica: slots,
            rho_max: cfg.rho_max,
            wait_target: cfg.wait_target_s * cfg.wait_headroom,
            quantile: cfg.wait_quantile,
        };
        let (erlang_floor, brown_out) = match request.smallest(cap) {
            Ok(s) => (s.replicas, None),
            Err(s) => (s.replicas, Some(self.brown_out(&request, cap))),
        };

        self.floors.push_back((now_s, erlang_floor));
        while self
            .floors
            .front()
            .is_some_and(|&(t, _)| now_s - t > cfg.floor_hold_s)
        {
            self.floors.pop_front();
        }
        let held_floor = self.floors.iter().map(|&(_, f)| f).max().unwrap_or(0);

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

        if signal.is_active() || self.last_active_s.is_none() {
            self.last_active_s = Some(now_s);
        }
        let idle_for = self.last_active_s.map_or(0.0, |t| now_s - t);
        if cfg.min_replicas == 0 && cfg.idle_to_zero_s.is_some_and(|t| idle_for >= t) {
            desired = 0;
            reason = Reason::Idle;
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
    fn bursts_scale_up_at_once_hold_the_floor_then_come_down() {
        let mut a = scaler();
        let hold = a.config().floor_hold_s;
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
        while t < burst_at + hold + 1_200.0 {
            let d = a.step(t, &window(15, 1.0));
            if t - burst_at <= hold {
                // The burst's floor is held for floor_hold_s.
                assert_eq!(
                    d.desired_replicas,
                    burst.desired_replicas,
                    "at +{}",
                    t - burst_at
                );
                assert_eq!(d.reason, Reason::FloorHold);
            }
            seen.push(d.desired_replicas);
            t += 15.0;
        }
        assert!(seen.windows(2).all(|w| w[1] <= w[0]), "{seen:?}");
        assert_eq!(*seen.last().expect("steps"), base);
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
        assert!(b.fraction >= 0.65 && b.fraction < 1.0, "{}", b.fraction);
        let kept = SizingRequest {
            arrival_rate: 20.0 * (1.0 - b.fraction),
            service_time: 1.0,
            service_scv: 1.0,
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
        a.set_budget_cap(Some(4));
        let d = a.step(0.0, &window(150, 1.0));
        assert_eq!(d.desired_replicas, 4);
        let b = d.brown_out.expect("brown-out");
        assert_eq!(b.cause, BrownOutCause::Budget);
        assert!(b.message.contains("Budget"), "{}", b.message);
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
