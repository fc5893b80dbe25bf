//! One trace against all three autoscalers, under identical conditions.
//!
//! Every scaler gets the same trace, service model, pod start delay, initial replicas,
//! replica ceiling and SLO; Soma's settings are its defaults except for what the Agent would
//! state anyway (wait target, slots per replica, max replicas). HPA and KEDA target the
//! same utilisation Soma keeps (`ρmax × slots` concurrent requests per pod).

use crate::config::AutoscalerConfig;
use crate::error::Error;
use crate::peers::{Hpa, HpaParams, Keda, KedaParams, SomaScaler};
use crate::sim::engine::{SimConfig, simulate};
use crate::sim::report::TraceReport;
use crate::sim::trace::Trace;

/// Settings shared by the comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// The simulated cluster.
    pub sim: SimConfig,
    /// Most replicas any scaler may ask for.
    pub max_replicas: u32,
    /// Seconds between Soma's steps.
    pub soma_interval_s: f64,
    /// Soma's settings (wait target, slots and max replicas are overwritten from above).
    pub soma: AutoscalerConfig,
}

impl Default for Comparison {
    fn default() -> Self {
        Self {
            sim: SimConfig::default(),
            max_replicas: 64,
            soma_interval_s: 15.0,
            soma: AutoscalerConfig::default(),
        }
    }
}

impl Comparison {
    /// Soma's effective settings.
    pub fn soma_config(&self) -> AutoscalerConfig {
        AutoscalerConfig {
            wait_target_s: self.sim.slo_wait_s,
            slots_per_replica: self.sim.service.slots,
            max_replicas: self.max_replicas,
            ..self.soma
        }
    }

    /// Runs Soma, HPA and KEDA on `trace`.
    pub fn run(&self, trace: &Trace) -> Result<TraceReport, Error> {
        let soma_cfg = self.soma_config();
        let target = soma_cfg.rho_max * f64::from(self.sim.service.slots);
        let mut soma = SomaScaler::new(soma_cfg, self.soma_interval_s, self.sim.initial_replicas)?;
        let mut hpa = Hpa::new(HpaParams::kubernetes_defaults(target, 1, self.max_replicas));
        let mut keda = Keda::new(KedaParams::keda_defaults(target, self.max_replicas));
        let runs = vec![
            simulate(trace, &mut soma, &self.sim),
            simulate(trace, &mut hpa, &self.sim),
            simulate(trace, &mut keda, &self.sim),
        ];
        Ok(TraceReport {
            trace: trace.name.clone(),
            requests: trace.requests.len(),
            runs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulation_is_deterministic_for_a_seed() {
        let cmp = Comparison::default();
        for kind in Trace::SYNTHETIC {
            let a = cmp
                .run(&Trace::synthetic(kind, 7).expect("kind"))
                .expect("runs");
            let b = cmp
                .run(&Trace::synthetic(kind, 7).expect("kind"))
                .expect("runs");
            assert_eq!(a, b, "{kind}");
            let c = cmp
                .run(&Trace::synthetic(kind, 8).expect("kind"))
                .expect("runs");
            assert_ne!(a, c, "{kind}: a different seed must give a different run");
        }
    }

    #[test]
    fn every_request_is_served_and_replicas_stay_in_range() {
        let cmp = Comparison::default();
        let rep = cmp
            .run(&Trace::synthetic("burst", 1).expect("kind"))
            .expect("runs");
        for r in &rep.runs {
            assert_eq!(r.unserved, 0, "{}", r.scaler);
            assert!(r.peak_pods <= cmp.max_replicas, "{}", r.scaler);
            assert!(r.timeline.iter().all(|&(_, n)| n <= cmp.max_replicas));
        }
        // Only Soma and KEDA scale to zero; HPA keeps at least one pod.
        let hpa = rep.run("hpa").expect("hpa ran");
        assert!(hpa.timeline.iter().all(|&(_, n)| n >= 1));
    }
}
