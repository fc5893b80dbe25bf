//! The pure half of an Agent's autoscaling: which Agents scale and with what settings, who
//! owns the Deployment's `spec.replicas`, and the status a step leads to. The loop that reads
//! the sidecars and writes to the API is [`crate::autoscale`].
//!
//! ```text
//!  spec.scaling ─► autoscaler_config ─► Autoscaler (soma-autoscaler crate)
//!  Deployment.managedFields ─► replicas_managers ─► ours / foreign (a conflict, reported)
//!  Step (decision, conflict or no signal) ─► scaling_status ─► status.scaling + `Scaling`
//! ```
//!
//! `spec.replicas` changes hands in two steps, so no write ever drops it: the autoscaler
//! first applies the Deployment's current count under [`AUTOSCALER_MANAGER`] (co-owning the
//! field with `soma.dev/agent`), and only once the Deployment shows that does the Agent
//! reconcile stop applying `spec.replicas`; from then on the autoscaler changes it.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use soma_autoscaler::{AutoscalerConfig, Decision, Reason};
use soma_crds::agent::{AgentStatus, Scaling, ScalingStatus};

use super::children::FIELD_MANAGER;
use crate::kstatus::{Verdict, conditions, verdict};

/// The field manager the autoscaler sets `spec.replicas` with (never forced).
pub const AUTOSCALER_MANAGER: &str = "soma-autoscaler";

/// Condition type: what the autoscaler decided, or why it could not act.
pub const SCALING: &str = "Scaling";

/// The autoscaler's settings for an Agent, or `None` when it does not autoscale
/// (`maxReplicas` not above `max(minReplicas, 1)`). Scale to zero is not built: a
/// `minReplicas` of 0 counts as 1.
pub fn autoscaler_config(s: &Scaling) -> Option<AutoscalerConfig> {
    let min = u32::try_from(s.min_replicas.max(1)).ok()?;
    let max = u32::try_from(s.max_replicas).ok()?;
    if max <= min {
        return None;
    }
    let defaults = AutoscalerConfig::default();
    let seconds = |v: Option<i64>, default: f64| v.map_or(default, |s| s as f64);
    Some(AutoscalerConfig {
        min_replicas: min,
        max_replicas: max,
        wait_target_s: s
            .target_p95_wait_ms
            .map_or(defaults.wait_target_s, |ms| ms as f64 / 1000.0),
        floor_hold_s: seconds(s.floor_hold_seconds, defaults.floor_hold_s),
        reversal_hold_s: seconds(s.reversal_hold_seconds, defaults.reversal_hold_s),
        idle_to_zero_s: None,
        ..defaults
    })
}

/// The field managers that own the Deployment's `spec.replicas`.
pub fn replicas_managers(d: &Deployment) -> Vec<String> {
    d.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.subresource.as_deref().unwrap_or("").is_empty()
                || m.subresource.as_deref() == Some("scale")
        })
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .and_then(|f| f.0.get("f:spec"))
                .and_then(|spec| spec.get("f:replicas"))
                .is_some()
        })
        .filter_map(|m| m.manager.clone())
        .collect()
}

/// Whether the autoscaler co-owns `spec.replicas`, so the Agent reconcile may stop applying it.
pub fn autoscaler_owns_replicas(d: &Deployment) -> bool {
    replicas_managers(d).iter().any(|m| m == AUTOSCALER_MANAGER)
}

/// Managers other than Soma's own that own `spec.replicas` (`kubectl scale`, an HPA, …).
pub fn foreign_replicas_managers(d: &Deployment) -> Vec<String> {
    replicas_managers(d)
        .into_iter()
        .filter(|m| m != AUTOSCALER_MANAGER && m != FIELD_MANAGER)
        .collect()
}

/// What one step of the loop came to.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// The autoscaler decided; `applied` is what the Deployment now has.
    Decided {
        /// The decision.
        decision: Box<Decision>,
        /// Replicas the Deployment had before the step.
        current: i32,
        /// Replicas the Deployment has after the step (`current` while taking over the field).
        applied: i32,
        /// Ready pods whose sidecar answered.
        reporting: i32,
        /// The autoscaler's memory, kept in status.
        state: serde_json::Value,
        /// Whether this step changed the Deployment's replicas.
        scaled: bool,
    },
    /// Someone else owns `spec.replicas`: nothing applied.
    Conflict {
        /// Who.
        managers: Vec<String>,
        /// The Deployment's replicas.
        current: i32,
    },
    /// No ready pod's sidecar answered `GET /load`: nothing decided.
    NoSignal {
        /// Ready pods asked.
        ready: i32,
        /// The Deployment's replicas.
        current: i32,
    },
    /// The first reading after the loop (re)started: kept as the baseline, nothing decided.
    Baseline {
        /// Ready pods whose sidecar answered.
        reporting: i32,
    },
}

/// The condition reason of a decision (`ErlangFloor`, `ReversalHold`, …).
pub fn reason_name(reason: Reason) -> &'static str {
    match reason {
        Reason::Conductance => "Conductance",
        Reason::ErlangFloor => "ErlangFloor",
        Reason::FloorHold => "FloorHold",
        Reason::MinReplicas => "MinReplicas",
        Reason::Cap => "Cap",
        Reason::Idle => "Idle",
        Reason::ColdStartHold => "ColdStartHold",
        Reason::ReversalHold => "ReversalHold",
    }
}

/// The crate's serde name of a reason (`erlangFloor`), as `status.scaling.reason` shows it.
fn reason_field(reason: Reason) -> String {
    serde_json::to_value(reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The `Scaling` condition a step leads to; `None` for a baseline (nothing to say yet).
pub fn scaling_verdict(step: &Step) -> Option<Verdict> {
    match step {
        Step::Decided {
            decision: d,
            applied,
            current,
            reporting,
            ..
        } => {
            let e = &d.estimate;
            let mut message = format!(
                "{} replicas ({}): {:.2} req/s × {:.2} s from {reporting} pod(s); conductance {:.2}, Erlang-C floor {}, held floor {}",
                d.desired_replicas,
                reason_field(d.reason),
                d.sizing_arrival_rate,
                e.service_time,
                d.conductance,
                d.erlang_floor,
                d.held_floor,
            );
            if let Some(u) = d.utilisation {
                message.push_str(&format!(", predicted utilisation {:.0}%", u * 100.0));
            }
            if let Some(w) = d.p95_wait_s {
                message.push_str(&format!(", P95 wait {w:.2} s"));
            }
            if i64::from(*applied) != i64::from(d.desired_replicas) && applied == current {
                message.push_str(&format!(
                    "; the Deployment keeps {applied} while the autoscaler takes over spec.replicas (field manager {AUTOSCALER_MANAGER}); the next step applies"
                ));
            }
            if let Some(b) = &d.brown_out {
                message.push_str(&format!(
                    "; the target cannot be met: {} (brown-out from the operator is planned, nothing is shed)",
                    b.message
                ));
            }
            Some(verdict(SCALING, true, reason_name(d.reason), message))
        }
        Step::Conflict { managers, current } => Some(verdict(
            SCALING,
            false,
            "ReplicasConflict",
            format!(
                "spec.replicas of the Deployment is also managed by {} (kubectl scale, an HPA, …); the autoscaler does not fight over it and leaves {current} replicas. Remove the other owner (delete the HPA, or take the field back with `kubectl apply --server-side --force-conflicts --field-manager={AUTOSCALER_MANAGER}`), or set scaling.maxReplicas equal to scaling.minReplicas to stop autoscaling",
                managers.join(", ")
            ),
        )),
        Step::NoSignal { ready, current } => Some(verdict(
            SCALING,
            false,
            "NoLoadSignal",
            format!(
                "none of the {ready} ready pod(s) answered GET /load on the sidecar's admin port; replicas stay at {current}"
            ),
        )),
        Step::Baseline { .. } => None,
    }
}

/// The status after a step: `old` with `status.scaling` and the `Scaling` condition replaced
/// (every other field and condition is the Agent reconcile's, kept as it is).
pub fn scaling_status(
    old: Option<&AgentStatus>,
    step: &Step,
    generation: Option<i64>,
    now: &Time,
) -> AgentStatus {
    let mut status = old.cloned().unwrap_or_default();
    let Some(v) = scaling_verdict(step) else {
        return status;
    };
    let previous = old.and_then(|s| s.scaling.as_ref());
    if let Step::Decided {
        decision: d,
        current,
        reporting,
        state,
        scaled,
        ..
    } = step
    {
        status.scaling = Some(ScalingStatus {
            desired_replicas: i32::try_from(d.desired_replicas).unwrap_or(i32::MAX),
            current_replicas: *current,
            reason: reason_field(d.reason),
            conductance: round(d.conductance),
            erlang_floor: i32::try_from(d.erlang_floor).unwrap_or(i32::MAX),
            held_floor: i32::try_from(d.held_floor).unwrap_or(i32::MAX),
            arrival_rate: round(d.sizing_arrival_rate),
            service_time_s: round(d.estimate.service_time),
            utilisation: d.utilisation.map(round),
            p95_wait_s: d.p95_wait_s.map(round),
            reporting_pods: *reporting,
            last_step_time: Some(now.clone()),
            last_scale_time: if *scaled {
                Some(now.clone())
            } else {
                previous.and_then(|p| p.last_scale_time.clone())
            },
            state: Some(state.clone()),
        });
    }
    let old_conditions: &[Condition] = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let new = conditions(old_conditions, &[v], generation, now);
    status.conditions.retain(|c| c.type_ != SCALING);
    status.conditions.extend(new);
    status
}

/// Four significant decimals: enough to explain a decision, without a status that differs in
/// the fifteenth digit.
fn round(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// The `Scaling` condition's reason in a status, if any.
pub fn scaling_reason(status: Option<&AgentStatus>) -> Option<&str> {
    status
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == SCALING))
        .map(|c| c.reason.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
    use soma_autoscaler::{Autoscaler, LoadSignal};

    fn scaling(min: i32, max: i32) -> Scaling {
        Scaling {
            min_replicas: min,
            max_replicas: max,
            ..Scaling::default()
        }
    }

    #[test]
    fn only_a_range_autoscales_and_the_knobs_reach_the_autoscaler() {
        assert_eq!(autoscaler_config(&scaling(1, 1)), None);
        assert_eq!(autoscaler_config(&scaling(0, 1)), None, "0 counts as 1");
        assert_eq!(autoscaler_config(&scaling(3, 3)), None);
        let c = autoscaler_config(&Scaling {
            target_p95_wait_ms: Some(500),
            floor_hold_seconds: Some(30),
            reversal_hold_seconds: Some(10),
            ..scaling(0, 5)
        })
        .expect("autoscales");
        assert_eq!((c.min_replicas, c.max_replicas), (1, 5));
        assert_eq!(
            (c.wait_target_s, c.floor_hold_s, c.reversal_hold_s),
            (0.5, 30.0, 10.0)
        );
        assert_eq!(c.idle_to_zero_s, None, "scale to zero is not built");
        assert!(c.validate().is_ok());
        let d = autoscaler_config(&scaling(2, 4)).expect("autoscales");
        assert_eq!(d.floor_hold_s, AutoscalerConfig::default().floor_hold_s);
    }

    fn managed(
        manager: &str,
        subresource: Option<&str>,
        fields: serde_json::Value,
    ) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.to_owned()),
            operation: Some("Apply".to_owned()),
            subresource: subresource.map(str::to_owned),
            fields_v1: Some(FieldsV1(fields)),
            ..ManagedFieldsEntry::default()
        }
    }

    #[test]
    fn replicas_owners_are_read_from_managed_fields() {
        let replicas = serde_json::json!({"f:spec": {"f:replicas": {}, "f:template": {}}});
        let template = serde_json::json!({"f:spec": {"f:template": {}}});
        let mut d = Deployment::default();
        d.metadata.managed_fields = Some(vec![
            managed(FIELD_MANAGER, None, replicas.clone()),
            managed(
                "kube-controller-manager",
                Some("status"),
                serde_json::json!({"f:status": {}}),
            ),
        ]);
        assert!(!autoscaler_owns_replicas(&d));
        assert!(foreign_replicas_managers(&d).is_empty());
        d.metadata.managed_fields = Some(vec![
            managed(FIELD_MANAGER, None, template),
            managed(AUTOSCALER_MANAGER, None, replicas.clone()),
        ]);
        assert!(autoscaler_owns_replicas(&d));
        assert!(foreign_replicas_managers(&d).is_empty());
        d.metadata
            .managed_fields
            .as_mut()
            .expect("set")
            .push(managed("kubectl", Some("scale"), replicas));
        assert_eq!(foreign_replicas_managers(&d), vec!["kubectl".to_owned()]);
    }

    fn decided(replicas: u32) -> Step {
        let config = autoscaler_config(&scaling(1, 4)).expect("autoscales");
        let mut scaler = Autoscaler::new(config, 1).expect("valid");
        let decision = scaler.step(
            15.0,
            &LoadSignal {
                window_s: 15.0,
                requests: 60 * replicas as u64,
                completed: 60 * replicas as u64,
                latency_sum_s: 30.0 * replicas as f64,
                ..LoadSignal::default()
            },
        );
        let desired = decision.desired_replicas as i32;
        Step::Decided {
            decision: Box::new(decision),
            current: 1,
            applied: desired,
            reporting: 1,
            state: serde_json::to_value(scaler.snapshot()).expect("serializes"),
            scaled: desired != 1,
        }
    }

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).expect("valid time"))
    }

    #[test]
    fn a_step_sets_status_scaling_and_keeps_everything_else() {
        let old = AgentStatus {
            replicas: 1,
            budget_used: Some("12%".into()),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "Available".into(),
                message: "1 of 1 replicas ready".into(),
                observed_generation: Some(2),
                last_transition_time: at(0),
            }],
            ..AgentStatus::default()
        };
        let step = decided(4);
        let s = scaling_status(Some(&old), &step, Some(2), &at(100));
        assert_eq!(s.budget_used.as_deref(), Some("12%"));
        assert_eq!(s.conditions.len(), 2);
        let scaling = s.scaling.as_ref().expect("scaling");
        assert!(scaling.desired_replicas > 1, "{scaling:?}");
        assert_eq!(scaling.last_scale_time, Some(at(100)));
        assert!(scaling.state.is_some());
        assert_eq!(scaling_reason(Some(&s)), Some("ErlangFloor"));
        // A step that does not scale keeps the last scale time and the transition time.
        let Step::Decided {
            decision, state, ..
        } = step
        else {
            unreachable!()
        };
        let steady = Step::Decided {
            decision,
            current: scaling.desired_replicas,
            applied: scaling.desired_replicas,
            reporting: 1,
            state,
            scaled: false,
        };
        let again = scaling_status(Some(&s), &steady, Some(2), &at(115));
        let a = again.scaling.as_ref().expect("scaling");
        assert_eq!(a.last_scale_time, Some(at(100)));
        assert_eq!(a.last_step_time, Some(at(115)));
        let c = again
            .conditions
            .iter()
            .find(|c| c.type_ == SCALING)
            .expect("Scaling");
        assert_eq!(c.last_transition_time, at(100));
    }

    #[test]
    fn a_conflict_is_reported_and_changes_nothing_else() {
        let before = scaling_status(None, &decided(4), Some(1), &at(10));
        let step = Step::Conflict {
            managers: vec!["kubectl".into()],
            current: 7,
        };
        let s = scaling_status(Some(&before), &step, Some(1), &at(20));
        assert_eq!(s.scaling, before.scaling, "the last decision stays");
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == SCALING)
            .expect("Scaling");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "ReplicasConflict")
        );
        assert!(
            c.message.contains("kubectl") && c.message.contains("leaves 7 replicas"),
            "{}",
            c.message
        );
        // A baseline says nothing.
        assert_eq!(
            scaling_status(Some(&s), &Step::Baseline { reporting: 2 }, Some(1), &at(30)),
            s
        );
    }
}
