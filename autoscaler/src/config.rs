//! Per-Agent autoscaler settings, their defaults, and their validation.
//!
//! Every field has a default chosen for bursty agent traffic (see `docs/autoscaler.md` for
//! the reasoning and for the simulation that checked them); an Agent's `scaling` section
//! overrides any of them.

use serde::{Deserialize, Serialize};

use crate::conductance::ConductanceParams;
use crate::error::Error;
use crate::estimate::EstimatorParams;

/// What to do with traffic that the allowed replicas cannot serve within the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BrownOutAction {
    /// Refuse the lowest-priority share of requests.
    #[default]
    Shed,
    /// Route the lowest-priority share to a cheaper, faster model.
    Downgrade,
}

/// Settings of one Agent's autoscaler.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AutoscalerConfig {
    /// Fewest replicas; 0 allows scale to zero after `idle_to_zero_s`.
    pub min_replicas: u32,
    /// Most replicas.
    pub max_replicas: u32,
    /// Concurrent requests one replica serves (M/M/n servers per replica).
    pub slots_per_replica: u32,
    /// Highest allowed utilisation.
    pub rho_max: f64,
    /// Target for the waiting-time quantile, seconds.
    pub wait_target_s: f64,
    /// The quantile the target applies to (0.95 = P95).
    pub wait_quantile: f64,
    /// Size the queue for `wait_quantile` wait ≤ `wait_headroom × wait_target_s`. The
    /// Erlang-C result is a long-run average, while an SLO is judged minute by minute on a
    /// sample of requests; planning at the target itself would miss it about half the time.
    pub wait_headroom: f64,
    /// Conductance parameters α, β, τ.
    pub conductance: ConductanceParams,
    /// Arrival-rate and service-time estimation.
    pub estimator: EstimatorParams,
    /// Waiting requests are added to the arrival rate as `waiting / backlog_drain_s` for the
    /// step that sees them, so a backlog is drained within this time rather than merely kept
    /// from growing. Default 15 s: one step of the operator's loop.
    pub backlog_drain_s: f64,
    /// How long a peak of offered load (`λ·S`) is remembered: the held floor is the smallest
    /// count on which the highest load of the last `floor_hold_s` would still meet the wait
    /// target (no `rho_max` ceiling: that margin is restored by the floor, within one pod
    /// start, if the peak returns). Bursty agents come back within minutes, and a pod that is
    /// still there costs far less than a 30 s cold start under a burst. Default 900 s;
    /// `docs/autoscaler.md` shows the simulated trade-off of other values. 0 disables it.
    pub floor_hold_s: f64,
    /// Scale to zero after this long without traffic or queued work (only when `min_replicas`
    /// is 0). Until then, and always when `None`, an agent with nothing to do keeps one
    /// replica ([`crate::Reason::IdleHold`]).
    pub idle_to_zero_s: Option<f64>,
    /// After scaling up from zero, do not scale down for this long: pods are still starting
    /// and the signal does not yet reflect their capacity.
    pub cold_start_hold_s: f64,
    /// After a scale-up, do not scale down for this long. This bounds direction reversals to
    /// at most two per `reversal_hold_s`.
    pub reversal_hold_s: f64,
    /// What brown-out does with the traffic that cannot be served.
    pub brown_out_action: BrownOutAction,
}

impl Default for AutoscalerConfig {
    fn default() -> Self {
        Self {
            min_replicas: 0,
            max_replicas: 64,
            slots_per_replica: 1,
            rho_max: 0.7,
            wait_target_s: 2.0,
            wait_quantile: 0.95,
            wait_headroom: 0.5,
            conductance: ConductanceParams::DEFAULT,
            estimator: EstimatorParams::default(),
            backlog_drain_s: 15.0,
            floor_hold_s: 900.0,
            idle_to_zero_s: Some(300.0),
            cold_start_hold_s: 60.0,
            reversal_hold_s: 120.0,
            brown_out_action: BrownOutAction::Shed,
        }
    }
}

fn check(ok: bool, field: &'static str, message: &str) -> Result<(), Error> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            field,
            message: message.to_owned(),
        })
    }
}

fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

fn non_negative(x: f64) -> bool {
    x.is_finite() && x >= 0.0
}

impl AutoscalerConfig {
    /// How long the load that drained a backlog is held (beside `floor_hold_s`'s hold of
    /// the arrivals alone): a backlog shows that a burst outran the pool, and a burst that
    /// returns as the reversal hold ends should find the pods that drained the last one still
    /// there rather than wait a pod start for them: `reversal_hold_s + cold_start_hold_s`
    /// (180 s by default), never longer than `floor_hold_s` (so 0 disables both holds).
    pub fn drained_hold_s(&self) -> f64 {
        (self.reversal_hold_s + self.cold_start_hold_s).min(self.floor_hold_s)
    }

    /// Rejects settings the math cannot work with, naming the field.
    pub fn validate(&self) -> Result<(), Error> {
        check(
            self.min_replicas <= self.max_replicas,
            "minReplicas",
            "must not exceed maxReplicas",
        )?;
        check(self.max_replicas >= 1, "maxReplicas", "must be at least 1")?;
        check(
            self.slots_per_replica >= 1,
            "slotsPerReplica",
            "must be at least 1",
        )?;
        check(
            self.rho_max > 0.0 && self.rho_max < 1.0,
            "rhoMax",
            "must be in (0, 1)",
        )?;
        check(positive(self.wait_target_s), "waitTargetS", "must be > 0")?;
        check(
            self.wait_quantile > 0.0 && self.wait_quantile < 1.0,
            "waitQuantile",
            "must be in (0, 1)",
        )?;
        check(
            self.wait_headroom > 0.0 && self.wait_headroom <= 1.0,
            "waitHeadroom",
            "must be in (0, 1]",
        )?;
        check(
            non_negative(self.conductance.alpha),
            "conductance.alpha",
            "must be ≥ 0",
        )?;
        check(
            positive(self.conductance.beta),
            "conductance.beta",
            "must be > 0",
        )?;
        check(
            positive(self.conductance.tau_s),
            "conductance.tauS",
            "must be > 0",
        )?;
        check(
            positive(self.estimator.arrival_tau_s),
            "estimator.arrivalTauS",
            "must be > 0",
        )?;
        check(
            positive(self.estimator.service_requests),
            "estimator.serviceRequests",
            "must be > 0",
        )?;
        check(
            positive(self.estimator.prior_service_time_s),
            "estimator.priorServiceTimeS",
            "must be > 0",
        )?;
        if let Some(tp) = self.estimator.throughput {
            check(
                positive(tp.prefill_tps) && positive(tp.decode_tps) && non_negative(tp.overhead_s),
                "estimator.throughput",
                "token rates must be > 0 and overhead ≥ 0",
            )?;
        }
        check(
            positive(self.backlog_drain_s),
            "backlogDrainS",
            "must be > 0",
        )?;
        check(non_negative(self.floor_hold_s), "floorHoldS", "must be ≥ 0")?;
        check(
            self.idle_to_zero_s.is_none_or(non_negative),
            "idleToZeroS",
            "must be ≥ 0",
        )?;
        check(
            non_negative(self.cold_start_hold_s),
            "coldStartHoldS",
            "must be ≥ 0",
        )?;
        check(
            non_negative(self.reversal_hold_s),
            "reversalHoldS",
            "must be ≥ 0",
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_field() {
        AutoscalerConfig::default()
            .validate()
            .expect("defaults valid");
        let bad = AutoscalerConfig {
            rho_max: 1.2,
            ..AutoscalerConfig::default()
        };
        let err = bad.validate().expect_err("rho 1.2 invalid");
        assert!(err.to_string().contains("rhoMax"), "{err}");
        assert_eq!(err.label(), "InvalidConfig");
        let bad = AutoscalerConfig {
            min_replicas: 5,
            max_replicas: 2,
            ..AutoscalerConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn every_out_of_range_setting_is_rejected_by_name() {
        // The table the CRD's CEL rules mirror (docs/autoscaler.md, "Settings").
        let cases = [
            (r#"{"minReplicas": 65}"#, "minReplicas"),
            (r#"{"maxReplicas": 0, "minReplicas": 0}"#, "maxReplicas"),
            (r#"{"slotsPerReplica": 0}"#, "slotsPerReplica"),
            (r#"{"rhoMax": 0}"#, "rhoMax"),
            (r#"{"rhoMax": 1}"#, "rhoMax"),
            (r#"{"waitTargetS": 0}"#, "waitTargetS"),
            (r#"{"waitQuantile": 1}"#, "waitQuantile"),
            (r#"{"waitHeadroom": 0}"#, "waitHeadroom"),
            (r#"{"waitHeadroom": 1.5}"#, "waitHeadroom"),
            (r#"{"conductance": {"alpha": -1}}"#, "conductance.alpha"),
            (r#"{"conductance": {"beta": 0}}"#, "conductance.beta"),
            (r#"{"conductance": {"tauS": 0}}"#, "conductance.tauS"),
            (
                r#"{"estimator": {"arrivalTauS": 0}}"#,
                "estimator.arrivalTauS",
            ),
            (
                r#"{"estimator": {"serviceRequests": 0}}"#,
                "estimator.serviceRequests",
            ),
            (
                r#"{"estimator": {"priorServiceTimeS": -1}}"#,
                "estimator.priorServiceTimeS",
            ),
            (
                r#"{"estimator": {"throughput": {"prefillTps": 0, "decodeTps": 1, "overheadS": 0}}}"#,
                "estimator.throughput",
            ),
            (r#"{"backlogDrainS": 0}"#, "backlogDrainS"),
            (r#"{"floorHoldS": -1}"#, "floorHoldS"),
            (r#"{"idleToZeroS": -1}"#, "idleToZeroS"),
            (r#"{"coldStartHoldS": -1}"#, "coldStartHoldS"),
            (r#"{"reversalHoldS": -1}"#, "reversalHoldS"),
        ];
        for (json, field) in cases {
            let cfg: AutoscalerConfig = serde_json::from_str(json).expect(json);
            let err = cfg.validate().expect_err(json);
            assert!(
                matches!(&err, Error::InvalidConfig { field: f, .. } if *f == field),
                "{json}: {err}"
            );
        }
        // The edges that are allowed.
        for json in [
            r#"{"floorHoldS": 0, "idleToZeroS": null, "waitHeadroom": 1}"#,
            r#"{"minReplicas": 64, "conductance": {"alpha": 0}, "brownOutAction": "downgrade"}"#,
        ] {
            let cfg: AutoscalerConfig = serde_json::from_str(json).expect(json);
            cfg.validate().expect(json);
        }
        assert!(serde_json::from_str::<AutoscalerConfig>(r#"{"brownOutAction": "drop"}"#).is_err());
        // Non-finite numbers (reachable from Rust, not from JSON) are rejected too.
        let nan = AutoscalerConfig {
            rho_max: f64::NAN,
            ..AutoscalerConfig::default()
        };
        assert!(nan.validate().is_err());
    }

    #[test]
    fn partial_settings_deserialize_over_defaults() {
        let cfg: AutoscalerConfig = serde_json::from_str(
            r#"{"maxReplicas": 8, "conductance": {"alpha": 0.1, "beta": 0.01, "tauS": 10}}"#,
        )
        .expect("parses");
        assert_eq!(cfg.max_replicas, 8);
        assert_eq!(cfg.rho_max, 0.7);
        assert_eq!(cfg.conductance.beta, 0.01);
    }
}
