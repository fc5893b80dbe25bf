//! Conductance: the smoothed capacity a route has earned by carrying sustained flow.
//!
//! Each step of length `Δt` with observed flow `f`:
//!
//! ```text
//!   m ← m + (1 − e^{−Δt/τ})·(|f| − m)          EMA_τ(|f|)
//!   C ← (1 − βΔt)·C + αΔt·m                   conductance
//! ```
//!
//! Under steady flow `C` converges to `α·|f|/β`; without flow it decays by `(1 − βΔt)` per
//! step. With `f` measured in busy replicas (offered load in Erlangs per replica), choosing
//! `α/β = 1/ρmax` makes the steady state "the replicas that keep utilisation at ρmax", and
//! `1/β` is the memory of the route: how long earned capacity outlives a burst.
//!
//! When `βΔt > 1` (a long gap between steps) the explicit update would go negative, so the
//! step is split into sub-steps of at most `1/(2β)`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The three parameters of the conductance update, settable per Agent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConductanceParams {
    /// Growth rate `α` (per second): how fast sustained flow builds conductance.
    pub alpha: f64,
    /// Decay rate `β` (per second): `1/β` is how long conductance outlives its flow.
    pub beta: f64,
    /// Time constant `τ` (seconds) of the EMA of `|f|` that feeds growth.
    pub tau_s: f64,
}

impl ConductanceParams {
    /// Soma's defaults: `τ = 30 s`, `β = 1/240 s⁻¹`, `α = β / 0.7`.
    ///
    /// The EMA keeps sampling noise of 15 s windows out; a four-minute memory bridges the
    /// gaps between the bursts of one agent session; `α/β = 1/0.7` makes the steady state
    /// equal to the capacity at the default `ρmax`.
    pub const DEFAULT: Self = Self {
        alpha: 1.0 / 240.0 / 0.7,
        beta: 1.0 / 240.0,
        tau_s: 30.0,
    };

    /// The value `C` converges to under a constant flow `f`.
    pub fn steady_state(&self, flow: f64) -> f64 {
        self.alpha * flow.abs() / self.beta
    }
}

impl Default for ConductanceParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Conductance of one route.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Conductance {
    /// `EMA_τ(|f|)`.
    pub flow_ema: f64,
    /// `C`.
    pub value: f64,
}

impl Conductance {
    /// Advances the route by `dt` seconds with observed flow `flow`; returns the new `C`.
    pub fn update(&mut self, params: &ConductanceParams, dt: f64, flow: f64) -> f64 {
        if dt <= 0.0 || !dt.is_finite() {
            return self.value;
        }
        let max_step = if params.beta > 0.0 {
            0.5 / params.beta
        } else {
            dt
        };
        let steps = (dt / max_step).ceil().max(1.0);
        let h = dt / steps;
        let gain = 1.0 - (-h / params.tau_s.max(f64::MIN_POSITIVE)).exp();
        let f = if flow.is_finite() { flow.abs() } else { 0.0 };
        for _ in 0..(steps as u64) {
            self.flow_ema += gain * (f - self.flow_ema);
            self.value = (1.0 - params.beta * h) * self.value + params.alpha * h * self.flow_ema;
        }
        self.value
    }
}

/// Conductances of many routes (an agent, or edges between agents), keyed by route name.
///
/// Routes not mentioned in a step see zero flow, so their conductance decays.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteConductances {
    routes: BTreeMap<String, Conductance>,
}

impl RouteConductances {
    /// Advances every route by `dt`; `flows` gives the observed flow per route.
    pub fn step<'a>(
        &mut self,
        params: &ConductanceParams,
        dt: f64,
        flows: impl IntoIterator<Item = (&'a str, f64)>,
    ) {
        let mut seen: BTreeMap<&str, f64> = BTreeMap::new();
        for (route, f) in flows {
            *seen.entry(route).or_default() += f;
        }
        for (route, c) in &mut self.routes {
            let f = seen.remove(route.as_str()).unwrap_or(0.0);
            c.update(params, dt, f);
        }
        for (route, f) in seen {
            let mut c = Conductance::default();
            c.update(params, dt, f);
            self.routes.insert(route.to_owned(), c);
        }
    }

    /// The conductance of `route`, zero when it never carried flow.
    pub fn get(&self, route: &str) -> f64 {
        self.routes.get(route).map_or(0.0, |c| c.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converges_to_alpha_f_over_beta_under_steady_flow() {
        for params in [
            ConductanceParams::DEFAULT,
            ConductanceParams {
                alpha: 0.3,
                beta: 0.05,
                tau_s: 5.0,
            },
        ] {
            for flow in [0.5, 3.0, 42.0] {
                let mut c = Conductance::default();
                for _ in 0..20_000 {
                    c.update(&params, 1.0, flow);
                }
                let target = params.steady_state(flow);
                assert!(
                    (c.value - target).abs() <= 1e-6 * target,
                    "C = {}, α|f|/β = {target}",
                    c.value
                );
            }
        }
    }

    #[test]
    fn grows_monotonically_toward_steady_state_from_zero() {
        let p = ConductanceParams::DEFAULT;
        let mut c = Conductance::default();
        let mut prev = 0.0;
        for _ in 0..500 {
            let v = c.update(&p, 15.0, 4.0);
            assert!(v >= prev && v <= p.steady_state(4.0) + 1e-9);
            prev = v;
        }
    }

    #[test]
    fn decays_without_flow() {
        let p = ConductanceParams::DEFAULT;
        let mut c = Conductance::default();
        for _ in 0..1_000 {
            c.update(&p, 15.0, 10.0);
        }
        let high = c.value;
        let mut prev = high;
        for _ in 0..400 {
            let v = c.update(&p, 15.0, 0.0);
            assert!(v <= prev + 1e-12);
            prev = v;
        }
        assert!(prev < 1e-3 * high, "did not decay: {prev} from {high}");
    }

    #[test]
    fn long_gaps_stay_non_negative() {
        let p = ConductanceParams::DEFAULT;
        let mut c = Conductance::default();
        c.update(&p, 15.0, 10.0);
        let v = c.update(&p, 100_000.0, 0.0);
        assert!((0.0..1e-6).contains(&v), "{v}");
    }

    #[test]
    fn routes_without_flow_decay_and_new_routes_appear() {
        let p = ConductanceParams::DEFAULT;
        let mut r = RouteConductances::default();
        for _ in 0..100 {
            r.step(&p, 15.0, [("a", 2.0), ("b", 1.0)]);
        }
        let b_before = r.get("b");
        for _ in 0..100 {
            r.step(&p, 15.0, [("a", 2.0)]);
        }
        assert!(r.get("a") > r.get("b"));
        assert!(r.get("b") < b_before * 0.01);
        assert_eq!(r.get("never"), 0.0);
    }
}
