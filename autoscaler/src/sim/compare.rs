//! One trace against all three autoscalers, under identical conditions.
//!
//! Every scaler gets the same trace, service model, pod start delay, initial replicas,
//! replica ceiling and SLO; Soma's settings are its defaults except for what the Agent would
//! state anyway (wait target, slots per replica, max replicas). HPA and KEDA target the
//! same utilisation Soma keeps (`ρmax × slots` concurrent requests per pod).
//!
//! [`Comparison::sweep`] runs each scaler over its main knob instead — HPA's and KEDA's
//! target concurrency per pod, Soma's `rhoMax` × `waitTargetS` — for the cost–SLO frontiers
//! of [`crate::sim::frontier`].

use crate::config::AutoscalerConfig;
use crate::error::Error;
use crate::peers::{Hpa, HpaParams, Keda, KedaParams, SomaScaler};
use crate::sim::engine::{RunResult, SimConfig, simulate};
use crate::sim::frontier::Point;
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

    /// Runs every setting of `sweep` on `trace`: one [`Point`] per scaler and setting.
    pub fn sweep(&self, trace: &Trace, sweep: &Sweep) -> Result<Vec<Point>, Error> {
        let base = self.soma_config();
        let slots = f64::from(self.sim.service.slots);
        let default_target = base.rho_max * slots;
        let mut points = Vec::new();
        let mut push = |scaler: &str, setting: String, default: bool, r: RunResult| {
            points.push(Point {
                scaler: scaler.to_owned(),
                setting,
                default,
                replica_hours: r.replica_hours,
                violation_minutes: r.violation_minutes,
                peak_pods: r.peak_pods,
            });
        };
        for &target in &sweep.peer_targets {
            let default = (target - default_target).abs() < 1e-9;
            let mut hpa = Hpa::new(HpaParams::kubernetes_defaults(target, 1, self.max_replicas));
            push(
                "hpa",
                format!("target={target}"),
                default,
                simulate(trace, &mut hpa, &self.sim),
            );
            let mut keda = Keda::new(KedaParams::keda_defaults(target, self.max_replicas));
            push(
                "keda",
                format!("target={target}"),
                default,
                simulate(trace, &mut keda, &self.sim),
            );
        }
        for &rho_max in &sweep.soma_rho_max {
            for &wait_target_s in &sweep.soma_wait_target_s {
                let mut cfg = AutoscalerConfig {
                    rho_max,
                    wait_target_s,
                    ..base
                };
                // Keep conductance's steady state at the replicas that hold ρmax, as the
                // defaults do (α/β = 1/ρmax).
                cfg.conductance.alpha = cfg.conductance.beta / rho_max;
                let default = rho_max == base.rho_max && wait_target_s == base.wait_target_s;
                let mut soma =
                    SomaScaler::new(cfg, self.soma_interval_s, self.sim.initial_replicas)?;
                push(
                    "soma",
                    format!("rhoMax={rho_max} waitTargetS={wait_target_s}"),
                    default,
                    simulate(trace, &mut soma, &self.sim),
                );
            }
        }
        Ok(points)
    }
}

/// The settings [`Comparison::sweep`] runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    /// HPA's and KEDA's target concurrency per pod (with one slot per pod, the target
    /// utilisation).
    pub peer_targets: Vec<f64>,
    /// Soma's `rhoMax` values.
    pub soma_rho_max: Vec<f64>,
    /// Soma's `waitTargetS` values (the SLO the runs are judged by stays fixed).
    pub soma_wait_target_s: Vec<f64>,
}

impl Default for Sweep {
    /// Targets 0.3–1.0 for the peers; `rhoMax` 0.5–0.9 × `waitTargetS` 1, 2, 4 s for Soma.
    /// Each list holds the default setting.
    fn default() -> Self {
        Self {
            peer_targets: vec![0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
            soma_rho_max: vec![0.5, 0.6, 0.7, 0.8, 0.9],
            soma_wait_target_s: vec![1.0, 2.0, 4.0],
        }
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

    #[test]
    fn sweep_runs_every_setting_and_flags_each_default_once() {
        let cmp = Comparison::default();
        let sweep = Sweep::default();
        let trace = Trace::synthetic("burst", 2).expect("kind");
        let points = cmp.sweep(&trace, &sweep).expect("runs");
        let n = sweep.peer_targets.len() * 2
            + sweep.soma_rho_max.len() * sweep.soma_wait_target_s.len();
        assert_eq!(points.len(), n);
        for scaler in ["soma", "hpa", "keda"] {
            let defaults: Vec<_> = points
                .iter()
                .filter(|p| p.scaler == scaler && p.default)
                .collect();
            assert_eq!(defaults.len(), 1, "{scaler}");
        }
        // The default points are the runs the plain comparison makes.
        let rep = cmp.run(&trace).expect("runs");
        for p in points.iter().filter(|p| p.default) {
            let r = rep.run(&p.scaler).expect("ran");
            assert_eq!(p.violation_minutes, r.violation_minutes, "{}", p.scaler);
            assert_eq!(p.replica_hours, r.replica_hours, "{}", p.scaler);
        }
        // A lower HPA target (more pods per unit of load) never costs fewer replica-hours.
        let hpa: Vec<f64> = points
            .iter()
            .filter(|p| p.scaler == "hpa")
            .map(|p| p.replica_hours)
            .collect();
        assert!(hpa.first() > hpa.last(), "{hpa:?}");
    }
}
