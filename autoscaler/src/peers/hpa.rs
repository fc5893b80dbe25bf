//! An emulation of the Kubernetes HorizontalPodAutoscaler (autoscaling/v2) with its
//! documented defaults.
//!
//! Every 15 s sync:
//!
//! ```text
//!   ratio   = average metric per Ready pod / target
//!   if |ratio − 1| ≤ 0.1:              keep current
//!   pods still starting report no metric: on scale-up they count as 0, on scale-down as
//!   the target (replica_calculator.go), and the ratio is recomputed over all of them
//!   desired = ceil(ratio × pods)
//!   scale-up:   at most max(+4 pods, +100 %) per 15 s     (default scaleUp policies)
//!   scale-down: the highest recommendation of the last 300 s (stabilisation window)
//!   clamp to [minReplicas, maxReplicas]
//! ```
//!
//! The metric is per-pod concurrency — requests in service plus waiting, spread over the
//! Ready pods — averaged over the sync period, as a Prometheus-adapter custom metric would
//! be; the target is `ρmax × slots` so HPA aims at the same utilisation Soma does. Counting
//! waiting requests gives HPA a stronger signal than CPU utilisation, which saturates at
//! 100 % under overload.

use std::collections::VecDeque;

use crate::sim::engine::{Observation, Scaler};

/// HPA settings (Kubernetes defaults unless noted).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HpaParams {
    /// Target average concurrency per pod.
    pub target_per_pod: f64,
    /// `--horizontal-pod-autoscaler-tolerance`: 0.1.
    pub tolerance: f64,
    /// `--horizontal-pod-autoscaler-sync-period`: 15 s.
    pub sync_s: f64,
    /// `behavior.scaleDown.stabilizationWindowSeconds`: 300 s.
    pub down_window_s: f64,
    /// Default scale-up policy: 4 pods per period.
    pub up_pods: u32,
    /// Default scale-up policy: 100 % per period.
    pub up_percent: f64,
    /// `minReplicas` (HPA cannot go below 1 without alpha features).
    pub min_replicas: u32,
    /// `maxReplicas`.
    pub max_replicas: u32,
}

impl HpaParams {
    /// Kubernetes defaults with the given target and replica range.
    pub fn kubernetes_defaults(target_per_pod: f64, min_replicas: u32, max_replicas: u32) -> Self {
        Self {
            target_per_pod,
            tolerance: 0.1,
            sync_s: 15.0,
            down_window_s: 300.0,
            up_pods: 4,
            up_percent: 100.0,
            min_replicas,
            max_replicas,
        }
    }
}

/// The HPA controller for one workload.
#[derive(Debug, Clone)]
pub struct Hpa {
    params: HpaParams,
    recommendations: VecDeque<(f64, u32)>,
}

impl Hpa {
    /// A controller with `params` and no history.
    pub fn new(params: HpaParams) -> Self {
        Self {
            params,
            recommendations: VecDeque::new(),
        }
    }

    /// Forgets the stabilisation history (KEDA does this when it deactivates the HPA).
    pub fn reset(&mut self) {
        self.recommendations.clear();
    }

    /// The metric-based recommendation, before behaviours (replica_calculator.go).
    fn recommend(&self, obs: &Observation) -> u32 {
        let p = &self.params;
        let current = obs.replicas;
        if obs.ready == 0 {
            return current; // no pod reports a metric: HPA skips the sync
        }
        let total = obs.mean_in_service + obs.mean_waiting;
        let ready = f64::from(obs.ready);
        let ratio = total / ready / p.target_per_pod;
        let missing = f64::from(obs.starting);
        if obs.starting == 0 {
            if (ratio - 1.0).abs() <= p.tolerance {
                return current;
            }
            return ceil_u32(ratio * ready);
        }
        if (ratio - 1.0).abs() <= p.tolerance {
            return current;
        }
        let pods = ready + missing;
        let new_ratio = if ratio > 1.0 {
            total / (p.target_per_pod * pods)
        } else {
            (total + missing * p.target_per_pod) / (p.target_per_pod * pods)
        };
        if (new_ratio - 1.0).abs() <= p.tolerance
            || (ratio < 1.0 && new_ratio > 1.0)
            || (ratio > 1.0 && new_ratio < 1.0)
        {
            return current;
        }
        let desired = ceil_u32(new_ratio * pods);
        if (new_ratio < 1.0 && desired > current) || (new_ratio > 1.0 && desired < current) {
            return current;
        }
        desired
    }

    /// One sync: recommendation, stabilisation, rate limits, clamp.
    pub fn sync(&mut self, obs: &Observation) -> u32 {
        let p = self.params;
        let current = obs.replicas;
        let rec = self.recommend(obs);
        self.recommendations.push_back((obs.now_s, rec));
        while self
            .recommendations
            .front()
            .is_some_and(|&(t, _)| obs.now_s - t > p.down_window_s)
        {
            self.recommendations.pop_front();
        }
        // Scale-up stabilisation window is 0 s: the latest recommendation.
        let up = rec;
        let down = self
            .recommendations
            .iter()
            .map(|&(_, r)| r)
            .max()
            .unwrap_or(rec);
        let mut desired = if up > current {
            let by_pods = current + p.up_pods;
            let by_percent = ceil_u32(f64::from(current) * (1.0 + p.up_percent / 100.0));
            up.min(by_pods.max(by_percent))
        } else if down < current {
            down
        } else {
            current
        };
        desired = desired.clamp(p.min_replicas, p.max_replicas);
        desired
    }
}

fn ceil_u32(x: f64) -> u32 {
    if x.is_finite() && x > 0.0 {
        x.ceil().min(f64::from(u32::MAX)) as u32
    } else {
        0
    }
}

impl Scaler for Hpa {
    fn name(&self) -> String {
        "hpa".into()
    }

    fn interval_s(&self) -> f64 {
        self.params.sync_s
    }

    fn decide(&mut self, obs: &Observation) -> u32 {
        self.sync(obs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(now_s: f64, replicas: u32, ready: u32, starting: u32, load: f64) -> Observation {
        Observation {
            now_s,
            window_s: 15.0,
            mean_in_service: load,
            ready,
            starting,
            replicas,
            ..Observation::default()
        }
    }

    fn hpa() -> Hpa {
        Hpa::new(HpaParams::kubernetes_defaults(0.7, 1, 100))
    }

    #[test]
    fn documented_formula_and_tolerance() {
        let mut h = Hpa::new(HpaParams::kubernetes_defaults(0.5, 1, 100));
        // 4 pods at 0.5 each: on target.
        assert_eq!(h.sync(&obs(15.0, 4, 4, 0, 2.0)), 4);
        // 5 % over: within tolerance.
        assert_eq!(h.sync(&obs(30.0, 4, 4, 0, 2.1)), 4);
        // 50 % over: ceil(4 × 1.5) = 6.
        assert_eq!(h.sync(&obs(45.0, 4, 4, 0, 3.0)), 6);
    }

    #[test]
    fn scale_up_is_limited_to_max_of_four_pods_and_double() {
        let mut h = hpa();
        assert_eq!(h.sync(&obs(15.0, 1, 1, 0, 10.0)), 5); // +4 beats ×2
        let mut h = hpa();
        assert_eq!(h.sync(&obs(15.0, 10, 10, 0, 70.0)), 20); // ×2 beats +4
    }

    #[test]
    fn scale_down_waits_for_the_stabilisation_window() {
        let mut h = hpa();
        assert_eq!(h.sync(&obs(0.0, 10, 10, 0, 7.0)), 10);
        let mut t = 15.0;
        while t < 300.0 {
            assert_eq!(h.sync(&obs(t, 10, 10, 0, 0.7)), 10, "at {t}");
            t += 15.0;
        }
        // The recommendation of 10 made at t=0 leaves the window after 300 s.
        assert_eq!(h.sync(&obs(315.0, 10, 10, 0, 0.7)), 1);
    }

    #[test]
    fn starting_pods_count_as_zero_on_scale_up() {
        let mut h = hpa();
        // 2 ready pods at 1.4 each (ratio 2), 2 more starting: 2.8 / (0.7 × 4) = 1 → keep.
        assert_eq!(h.sync(&obs(15.0, 4, 2, 2, 2.8)), 4);
    }
}
