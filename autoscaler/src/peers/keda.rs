//! An emulation of a KEDA ScaledObject with its documented defaults.
//!
//! KEDA owns the 0 ↔ 1 transition and hands 1 ↔ N to an HPA it creates:
//!
//! ```text
//!   every pollingInterval (30 s): active = any request arrived or in flight since last poll
//!     replicas = 0 and active                      → 1 (activation)
//!     replicas > 0 and inactive for cooldownPeriod → 0 (300 s)
//!   replicas ≥ 1: the HPA algorithm (15 s sync, see `hpa`) on the scaler's metric,
//!                 minReplicas 1 — KEDA's HPA never scales below 1 itself
//! ```
//!
//! The scaler's metric is the same concurrency as the HPA emulation's (an AverageValue
//! target of `ρmax × slots` per pod), read as an instantaneous value at each poll — the way a
//! queue-length or `sum(in_flight)` Prometheus scaler reports it — and served to the HPA from
//! KEDA's cache until the next poll (`useCachedMetrics: true`). So KEDA differs from the HPA
//! emulation by scale-to-zero, its activation path, and a metric refreshed every 30 s.

use crate::peers::hpa::{Hpa, HpaParams};
use crate::sim::engine::{Observation, Scaler};

/// KEDA ScaledObject settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KedaParams {
    /// `pollingInterval`: 30 s.
    pub polling_s: f64,
    /// `cooldownPeriod`: 300 s.
    pub cooldown_s: f64,
    /// The HPA KEDA creates.
    pub hpa: HpaParams,
}

impl KedaParams {
    /// KEDA defaults around an HPA with Kubernetes defaults.
    pub fn keda_defaults(target_per_pod: f64, max_replicas: u32) -> Self {
        Self {
            polling_s: 30.0,
            cooldown_s: 300.0,
            hpa: HpaParams::kubernetes_defaults(target_per_pod, 1, max_replicas),
        }
    }
}

/// The KEDA operator plus its HPA for one workload.
#[derive(Debug, Clone)]
pub struct Keda {
    params: KedaParams,
    hpa: Hpa,
    next_poll_s: f64,
    seen_since_poll: bool,
    last_active_s: f64,
    cached_metric: f64,
}

impl Keda {
    /// A ScaledObject with `params`, last active at time 0.
    pub fn new(params: KedaParams) -> Self {
        Self {
            hpa: Hpa::new(params.hpa),
            next_poll_s: params.polling_s,
            params,
            seen_since_poll: false,
            last_active_s: 0.0,
            cached_metric: 0.0,
        }
    }
}

impl Scaler for Keda {
    fn name(&self) -> String {
        "keda".into()
    }

    fn interval_s(&self) -> f64 {
        self.params.hpa.sync_s
    }

    fn decide(&mut self, obs: &Observation) -> u32 {
        self.seen_since_poll |= obs.arrivals > 0 || obs.in_service + obs.waiting > 0;
        if obs.now_s + 1e-9 >= self.next_poll_s {
            self.next_poll_s += self.params.polling_s;
            let active = std::mem::take(&mut self.seen_since_poll);
            self.cached_metric = (obs.in_service + obs.waiting) as f64;
            if active {
                self.last_active_s = obs.now_s;
                if obs.replicas == 0 {
                    return 1;
                }
            } else if obs.replicas > 0 && obs.now_s - self.last_active_s >= self.params.cooldown_s {
                self.hpa.reset();
                return 0;
            }
        }
        if obs.replicas == 0 {
            return 0;
        }
        self.hpa.sync(&Observation {
            mean_in_service: self.cached_metric,
            mean_waiting: 0.0,
            ..*obs
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(now_s: f64, replicas: u32, arrivals: u64) -> Observation {
        Observation {
            now_s,
            window_s: 15.0,
            arrivals,
            ready: replicas,
            replicas,
            ..Observation::default()
        }
    }

    #[test]
    fn scales_to_zero_after_cooldown_and_activates_on_poll() {
        let mut k = Keda::new(KedaParams::keda_defaults(0.7, 50));
        let mut replicas = 1;
        let mut t = 15.0;
        let mut zero_at = None;
        while t <= 600.0 {
            replicas = k.decide(&obs(t, replicas, 0));
            if replicas == 0 && zero_at.is_none() {
                zero_at = Some(t);
            }
            t += 15.0;
        }
        let zero_at = zero_at.expect("scaled to zero");
        assert!((300.0..=330.0).contains(&zero_at), "{zero_at}");
        // Traffic between polls is noticed at the next poll only, and activates to 1.
        let first = k.decide(&obs(t, 0, 5));
        let second = k.decide(&obs(t + 15.0, first, 0));
        assert_eq!(first.max(second), 1);
        assert_eq!(first + second, 1);
    }
}
