//! The pure half of an Agent's autoscaling: which Agents scale and with what settings, who
//! owns the Deployment's `spec.replicas`, and the status a step leads to. The loop that reads
//! the sidecars and writes to the API is [`crate::autoscale`].
//!
//! ```text
//!  spec.scaling ─► autoscaler_config ─► Autoscaler (soma-autoscaler crate)
//!  the Budget chain's rate caps ─► budget_rate ─► Autoscaler::set_budget_rate
//!  Deployment.managedFields ─► replicas_managers ─► ours / foreign (a conflict, reported)
//!  Step (decision, conflict or no signal) ─► scaling_status ─► status.scaling + `Scaling`
//! ```
//!
//! The brown-out a decision carries is turned into what the sidecars enforce, and the
//! `BrownOut` condition, in [`super::brownout`].
//!
//! `spec.replicas` changes hands in two steps, so no write ever drops it: the autoscaler
//! first applies the Deployment's current count under [`AUTOSCALER_MANAGER`] (co-owning the
//! field with `soma.dev/agent`), and only once the Deployment shows that does the Agent
//! reconcile stop applying `spec.replicas`; from then on the autoscaler changes it.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use soma_autoscaler::estimate::EstimatorParams;
use soma_autoscaler::{
    AutoscalerConfig, BrownOutAction, BudgetRate, ConductanceParams, Decision,
    Error as AutoscalerError, Reason,
};
use soma_crds::Job;
use soma_crds::agent::{
    AgentSpec, AgentStatus, BrownOutAction as CrdBrownOutAction, BrownOutStatus, ScalingStatus,
};

use super::brownout::{BROWN_OUT, brown_out_verdict};
use super::children::FIELD_MANAGER;
use crate::job::status::phase;
use crate::kstatus::{Verdict, conditions, verdict};

/// The field manager the autoscaler sets `spec.replicas` with (never forced).
pub const AUTOSCALER_MANAGER: &str = "soma-autoscaler";

/// Condition type: what the autoscaler decided, or why it could not act.
pub const SCALING: &str = "Scaling";

/// The most traffic a Budget chain lets through per second: the smallest `requestsPerMinute`
/// and the smallest `tokensPerMinute` along it (every Budget of the chain is charged for each
/// call). A Budget shared with other Agents gives this Agent at most the whole of it, so the
/// cap it leads to is an upper bound, never too low.
pub fn budget_rate(chain: &[soma_metering::BudgetDef]) -> BudgetRate {
    let smallest = |f: fn(&soma_metering::BudgetDef) -> Option<u64>| {
        chain
            .iter()
            .filter_map(f)
            .min()
            .map(|per_min| per_min as f64 / 60.0)
    };
    BudgetRate {
        requests_per_s: smallest(|d| d.limits.requests_per_minute),
        tokens_per_s: smallest(|d| d.limits.tokens_per_minute),
    }
}

/// The autoscaler's settings for an Agent (`spec.scaling`, every unset knob at the crate's
/// default), `None` when it does not autoscale (`maxReplicas` not above the effective
/// minimum), or the crate's refusal of a setting the CRD's rules should have stopped (an
/// object stored before they were installed).
///
/// `minReplicas: 0` is honoured only for an Agent without a `port`: Soma Jobs wake such an
/// Agent ([`wakes`]); nothing wakes one that serves a port on inbound traffic yet, so there 0
/// counts as 1 (the CRD refuses it; this covers objects stored before that rule).
pub fn autoscaler_config(spec: &AgentSpec) -> Option<Result<AutoscalerConfig, AutoscalerError>> {
    let s = &spec.scaling;
    let lowest = if spec.port.is_none() { 0 } else { 1 };
    let min = u32::try_from(s.min_replicas.max(lowest)).ok()?;
    let max = u32::try_from(s.max_replicas).ok()?;
    if max <= min {
        return None;
    }
    let d = AutoscalerConfig::default();
    let seconds = |v: Option<i64>, default: f64| v.map_or(default, |s| s as f64);
    let c = s.conductance.clone().unwrap_or_default();
    let e = s.estimator.clone().unwrap_or_default();
    let config = AutoscalerConfig {
        min_replicas: min,
        max_replicas: max,
        // A negative count cannot come through the CRD; 0 is refused by validate() by name.
        slots_per_replica: s
            .slots_per_replica
            .map_or(d.slots_per_replica, |n| u32::try_from(n).unwrap_or(0)),
        rho_max: s.max_utilisation.unwrap_or(d.rho_max),
        wait_target_s: s
            .target_p95_wait_ms
            .map_or(d.wait_target_s, |ms| ms as f64 / 1000.0),
        wait_headroom: s.wait_headroom.unwrap_or(d.wait_headroom),
        conductance: ConductanceParams {
            alpha: c.alpha.unwrap_or(d.conductance.alpha),
            beta: c.beta.unwrap_or(d.conductance.beta),
            tau_s: seconds(c.tau_seconds, d.conductance.tau_s),
        },
        estimator: EstimatorParams {
            arrival_tau_s: seconds(e.arrival_tau_seconds, d.estimator.arrival_tau_s),
            service_requests: e
                .service_requests
                .map_or(d.estimator.service_requests, |n| n as f64),
            prior_service_time_s: e
                .prior_service_time_ms
                .map_or(d.estimator.prior_service_time_s, |ms| ms as f64 / 1000.0),
            ..d.estimator
        },
        backlog_drain_s: seconds(s.backlog_drain_seconds, d.backlog_drain_s),
        floor_hold_s: seconds(s.floor_hold_seconds, d.floor_hold_s),
        idle_to_zero_s: s
            .idle_to_zero_seconds
            .map(|v| v as f64)
            .or(d.idle_to_zero_s),
        cold_start_hold_s: seconds(s.cold_start_hold_seconds, d.cold_start_hold_s),
        reversal_hold_s: seconds(s.reversal_hold_seconds, d.reversal_hold_s),
        brown_out_action: match s.brown_out_action.unwrap_or_default() {
            CrdBrownOutAction::Shed => BrownOutAction::Shed,
            CrdBrownOutAction::Downgrade => BrownOutAction::Downgrade,
        },
        ..d
    };
    Some(config.validate().map(|()| config))
}

/// Whether a Soma Job is work that wakes the Agent it references (and keeps it up): it names
/// an Agent, is not being deleted, and has not finished. A Job that is `Pending` (it will not
/// start without a change: a missing reference, a policy that denies it) does not wake it;
/// one not yet reconciled, `Waiting` (for its Budget or a slot), `Queued` (for Kueue) or
/// `Running` does.
pub fn wakes(job: &Job) -> bool {
    job.metadata.deletion_timestamp.is_none()
        && job.spec.agent_ref.is_some()
        && job
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_none_or(|p| matches!(p, phase::WAITING | phase::QUEUED | phase::RUNNING))
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
        /// The brown-out in force after this step ([`next_brown_out`]).
        brown_out: Option<BrownOutStatus>,
        /// Its revision.
        brown_out_revision: Option<i64>,
        /// The Soma Jobs referencing the Agent that wake it ([`wakes`]), by name (counted only
        /// for an Agent that may scale to zero).
        jobs: Vec<String>,
    },
    /// `spec.scaling` holds a setting the autoscaler refuses: nothing decided or applied.
    Invalid {
        /// The autoscaler's message, naming the setting.
        message: String,
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
        Reason::Idle => "ScaledToZero",
        Reason::IdleHold => "IdleHold",
        Reason::QueuedWork => "WokenByJob",
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
            jobs,
            ..
        } => {
            let e = &d.estimate;
            let mut message = match d.reason {
                Reason::Idle => "scaled to zero: no traffic, and no waiting, queued or running Soma Job that references this Agent, for scaling.idleToZeroSeconds; a Job whose spec.agentRef names the Agent wakes it. ".to_owned(),
                Reason::IdleHold => "nothing to do: one replica stays until the Agent has had no traffic and no Soma Job for scaling.idleToZeroSeconds, then it scales to zero. ".to_owned(),
                Reason::QueuedWork => format!(
                    "woken by {} Soma Job(s) that reference this Agent ({}): at least one replica while they wait or run. ",
                    jobs.len(),
                    job_list(jobs)
                ),
                _ => String::new(),
            };
            message.push_str(&format!(
                "{} replicas ({}): {:.2} req/s × {:.2} s from {reporting} pod(s), arrival burstiness {:.1}; conductance {:.2}, Erlang-C floor {}, held floor {}",
                d.desired_replicas,
                reason_field(d.reason),
                d.sizing_arrival_rate,
                e.service_time,
                e.arrival_scv,
                d.conductance,
                d.erlang_floor,
                d.held_floor,
            ));
            if !jobs.is_empty() && d.reason != Reason::QueuedWork {
                message.push_str(&format!(
                    "; {} Soma Job(s) reference it ({})",
                    jobs.len(),
                    job_list(jobs)
                ));
            }
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
                    "; the target cannot be met: {} (condition {BROWN_OUT})",
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
        Step::Invalid { message } => Some(verdict(
            SCALING,
            false,
            "InvalidSettings",
            format!(
                "spec.scaling cannot drive the autoscaler: {message} (docs/autoscaler.md maps the autoscaler's setting names to spec.scaling fields); nothing is scaled until it is corrected. The installed CRD's rules refuse such values: is it current?"
            ),
        )),
        Step::Baseline { .. } => None,
    }
}

/// At most five Job names, then how many more.
fn job_list(jobs: &[String]) -> String {
    let mut list = jobs.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if jobs.len() > 5 {
        list.push_str(&format!(" and {} more", jobs.len() - 5));
    }
    list
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
        jobs,
        brown_out,
        brown_out_revision,
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
            arrival_scv: Some(round(d.estimate.arrival_scv)),
            utilisation: d.utilisation.map(round),
            p95_wait_s: d.p95_wait_s.map(round),
            reporting_pods: *reporting,
            pending_jobs: i32::try_from(jobs.len()).unwrap_or(i32::MAX),
            last_step_time: Some(now.clone()),
            last_scale_time: if *scaled {
                Some(now.clone())
            } else {
                previous.and_then(|p| p.last_scale_time.clone())
            },
            brown_out: brown_out.clone(),
            brown_out_revision: *brown_out_revision,
            state: Some(state.clone()),
        });
    }
    let old_conditions: &[Condition] = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let verdicts: Vec<Verdict> = std::iter::once(v).chain(brown_out_verdict(step)).collect();
    let new = conditions(old_conditions, &verdicts, generation, now);
    status
        .conditions
        .retain(|c| !new.iter().any(|n| n.type_ == c.type_));
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
    use crate::agent::brownout::{brown_out_of, browned_out, contract_brown_out, next_brown_out};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
    use soma_autoscaler::{Autoscaler, LoadSignal};

    /// An Agent's spec with `scaling` (and a `port` when given).
    fn spec(scaling: serde_json::Value, port: Option<i32>) -> AgentSpec {
        let mut v = serde_json::json!({
            "image": "registry.example.com/a@sha256:00",
            "model": {"provider": "openai", "name": "gpt-4o-mini"},
            "scaling": scaling,
        });
        if let Some(port) = port {
            v["port"] = port.into();
        }
        serde_json::from_value(v).expect("a valid AgentSpec")
    }

    fn config(scaling: serde_json::Value, port: Option<i32>) -> Option<AutoscalerConfig> {
        autoscaler_config(&spec(scaling, port)).map(|r| r.expect("valid settings"))
    }

    #[test]
    fn the_budget_rate_is_the_smallest_rate_cap_along_the_chain() {
        let def = |name: &str, limits: serde_json::Value| {
            let b: soma_crds::Budget = serde_json::from_value(serde_json::json!({
                "apiVersion": "soma.dev/v1alpha1", "kind": "Budget",
                "metadata": {"name": name, "namespace": "a"},
                "spec": {"limits": limits, "period": {"calendar": "month"}}
            }))
            .expect("a valid Budget");
            crate::budget::def::budget_def(&b)
        };
        let chain = [
            def(
                "team",
                serde_json::json!({"requestsPerMinute": 600, "costMicros": 5}),
            ),
            def(
                "org",
                serde_json::json!({"requestsPerMinute": 120, "tokensPerMinute": 60000}),
            ),
            def("top", serde_json::json!({"tokensPerMinute": 120000})),
        ];
        assert_eq!(
            budget_rate(&chain),
            BudgetRate {
                requests_per_s: Some(2.0),
                tokens_per_s: Some(1000.0)
            }
        );
        // No rate cap anywhere (spend caps only), or no Budget: no bound.
        assert_eq!(budget_rate(&chain[..1][..0]), BudgetRate::default());
        assert_eq!(
            budget_rate(&[def("spend", serde_json::json!({"costMicros": 5}))]),
            BudgetRate::default()
        );
    }

    #[test]
    fn only_a_range_autoscales_and_the_knobs_reach_the_autoscaler() {
        use serde_json::json;
        assert_eq!(
            config(json!({"minReplicas": 1, "maxReplicas": 1}), None),
            None
        );
        assert_eq!(
            config(json!({"minReplicas": 3, "maxReplicas": 3}), None),
            None
        );
        // An Agent that serves a port: 0 counts as 1 (no wake path for inbound traffic).
        assert_eq!(
            config(json!({"minReplicas": 0, "maxReplicas": 1}), Some(8080)),
            None
        );
        let c =
            config(json!({"minReplicas": 0, "maxReplicas": 5}), Some(8080)).expect("autoscales");
        assert_eq!(c.min_replicas, 1);
        // A worker (no port): 0 is honoured, 0..1 autoscales, the idle rule has its default.
        let w = config(json!({"minReplicas": 0, "maxReplicas": 1}), None).expect("autoscales");
        assert_eq!((w.min_replicas, w.max_replicas), (0, 1));
        assert_eq!(w.idle_to_zero_s, AutoscalerConfig::default().idle_to_zero_s);
        // Unset knobs are the crate's defaults.
        let d = config(json!({"minReplicas": 2, "maxReplicas": 4}), None).expect("autoscales");
        assert_eq!(
            d,
            AutoscalerConfig {
                min_replicas: 2,
                max_replicas: 4,
                ..AutoscalerConfig::default()
            }
        );
        // Every knob reaches its setting, in the crate's units.
        let c = config(
            json!({
                "minReplicas": 0, "maxReplicas": 9, "targetP95WaitMs": 500,
                "maxUtilisation": 0.6, "waitHeadroom": 0.8, "slotsPerReplica": 4,
                "conductance": {"alpha": 0.01, "beta": 0.005, "tauSeconds": 45},
                "estimator": {"arrivalTauSeconds": 90, "serviceRequests": 200, "priorServiceTimeMs": 2500},
                "backlogDrainSeconds": 30, "floorHoldSeconds": 30, "reversalHoldSeconds": 10,
                "idleToZeroSeconds": 600, "coldStartHoldSeconds": 20, "brownOutAction": "downgrade",
            }),
            None,
        )
        .expect("autoscales");
        let want = AutoscalerConfig {
            min_replicas: 0,
            max_replicas: 9,
            slots_per_replica: 4,
            rho_max: 0.6,
            wait_target_s: 0.5,
            wait_headroom: 0.8,
            conductance: ConductanceParams {
                alpha: 0.01,
                beta: 0.005,
                tau_s: 45.0,
            },
            estimator: EstimatorParams {
                arrival_tau_s: 90.0,
                service_requests: 200.0,
                prior_service_time_s: 2.5,
                ..EstimatorParams::default()
            },
            backlog_drain_s: 30.0,
            floor_hold_s: 30.0,
            idle_to_zero_s: Some(600.0),
            cold_start_hold_s: 20.0,
            reversal_hold_s: 10.0,
            brown_out_action: BrownOutAction::Downgrade,
            ..AutoscalerConfig::default()
        };
        assert_eq!(c, want);
        // One conductance field set: the others keep their defaults.
        let one = config(
            json!({"maxReplicas": 3, "conductance": {"beta": 0.01}}),
            None,
        )
        .expect("autoscales");
        assert_eq!(one.conductance.alpha, ConductanceParams::DEFAULT.alpha);
        assert_eq!(one.conductance.beta, 0.01);
    }

    #[test]
    fn a_setting_the_crd_should_have_refused_is_named_not_used() {
        let bad = autoscaler_config(&spec(
            serde_json::json!({"maxReplicas": 3, "maxUtilisation": 1.5}),
            None,
        ))
        .expect("a range");
        let err = bad.expect_err("rhoMax 1.5 refused");
        assert!(err.to_string().contains("rhoMax"), "{err}");
        let v = scaling_verdict(&Step::Invalid {
            message: err.to_string(),
        })
        .expect("a condition");
        assert_eq!((v.status, v.reason.as_str()), (false, "InvalidSettings"));
        assert!(v.message.contains("rhoMax") && v.message.contains("nothing is scaled"));
    }

    fn job(phase: Option<&str>, agent: Option<&str>, deleting: bool) -> Job {
        let mut j: Job = serde_json::from_value(serde_json::json!({
            "apiVersion": "soma.dev/v1alpha1", "kind": "Job",
            "metadata": {"name": "j", "namespace": "ns"},
            "spec": {"deadlineSeconds": 60},
        }))
        .expect("a Job");
        j.spec.agent_ref = agent.map(|a| soma_crds::LocalRef { name: a.to_owned() });
        j.status = phase.map(|p| soma_crds::JobStatus {
            phase: Some(p.to_owned()),
            ..Default::default()
        });
        if deleting {
            j.metadata.deletion_timestamp = Some(at(5));
        }
        j
    }

    #[test]
    fn unfinished_jobs_that_can_run_wake_their_agent() {
        for (phase, wake) in [
            (None, true),
            (Some("Waiting"), true),
            (Some("Queued"), true),
            (Some("Running"), true),
            (Some("Pending"), false),
            (Some("Succeeded"), false),
            (Some("Failed"), false),
            (Some("Scheduled"), false),
        ] {
            assert_eq!(wakes(&job(phase, Some("a"), false)), wake, "{phase:?}");
        }
        assert!(
            !wakes(&job(Some("Running"), Some("a"), true)),
            "being deleted"
        );
        assert!(!wakes(&job(None, None, false)), "a template or a drill");
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
        let config = config(
            serde_json::json!({"minReplicas": 1, "maxReplicas": 4}),
            None,
        )
        .expect("autoscales");
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
            jobs: Vec::new(),
            brown_out: None,
            brown_out_revision: None,
        }
    }

    /// A worker (minReplicas 0) stepped with `jobs` waking it and no traffic, from `replicas`.
    fn worker(replicas: u32, jobs: &[&str], idle_for: f64) -> Step {
        let config = config(
            serde_json::json!({"minReplicas": 0, "maxReplicas": 2, "idleToZeroSeconds": 60}),
            None,
        )
        .expect("autoscales");
        let mut scaler = Autoscaler::new(config, replicas).expect("valid");
        let quiet = LoadSignal {
            window_s: 15.0,
            ..LoadSignal::default()
        };
        scaler.step(0.0, &quiet);
        scaler.set_queued_work(jobs.len() as u64);
        let decision = scaler.step(idle_for, &quiet);
        let desired = decision.desired_replicas as i32;
        Step::Decided {
            decision: Box::new(decision),
            current: replicas as i32,
            applied: desired,
            reporting: 0,
            state: serde_json::to_value(scaler.snapshot()).expect("serializes"),
            scaled: desired != replicas as i32,
            jobs: jobs.iter().map(|j| (*j).to_owned()).collect(),
            brown_out: None,
            brown_out_revision: None,
        }
    }

    #[test]
    fn status_says_why_a_worker_is_at_zero_or_awake() {
        let condition = |s: &AgentStatus| {
            s.conditions
                .iter()
                .find(|c| c.type_ == SCALING)
                .cloned()
                .expect("Scaling")
        };
        let zero = scaling_status(None, &worker(1, &[], 60.0), Some(1), &at(60));
        let z = zero.scaling.as_ref().expect("scaling");
        assert_eq!(
            (z.desired_replicas, z.reason.as_str(), z.pending_jobs),
            (0, "idle", 0)
        );
        let c = condition(&zero);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "ScaledToZero")
        );
        assert!(
            c.message.contains("scaled to zero") && c.message.contains("spec.agentRef"),
            "{}",
            c.message
        );
        let held = scaling_status(None, &worker(1, &[], 30.0), Some(1), &at(30));
        assert_eq!(condition(&held).reason, "IdleHold");
        assert_eq!(held.scaling.as_ref().expect("scaling").desired_replicas, 1);
        let woken = scaling_status(
            Some(&zero),
            &worker(0, &["digest-1", "digest-2"], 75.0),
            Some(1),
            &at(75),
        );
        let w = woken.scaling.as_ref().expect("scaling");
        assert_eq!(
            (w.desired_replicas, w.reason.as_str(), w.pending_jobs),
            (1, "queuedWork", 2)
        );
        let c = condition(&woken);
        assert_eq!(c.reason, "WokenByJob");
        assert!(
            c.message.contains("woken by 2 Soma Job(s)")
                && c.message.contains("digest-1, digest-2"),
            "{}",
            c.message
        );
        assert_eq!(w.last_scale_time, Some(at(75)));
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
        // Ready kept; Scaling and BrownOut (False: the target is met) added.
        assert_eq!(s.conditions.len(), 3);
        assert!(!browned_out(Some(&s)));
        let scaling = s.scaling.as_ref().expect("scaling");
        assert!(scaling.desired_replicas > 1, "{scaling:?}");
        assert_eq!(scaling.last_scale_time, Some(at(100)));
        assert!(scaling.state.is_some());
        assert_eq!(scaling_reason(Some(&s)), Some("ErlangFloor"));
        // A step that does not scale keeps the last scale time and the transition time.
        let Step::Decided {
            decision,
            state,
            brown_out,
            brown_out_revision,
            ..
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
            jobs: Vec::new(),
            brown_out,
            brown_out_revision,
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

    fn crate_brown_out(fraction: f64, action: BrownOutAction) -> soma_autoscaler::BrownOut {
        soma_autoscaler::BrownOut {
            cause: soma_autoscaler::BrownOutCause::MaxReplicas,
            action,
            fraction,
            needed_replicas: Some(9),
            allowed_replicas: 2,
            message: format!("maxReplicas is 2; shedding {:.0}%", fraction * 100.0),
        }
    }

    #[test]
    fn a_brown_out_is_published_rounded_up_and_only_what_the_sidecars_can_do() {
        assert_eq!(brown_out_of(None, None), None);
        let b = brown_out_of(Some(&crate_brown_out(0.4213, BrownOutAction::Shed)), None).unwrap();
        assert_eq!(
            (b.fraction, b.action.as_str(), b.model.as_deref()),
            (0.43, "shed", None)
        );
        assert!(contract_brown_out(&b).validate().is_ok());
        // Exactly a percent stays that percent; a crumb is not a brown-out.
        let exact = brown_out_of(Some(&crate_brown_out(0.25, BrownOutAction::Shed)), None).unwrap();
        assert_eq!(exact.fraction, 0.25);
        assert_eq!(
            brown_out_of(Some(&crate_brown_out(1e-12, BrownOutAction::Shed)), None),
            None
        );
        // Downgrading needs a model: without one, shed (and say so).
        let d = brown_out_of(Some(&crate_brown_out(0.5, BrownOutAction::Downgrade)), None).unwrap();
        assert_eq!(d.action, "shed");
        assert!(d.message.contains("shed instead"), "{}", d.message);
        let d = brown_out_of(
            Some(&crate_brown_out(0.5, BrownOutAction::Downgrade)),
            Some("mini"),
        )
        .unwrap();
        assert_eq!(
            (d.action.as_str(), d.model.as_deref()),
            ("downgrade", Some("mini"))
        );
        assert!(contract_brown_out(&d).validate().is_ok());
    }

    #[test]
    fn a_new_revision_only_when_the_brown_out_changes_and_never_backwards() {
        let shed = |f: f64| brown_out_of(Some(&crate_brown_out(f, BrownOutAction::Shed)), None);
        let (b, r) = next_brown_out(None, None, 1_000);
        assert_eq!((b, r), (None, None), "never engaged: nothing to publish");
        let (b, r) = next_brown_out(None, shed(0.3), 1_000);
        assert_eq!(
            (b.as_ref().map(|b| b.fraction), r),
            (Some(0.3), Some(1_000))
        );
        let mut prev = ScalingStatus {
            brown_out: b,
            brown_out_revision: r,
            ..ScalingStatus::default()
        };
        // The same share with new figures in the message: nothing new.
        let mut same = shed(0.3);
        same.as_mut().unwrap().message = "other figures".into();
        let (b, r) = next_brown_out(Some(&prev), same, 2_000);
        assert_eq!((b, r), (prev.brown_out.clone(), Some(1_000)));
        // Cleared by a leader whose clock is behind: still a newer revision.
        let (b, r) = next_brown_out(Some(&prev), None, 500);
        assert_eq!((b, r), (None, Some(1_001)));
        prev.brown_out = None;
        prev.brown_out_revision = r;
        assert_eq!(
            next_brown_out(Some(&prev), None, 9_000),
            (None, Some(1_001))
        );
    }

    #[test]
    fn the_brown_out_condition_follows_the_decision_and_a_conflict_keeps_it() {
        let Step::Decided {
            decision,
            current,
            applied,
            reporting,
            state,
            scaled,
            ..
        } = decided(4)
        else {
            unreachable!()
        };
        let mut decision = *decision;
        decision.brown_out = Some(crate_brown_out(0.42, BrownOutAction::Shed));
        let engaged = Step::Decided {
            brown_out: brown_out_of(decision.brown_out.as_ref(), None),
            brown_out_revision: Some(100_000),
            decision: Box::new(decision.clone()),
            current,
            applied,
            reporting,
            state: state.clone(),
            scaled,
            jobs: Vec::new(),
        };
        let s = scaling_status(None, &engaged, Some(1), &at(100));
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == BROWN_OUT)
            .expect("BrownOut");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Shedding"));
        assert_eq!(c.message, "maxReplicas is 2; shedding 42%");
        assert!(browned_out(Some(&s)));
        let scaling = s.scaling.as_ref().expect("scaling");
        assert_eq!(scaling.brown_out.as_ref().map(|b| b.fraction), Some(0.42));
        assert_eq!(scaling.brown_out_revision, Some(100_000));
        // A conflict says nothing about the brown-out: it stays as it was.
        let conflict = Step::Conflict {
            managers: vec!["kubectl".into()],
            current: 2,
        };
        let k = scaling_status(Some(&s), &conflict, Some(1), &at(110));
        assert!(browned_out(Some(&k)));
        assert_eq!(k.scaling, s.scaling);
        // Cleared.
        decision.brown_out = None;
        let cleared = Step::Decided {
            brown_out: None,
            brown_out_revision: Some(100_001),
            decision: Box::new(decision),
            current,
            applied,
            reporting,
            state,
            scaled,
            jobs: Vec::new(),
        };
        let c2 = scaling_status(Some(&k), &cleared, Some(1), &at(120));
        let c = c2
            .conditions
            .iter()
            .find(|c| c.type_ == BROWN_OUT)
            .expect("BrownOut");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "NoBrownOut")
        );
        assert_eq!(c.last_transition_time, at(120));
        assert!(!browned_out(Some(&c2)));
        assert_eq!(
            c2.conditions
                .iter()
                .filter(|c| c.type_ == BROWN_OUT)
                .count(),
            1
        );
    }
}
