//! Prometheus metrics: one registry, a sub-registry per subsystem (`soma_` prefix). The
//! reconcile metrics are labelled by controller, and failures by the error's label.
//!
//! What each series means, and the dashboards and alerts built on them:
//! `docs/observability.md`.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the reconcile counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// `agent`, later `budget`, `capsule`, `job`.
    pub controller: String,
}

/// Labels of the failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// The controller.
    pub controller: String,
    /// The error's label (`ApplyFailed`, `ReadFailed`, …).
    pub reason: String,
}

/// Labels of the per-Budget metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct BudgetLabels {
    /// The Budget's namespace.
    pub namespace: String,
    /// The Budget's name.
    pub budget: String,
}

/// Per-Budget figures, from the ledger, exported once by the operator (not by each sidecar,
/// so a dashboard sums nothing twice).
#[derive(Debug, Default)]
struct BudgetMetrics {
    used_ratio: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    threshold_reached: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    spent_micros: Family<BudgetLabels, Gauge>,
    spent_tokens: Family<BudgetLabels, Gauge>,
    remaining_micros: Family<BudgetLabels, Gauge>,
    remaining_tokens: Family<BudgetLabels, Gauge>,
    limit_micros: Family<BudgetLabels, Gauge>,
    limit_tokens: Family<BudgetLabels, Gauge>,
    exhausted: Family<BudgetLabels, Gauge>,
    refusals: Family<BudgetLabels, Counter>,
    brownouts: Family<BudgetLabels, Counter>,
    /// Per Budget: the period and the refusal and brown-out totals last seen in it, so the
    /// counters grow by what is new.
    seen: Mutex<BTreeMap<BudgetLabels, Seen>>,
}

/// Labels of the per-Agent autoscaler metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct AgentLabels {
    /// The Agent's namespace.
    pub namespace: String,
    /// The Agent's name.
    pub agent: String,
}

/// Labels of the autoscaler's decision counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// The Agent's namespace.
    pub namespace: String,
    /// The Agent's name.
    pub agent: String,
    /// `up`, `down` or `none`: the decided count against the previous decision's.
    pub direction: String,
    /// Which rule set the count (`ErlangFloor`, `Conductance`, `Cap`, …).
    pub reason: String,
}

/// The scaling loop's figures per Agent (exported by the leader, which runs the loop).
#[derive(Debug, Default)]
struct AutoscalerMetrics {
    conductance: Family<AgentLabels, Gauge<f64, AtomicU64>>,
    desired: Family<AgentLabels, Gauge>,
    brownout: Family<AgentLabels, Gauge<f64, AtomicU64>>,
    decisions: Family<DecisionLabels, Counter>,
    /// Per Agent: the (direction, reason) pairs counted, so its series can all be removed.
    seen: Mutex<BTreeMap<AgentLabels, std::collections::BTreeSet<(String, String)>>>,
}

/// Labels of the per-Job metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct JobLabels {
    /// The Job's namespace.
    pub namespace: String,
    /// The Job's name (not `job`: Prometheus sets `job` to the scrape job and renames a
    /// target's own `job` label to `exported_job`).
    pub name: String,
}

/// Labels of the finished-Jobs counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobOutcomeLabels {
    /// The Job's namespace.
    pub namespace: String,
    /// `Succeeded` or `Failed`.
    pub phase: String,
}

/// Per-Job figures: the DR drills' results, for alerts (`soma_drill_passed == 0`).
#[derive(Debug, Default)]
struct JobMetrics {
    finished: Family<JobOutcomeLabels, Counter>,
    drill_passed: Family<JobLabels, Gauge>,
    drill_rpo: Family<JobLabels, Gauge<f64, AtomicU64>>,
    drill_rto: Family<JobLabels, Gauge<f64, AtomicU64>>,
    drill_records: Family<JobLabels, Gauge>,
}

/// A Budget's period and its refusal and brown-out totals last seen in it.
type Seen = (Option<String>, i64, i64);

/// Labels of the signature verification counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerificationLabels {
    /// `capsule` or `image`.
    pub kind: String,
    /// `verified`, `rejected` (the signature or content does not pass) or `error` (the
    /// registry did not answer: retried).
    pub outcome: String,
    /// `Verified`, or the rejection's reason (`Unsigned`, `WrongKey`, `RegistryUnreachable`, ...).
    pub reason: String,
}

/// Labels of the verification duration histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerificationKind {
    /// `capsule` or `image`.
    pub kind: String,
}

/// Labels of the per-object rejection gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct RejectedLabels {
    /// `capsule` (the Capsule) or `image` (the Agent whose image it is).
    pub kind: String,
    /// The object's namespace.
    pub namespace: String,
    /// The Capsule's or the Agent's name.
    pub name: String,
    /// Why it is rejected.
    pub reason: String,
}

/// Labels of the ledger error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LedgerLabels {
    /// `read` (spend, leases, a Budget's live definition), `seal`, or `live` (an Agent's
    /// brown-out, published by the scaling loop).
    pub operation: String,
}

/// What a verifier answered, for [`Metrics::signature_verified`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The signature verified.
    Verified,
    /// The signature (or the content it covers) does not pass.
    Rejected,
    /// The check could not be made (a registry that did not answer); retried.
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Verified => "verified",
            Outcome::Rejected => "rejected",
            Outcome::Error => "error",
        }
    }
}

/// Signature verification: how often each verifier answered what, how long it took, and
/// which objects are held back by a rejection now.
#[derive(Debug)]
struct SignatureMetrics {
    verifications: Family<VerificationLabels, Counter>,
    duration: Family<VerificationKind, Histogram>,
    rejected: Family<RejectedLabels, Gauge>,
    /// The reason each object is rejected for now, so a new reason replaces the old series.
    current: Mutex<BTreeMap<(String, String, String), String>>,
}

/// The operator's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    budgets: BudgetMetrics,
    signatures: SignatureMetrics,
    ledger_errors: Family<LedgerLabels, Counter>,
    jobs: JobMetrics,
    autoscaler: AutoscalerMetrics,
    reconciles: Family<ControllerLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    duration: Family<ControllerLabels, Histogram>,
    status_writes: Family<ControllerLabels, Counter>,
    child_writes: Family<ControllerLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(|_| {})
    }
}

impl Metrics {
    /// The operator's metrics, plus whatever `register` adds to the same registry (the
    /// webhook's, which share the `soma_` names they were given).
    pub fn new(register: impl FnOnce(&mut Registry)) -> Self {
        let mut registry = Registry::default();
        register(&mut registry);
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        let status_writes = Family::<ControllerLabels, Counter>::default();
        let child_writes = Family::<ControllerLabels, Counter>::default();
        let budgets = BudgetMetrics::default();
        let signatures = SignatureMetrics {
            verifications: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 14))
            }),
            rejected: Family::default(),
            current: Mutex::default(),
        };
        let ledger_errors = Family::<LedgerLabels, Counter>::default();
        // At zero from the start, so an alert on rate() or increase() sees the first error.
        for operation in ["live", "read", "seal"] {
            drop(ledger_errors.get_or_create(&LedgerLabels {
                operation: operation.to_owned(),
            }));
        }
        let jobs = JobMetrics::default();
        let autoscaler = AutoscalerMetrics::default();
        let soma = registry.sub_registry_with_prefix("soma");
        soma.register(
            "autoscaler_conductance",
            "Conductance C of the Agent's route, in replicas, at the scaling loop's last step",
            autoscaler.conductance.clone(),
        );
        soma.register(
            "autoscaler_desired_replicas",
            "Replicas the Agent's autoscaler decided at its last step",
            autoscaler.desired.clone(),
        );
        soma.register(
            "autoscaler_decisions",
            "Autoscaler steps that decided, by direction (up, down, none) and the rule that set the count",
            autoscaler.decisions.clone(),
        );
        soma.register(
            "autoscaler_brownout",
            "Share of the Agent's lowest-priority traffic its sidecars are asked to shed or downgrade (0: no brown-out)",
            autoscaler.brownout.clone(),
        );
        soma.register(
            "jobs_finished",
            "Jobs that finished, by namespace and phase (Succeeded, Failed)",
            jobs.finished.clone(),
        );
        soma.register(
            "drill_passed",
            "1 when the DR drill's last run verified the restore, 0 when it failed",
            jobs.drill_passed.clone(),
        );
        soma.register(
            "drill_rpo_seconds",
            "The DR drill's last measured recovery point: seconds of committed usage its backup missed",
            jobs.drill_rpo.clone(),
        );
        soma.register(
            "drill_rto_seconds",
            "The DR drill's last measured recovery time: seconds from the start of the restore to a verified restore",
            jobs.drill_rto.clone(),
        );
        soma.register(
            "drill_records_restored",
            "Usage records the DR drill's last run restored and verified",
            jobs.drill_records.clone(),
        );
        let b = &budgets;
        soma.register(
            "budget_used_ratio",
            "Share of the Budget's tightest period cap spent or reserved (1 = used up)",
            b.used_ratio.clone(),
        );
        soma.register(
            "budget_threshold_reached_ratio",
            "The highest of the Budget's spec.thresholds reached this period, as a ratio (0: none)",
            b.threshold_reached.clone(),
        );
        soma.register(
            "budget_spent_micros",
            "Cost recorded in the ledger for the Budget's current period, in micros",
            b.spent_micros.clone(),
        );
        soma.register(
            "budget_spent_tokens",
            "Tokens recorded in the ledger for the Budget's current period",
            b.spent_tokens.clone(),
        );
        soma.register(
            "budget_remaining_micros",
            "Cost left under limits.costMicros in the current period",
            b.remaining_micros.clone(),
        );
        soma.register(
            "budget_remaining_tokens",
            "Tokens left under limits.tokens in the current period",
            b.remaining_tokens.clone(),
        );
        soma.register(
            "budget_limit_micros",
            "The Budget's limits.costMicros",
            b.limit_micros.clone(),
        );
        soma.register(
            "budget_limit_tokens",
            "The Budget's limits.tokens",
            b.limit_tokens.clone(),
        );
        soma.register(
            "budget_exhausted",
            "1 while a period cap of the Budget is used up",
            b.exhausted.clone(),
        );
        soma.register(
            "budget_refusals",
            "Requests the sidecars refused because of this Budget",
            b.refusals.clone(),
        );
        soma.register(
            "budget_brownouts",
            "Requests the sidecars sent to the Budget's brown-out model",
            b.brownouts.clone(),
        );
        soma.register(
            "signature_verifications",
            "Signature checks answered by the verifier (cached answers not counted), by kind, outcome and reason",
            signatures.verifications.clone(),
        );
        soma.register(
            "signature_verification_duration_seconds",
            "Time one signature check took (registry round trips included), by kind",
            signatures.duration.clone(),
        );
        soma.register(
            "signature_rejected",
            "1 while a Capsule, or an Agent's image, is held back because its signature or content was rejected",
            signatures.rejected.clone(),
        );
        soma.register(
            "ledger_errors",
            "Operator requests to the usage ledger that failed, by operation (read, seal)",
            ledger_errors.clone(),
        );
        soma.register("reconcile", "Reconciles started", reconciles.clone());
        soma.register(
            "reconcile_failures",
            "Reconciles that failed, by error",
            failures.clone(),
        );
        soma.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            duration.clone(),
        );
        soma.register(
            "status_writes",
            "Status patches written (only when the status changed)",
            status_writes.clone(),
        );
        soma.register(
            "child_writes",
            "Child objects applied or deleted (only when they differed)",
            child_writes.clone(),
        );
        Self {
            registry,
            budgets,
            signatures,
            ledger_errors,
            jobs,
            autoscaler,
            reconciles,
            failures,
            duration,
            status_writes,
            child_writes,
        }
    }
}

impl Metrics {
    /// Counts a reconcile and returns a guard that records its duration when dropped.
    pub fn reconcile_started(&self, controller: &str) -> ReconcileTimer<'_> {
        let labels = ControllerLabels {
            controller: controller.to_owned(),
        };
        self.reconciles.get_or_create(&labels).inc();
        ReconcileTimer {
            metrics: self,
            labels,
            start: Instant::now(),
        }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, controller: &str, reason: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                controller: controller.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts a status write.
    pub fn status_written(&self, controller: &str) {
        self.status_writes
            .get_or_create(&ControllerLabels {
                controller: controller.to_owned(),
            })
            .inc();
    }

    /// Counts a child write.
    pub fn child_written(&self, controller: &str) {
        self.child_writes
            .get_or_create(&ControllerLabels {
                controller: controller.to_owned(),
            })
            .inc();
    }

    /// Records a Budget's figures from its status.
    pub fn budget(
        &self,
        namespace: &str,
        name: &str,
        def: &soma_metering::BudgetDef,
        status: &soma_crds::BudgetStatus,
    ) {
        let l = BudgetLabels {
            namespace: namespace.to_owned(),
            budget: name.to_owned(),
        };
        let b = &self.budgets;
        let set = |f: &Family<BudgetLabels, Gauge>, v: Option<i64>| match v {
            Some(v) => {
                f.get_or_create(&l).set(v);
            }
            None => {
                f.remove(&l);
            }
        };
        let cap = |c: Option<u64>| c.map(|c| i64::try_from(c).unwrap_or(i64::MAX));
        set(&b.limit_micros, cap(def.limits.cost_micros));
        set(&b.limit_tokens, cap(def.limits.tokens));
        let mut seen = b
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let last = seen
            .entry(l.clone())
            .or_insert((status.period_start.clone(), 0, 0));
        if status.spend_source.as_deref() != Some("Ledger") {
            return;
        }
        b.used_ratio
            .get_or_create(&l)
            .set(status.percent_used.map_or(0.0, |p| p as f64 / 100.0));
        b.threshold_reached.get_or_create(&l).set(
            status
                .thresholds_reached
                .iter()
                .max()
                .map_or(0.0, |t| f64::from(*t) / 100.0),
        );
        set(&b.spent_micros, Some(status.spent_micros));
        set(&b.spent_tokens, Some(status.spent_tokens));
        set(&b.remaining_micros, status.remaining_micros);
        set(&b.remaining_tokens, status.remaining_tokens);
        let exhausted = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Exhausted" && c.status == "True");
        b.exhausted.get_or_create(&l).set(i64::from(exhausted));
        if last.0 != status.period_start {
            *last = (status.period_start.clone(), 0, 0);
        }
        let grow = |c: &Counter, now: i64, before: i64| {
            if let Ok(d) = u64::try_from(now - before) {
                c.inc_by(d);
            }
        };
        grow(&b.refusals.get_or_create(&l), status.refusals, last.1);
        grow(&b.brownouts.get_or_create(&l), status.brown_outs, last.2);
        last.1 = last.1.max(status.refusals);
        last.2 = last.2.max(status.brown_outs);
    }

    /// Forgets the series of a deleted Budget.
    pub fn forget_budget(&self, namespace: &str, name: &str) {
        let l = BudgetLabels {
            namespace: namespace.to_owned(),
            budget: name.to_owned(),
        };
        let b = &self.budgets;
        b.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&l);
        b.used_ratio.remove(&l);
        b.threshold_reached.remove(&l);
        for f in [
            &b.spent_micros,
            &b.spent_tokens,
            &b.remaining_micros,
            &b.remaining_tokens,
            &b.limit_micros,
            &b.limit_tokens,
            &b.exhausted,
        ] {
            f.remove(&l);
        }
        b.refusals.remove(&l);
        b.brownouts.remove(&l);
    }

    /// Counts one answer of a signature verifier (`kind`: `capsule` or `image`) and how long
    /// it took.
    pub fn signature_verified(&self, kind: &str, outcome: Outcome, reason: &str, seconds: f64) {
        let s = &self.signatures;
        s.verifications
            .get_or_create(&VerificationLabels {
                kind: kind.to_owned(),
                outcome: outcome.label().to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
        s.duration
            .get_or_create(&VerificationKind {
                kind: kind.to_owned(),
            })
            .observe(seconds);
    }

    /// Records whether the Capsule (or the Agent's image) `namespace/name` is held back by a
    /// signature rejection now: `Some(reason)` sets `soma_signature_rejected` to 1 with that
    /// reason, `None` removes it.
    pub fn signature_state(&self, kind: &str, namespace: &str, name: &str, rejected: Option<&str>) {
        let s = &self.signatures;
        let key = (kind.to_owned(), namespace.to_owned(), name.to_owned());
        let mut current = s
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let labels = |reason: &str| RejectedLabels {
            kind: kind.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(old) = current.get(&key)
            && rejected != Some(old.as_str())
        {
            s.rejected.remove(&labels(old));
            current.remove(&key);
        }
        if let Some(reason) = rejected {
            s.rejected.get_or_create(&labels(reason)).set(1);
            current.insert(key, reason.to_owned());
        }
    }

    /// Records one decision of an Agent's autoscaler.
    #[allow(clippy::too_many_arguments)]
    pub fn autoscaler_decided(
        &self,
        namespace: &str,
        agent: &str,
        conductance: f64,
        desired: i64,
        direction: &str,
        reason: &str,
        brownout: f64,
    ) {
        let l = AgentLabels {
            namespace: namespace.to_owned(),
            agent: agent.to_owned(),
        };
        let a = &self.autoscaler;
        a.conductance.get_or_create(&l).set(conductance);
        a.desired.get_or_create(&l).set(desired);
        a.brownout.get_or_create(&l).set(brownout);
        a.decisions
            .get_or_create(&DecisionLabels {
                namespace: namespace.to_owned(),
                agent: agent.to_owned(),
                direction: direction.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
        a.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(l)
            .or_default()
            .insert((direction.to_owned(), reason.to_owned()));
    }

    /// Forgets the autoscaler series of every Agent not in `scaled` (`namespace`, `name`):
    /// deleted, or no longer autoscaled.
    pub fn autoscaler_retain(&self, scaled: &[(String, String)]) {
        let a = &self.autoscaler;
        let mut seen = a
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let gone: Vec<AgentLabels> = seen
            .keys()
            .filter(|l| {
                !scaled
                    .iter()
                    .any(|(n, g)| *n == l.namespace && *g == l.agent)
            })
            .cloned()
            .collect();
        for l in gone {
            a.conductance.remove(&l);
            a.desired.remove(&l);
            a.brownout.remove(&l);
            for (direction, reason) in seen.remove(&l).unwrap_or_default() {
                a.decisions.remove(&DecisionLabels {
                    namespace: l.namespace.clone(),
                    agent: l.agent.clone(),
                    direction,
                    reason,
                });
            }
        }
    }

    /// Counts a failed request of the operator to the usage ledger (`read`, `seal` or `live`).
    pub fn ledger_error(&self, operation: &str) {
        self.ledger_errors
            .get_or_create(&LedgerLabels {
                operation: operation.to_owned(),
            })
            .inc();
    }

    /// Records a Job's drill figures from its status (nothing for a task, or a drill that has
    /// not reported). The namespace's finished-Jobs counters exist at 0 from its first Job on,
    /// so an alert on `increase()` sees the first finished Job of each phase.
    pub fn job(&self, namespace: &str, name: &str, status: Option<&soma_crds::JobStatus>) {
        for phase in ["Succeeded", "Failed"] {
            drop(self.jobs.finished.get_or_create(&JobOutcomeLabels {
                namespace: namespace.to_owned(),
                phase: phase.to_owned(),
            }));
        }
        let Some(d) = status.and_then(|s| s.drill.as_ref()) else {
            return;
        };
        let l = JobLabels {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let j = &self.jobs;
        j.drill_passed
            .get_or_create(&l)
            .set(i64::from(d.outcome == "Passed"));
        j.drill_rpo.get_or_create(&l).set(d.rpo_seconds);
        j.drill_rto.get_or_create(&l).set(d.rto_seconds);
        j.drill_records.get_or_create(&l).set(d.records_restored);
    }

    /// Counts a Job that just finished.
    pub fn job_finished(&self, namespace: &str, phase: Option<&str>) {
        self.jobs
            .finished
            .get_or_create(&JobOutcomeLabels {
                namespace: namespace.to_owned(),
                phase: phase.unwrap_or_default().to_owned(),
            })
            .inc();
    }

    /// Forgets the series of a deleted Job.
    pub fn forget_job(&self, namespace: &str, name: &str) {
        let l = JobLabels {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let j = &self.jobs;
        j.drill_passed.remove(&l);
        j.drill_rpo.remove(&l);
        j.drill_rto.remove(&l);
        j.drill_records.remove(&l);
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Records a reconcile's duration when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    labels: ControllerLabels,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .get_or_create(&self.labels)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition's sample lines that start with `name`, sorted.
    fn samples(m: &Metrics, name: &str) -> Vec<String> {
        let text = m.encode().expect("encodes");
        let mut out: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with(name))
            .map(str::to_owned)
            .collect();
        out.sort();
        out
    }

    #[test]
    fn verifier_answers_are_counted_by_kind_outcome_and_reason_with_their_duration() {
        let m = Metrics::default();
        m.signature_verified("capsule", Outcome::Verified, "Verified", 0.003);
        m.signature_verified("capsule", Outcome::Rejected, "WrongKey", 0.002);
        m.signature_verified("capsule", Outcome::Rejected, "WrongKey", 0.002);
        m.signature_verified("image", Outcome::Error, "RegistryUnreachable", 5.0);
        assert_eq!(
            samples(&m, "soma_signature_verifications_total"),
            [
                r#"soma_signature_verifications_total{kind="capsule",outcome="rejected",reason="WrongKey"} 2"#,
                r#"soma_signature_verifications_total{kind="capsule",outcome="verified",reason="Verified"} 1"#,
                r#"soma_signature_verifications_total{kind="image",outcome="error",reason="RegistryUnreachable"} 1"#,
            ]
        );
        assert_eq!(
            samples(&m, "soma_signature_verification_duration_seconds_count"),
            [
                r#"soma_signature_verification_duration_seconds_count{kind="capsule"} 3"#,
                r#"soma_signature_verification_duration_seconds_count{kind="image"} 1"#,
            ]
        );
    }

    #[test]
    fn finished_jobs_are_counted_from_zero_for_each_phase_of_a_namespace_with_jobs() {
        let m = Metrics::default();
        assert!(samples(&m, "soma_jobs_finished_total").is_empty());
        m.job("batch", "nightly", None);
        assert_eq!(
            samples(&m, "soma_jobs_finished_total"),
            [
                r#"soma_jobs_finished_total{namespace="batch",phase="Failed"} 0"#,
                r#"soma_jobs_finished_total{namespace="batch",phase="Succeeded"} 0"#,
            ]
        );
        m.job_finished("batch", Some("Failed"));
        assert_eq!(
            samples(&m, "soma_jobs_finished_total")[0],
            r#"soma_jobs_finished_total{namespace="batch",phase="Failed"} 1"#
        );
    }

    #[test]
    fn a_rejected_object_has_one_series_with_its_current_reason_until_it_recovers() {
        let m = Metrics::default();
        let rejected = |m: &Metrics| samples(m, "soma_signature_rejected");
        m.signature_state("capsule", "team", "kb", Some("Unsigned"));
        m.signature_state("capsule", "team", "kb", Some("Unsigned"));
        m.signature_state("image", "team", "bot", Some("WrongKey"));
        assert_eq!(
            rejected(&m),
            [
                r#"soma_signature_rejected{kind="capsule",namespace="team",name="kb",reason="Unsigned"} 1"#,
                r#"soma_signature_rejected{kind="image",namespace="team",name="bot",reason="WrongKey"} 1"#,
            ]
        );
        // A new reason replaces the old series instead of adding one.
        m.signature_state("capsule", "team", "kb", Some("WrongKey"));
        assert_eq!(
            rejected(&m),
            [
                r#"soma_signature_rejected{kind="capsule",namespace="team",name="kb",reason="WrongKey"} 1"#,
                r#"soma_signature_rejected{kind="image",namespace="team",name="bot",reason="WrongKey"} 1"#,
            ]
        );
        // Verified again, or deleted: gone.
        m.signature_state("capsule", "team", "kb", None);
        m.signature_state("image", "team", "bot", None);
        m.signature_state("image", "other", "never-rejected", None);
        assert!(rejected(&m).is_empty(), "{:?}", rejected(&m));
    }

    fn def(thresholds: Vec<u8>) -> soma_metering::BudgetDef {
        serde_json::from_value(serde_json::json!({
            "namespace": "team", "name": "b", "uid": "u",
            "limits": {"costMicros": 1000},
            "period": {"calendar": "month", "timeZone": "UTC"},
            "thresholds": thresholds,
        }))
        .expect("a BudgetDef")
    }

    fn ledgered(percent: i64, reached: Vec<i32>) -> soma_crds::BudgetStatus {
        soma_crds::BudgetStatus {
            spend_source: Some("Ledger".into()),
            period_start: Some("2026-12-01T00:00:00+00:00".into()),
            percent_used: Some(percent),
            thresholds_reached: reached,
            ..soma_crds::BudgetStatus::default()
        }
    }

    #[test]
    fn the_highest_threshold_reached_is_exported_as_a_ratio_and_forgotten_with_the_budget() {
        let m = Metrics::default();
        m.budget("team", "b", &def(vec![50, 80]), &ledgered(10, vec![]));
        assert_eq!(
            samples(&m, "soma_budget_threshold_reached_ratio"),
            [r#"soma_budget_threshold_reached_ratio{namespace="team",budget="b"} 0.0"#]
        );
        m.budget("team", "b", &def(vec![50, 80]), &ledgered(85, vec![50, 80]));
        assert_eq!(
            samples(&m, "soma_budget_threshold_reached_ratio"),
            [r#"soma_budget_threshold_reached_ratio{namespace="team",budget="b"} 0.8"#]
        );
        m.forget_budget("team", "b");
        assert!(samples(&m, "soma_budget_threshold_reached_ratio").is_empty());
    }

    #[test]
    fn ledger_errors_are_counted_by_operation_from_zero() {
        let m = Metrics::default();
        assert_eq!(
            samples(&m, "soma_ledger_errors_total"),
            [
                r#"soma_ledger_errors_total{operation="live"} 0"#,
                r#"soma_ledger_errors_total{operation="read"} 0"#,
                r#"soma_ledger_errors_total{operation="seal"} 0"#,
            ]
        );
        m.ledger_error("read");
        m.ledger_error("read");
        m.ledger_error("seal");
        assert_eq!(
            samples(&m, "soma_ledger_errors_total"),
            [
                r#"soma_ledger_errors_total{operation="live"} 0"#,
                r#"soma_ledger_errors_total{operation="read"} 2"#,
                r#"soma_ledger_errors_total{operation="seal"} 1"#,
            ]
        );
    }

    #[test]
    fn autoscaler_series_are_per_agent_and_go_with_it() {
        let m = Metrics::default();
        m.autoscaler_decided("a", "bot", 2.5, 3, "up", "ErlangFloor", 0.0);
        m.autoscaler_decided("a", "bot", 2.75, 3, "none", "Cap", 0.43);
        m.autoscaler_decided("b", "bot", 1.0, 1, "none", "MinReplicas", 0.0);
        assert_eq!(
            samples(&m, "soma_autoscaler_brownout"),
            [
                r#"soma_autoscaler_brownout{namespace="a",agent="bot"} 0.43"#,
                r#"soma_autoscaler_brownout{namespace="b",agent="bot"} 0.0"#,
            ]
        );
        assert_eq!(
            samples(&m, "soma_autoscaler_desired_replicas"),
            [
                r#"soma_autoscaler_desired_replicas{namespace="a",agent="bot"} 3"#,
                r#"soma_autoscaler_desired_replicas{namespace="b",agent="bot"} 1"#,
            ]
        );
        assert_eq!(samples(&m, "soma_autoscaler_decisions_total").len(), 3);
        assert_eq!(samples(&m, "soma_autoscaler_conductance").len(), 2);
        // Agent a/bot is gone: every series of it goes; b/bot's stay.
        m.autoscaler_retain(&[("b".to_owned(), "bot".to_owned())]);
        for name in [
            "soma_autoscaler_brownout",
            "soma_autoscaler_desired_replicas",
            "soma_autoscaler_conductance",
            "soma_autoscaler_decisions_total",
        ] {
            let left = samples(&m, name);
            assert_eq!(left.len(), 1, "{name}: {left:?}");
            assert!(left[0].contains(r#"namespace="b""#), "{left:?}");
        }
    }
}
