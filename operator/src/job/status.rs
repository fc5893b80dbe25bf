//! Computes a Job's status from what the reconcile observed: a pure function, so every branch
//! is a table test. `lastTransitionTime` is kept unless a condition's status flips, and the
//! result equals the old status when nothing changed, so the controller skips the write.
//!
//! | phase | when | Ready | Reconciling | Stalled | also |
//! | --- | --- | --- | --- | --- | --- |
//! | `Pending` | a reference is missing, a policy denies it, its image is not verified | False | False | True | |
//! | `Waiting` | its Budget is exhausted, or no slot is free | False | True | False | |
//! | `Queued` | suspended until Kueue admits it | False | True | False | |
//! | `Running` | the batch/v1 Job has started | False | True | False | |
//! | `Succeeded` | the batch/v1 Job completed | True | False | False | `Complete=True` |
//! | `Failed` | retries or the deadline ran out | False | False | True | `Failed=True` |
//! | `Scheduled` | a drill with a `schedule` | True | False | False | |
//!
//! Drills also report `DrillPassed` once a run has reported.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use soma_contract::drill::DrillReport as Measured;
use soma_crds::common::condition_types::{COMPLETE, FAILED};
use soma_crds::job::{DrillReport, JobStatus, RunUsage};
use soma_ledger::spend::RunSpend;
use soma_policy::condition::POLICY_ALLOWED;

use crate::kstatus::{Verdict, conditions, progressing, settled, stalled, verdict};
use crate::policy::check::PolicyCheck;

/// Condition type: the last drill run verified the restore.
pub const DRILL_PASSED: &str = "DrillPassed";

/// A failure only a change by a person can fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// Condition reason (`AgentNotFound`, `PolicyDenied`, …).
    pub reason: String,
    /// A message naming what to fix.
    pub message: String,
}

/// Why a runnable Job has not started yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wait {
    /// `BudgetExhausted` or `ConcurrencyLimit`.
    pub reason: &'static str,
    /// What it waits for, and until when.
    pub message: String,
}

/// How a batch/v1 Job ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `Complete`.
    Succeeded,
    /// `Failed`, with Kubernetes' reason (`BackoffLimitExceeded`, `DeadlineExceeded`, …) and
    /// message.
    Failed {
        /// The condition's reason.
        reason: String,
        /// The condition's message.
        message: String,
    },
}

/// What the batch/v1 Job reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Run {
    /// `spec.suspend`: waiting for Kueue.
    pub suspended: bool,
    /// Pods running.
    pub active: i32,
    /// Pods that succeeded.
    pub succeeded: i32,
    /// Pods that failed.
    pub failed: i32,
    /// `status.startTime`.
    pub start_time: Option<String>,
    /// `status.completionTime`, or when it failed.
    pub completion_time: Option<String>,
    /// How it ended, once it has.
    pub outcome: Option<Outcome>,
    /// The queue it waits in.
    pub queue: Option<String>,
}

/// A periodic drill's CronJob.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    /// The cron schedule.
    pub schedule: String,
    /// `status.lastScheduleTime`.
    pub last_schedule_time: Option<String>,
    /// Runs going on now.
    pub active: usize,
}

/// Everything the status is computed from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobObserved {
    /// The Job's `metadata.generation`.
    pub generation: Option<i64>,
    /// `spec.retries`.
    pub retries: i32,
    /// A permanent failure: it does not start.
    pub block: Option<Block>,
    /// A transient failure being retried (a policy evaluation or registry that did not
    /// answer).
    pub retrying: Option<Block>,
    /// Runnable, not started yet.
    pub wait: Option<Wait>,
    /// The batch/v1 Job, once created.
    pub run: Option<Run>,
    /// A scheduled drill's CronJob, once created.
    pub schedule: Option<Schedule>,
    /// What the run used (with a ledger), and in which currency.
    pub usage: Option<(RunSpend, String)>,
    /// The agent's termination message, bounded.
    pub result: Option<String>,
    /// How the last attempt ended, when it failed (`exit code 3`).
    pub last_exit: Option<String>,
    /// A drill's report (the latest run's).
    pub drill: Option<Measured>,
    /// The reconcile-time policy re-check.
    pub policy: Option<PolicyCheck>,
}

/// The phase names.
pub mod phase {
    /// Not started, and will not without a change.
    pub const PENDING: &str = "Pending";
    /// Runnable, waiting for its Budget or a slot.
    pub const WAITING: &str = "Waiting";
    /// Suspended until Kueue admits it.
    pub const QUEUED: &str = "Queued";
    /// Started.
    pub const RUNNING: &str = "Running";
    /// Completed.
    pub const SUCCEEDED: &str = "Succeeded";
    /// Failed.
    pub const FAILED: &str = "Failed";
    /// A periodic drill.
    pub const SCHEDULED: &str = "Scheduled";
}

/// Micros as `12.35 USD` (below a cent: `400 micro-USD`).
fn money(micros: i64, currency: &str) -> String {
    crate::budget::status::money(micros, currency)
}

fn usage(spend: &RunSpend, currency: &str) -> RunUsage {
    RunUsage {
        requests: spend.requests,
        input_tokens: spend.input_tokens,
        output_tokens: spend.output_tokens,
        tokens: spend.input_tokens + spend.output_tokens,
        cost_micros: spend.cost_micros,
        cost_display: Some(money(spend.cost_micros, currency)),
        refusals: spend.refusals,
    }
}

/// The report as the CRD shows it.
pub fn drill_report(m: &Measured) -> DrillReport {
    DrillReport {
        outcome: if m.passed { "Passed" } else { "Failed" }.to_owned(),
        rpo_seconds: m.rpo_seconds,
        records_missed: m.records_missed,
        rto_seconds: m.rto_seconds,
        records_restored: m.records_restored,
        stream_messages: m.stream_messages,
        chain_verified: m.chain_verified,
        snapshot_time: (!m.snapshot_at.is_empty()).then(|| m.snapshot_at.clone()),
        discrepancies: m.discrepancies.iter().take(10).cloned().collect(),
    }
}

fn drill_summary(m: &Measured) -> String {
    if m.passed {
        format!(
            "drill passed: {} records restored and verified in {:.1} s (RTO); RPO {:.1} s ({} records committed during the backup)",
            m.records_restored, m.rto_seconds, m.rpo_seconds, m.records_missed
        )
    } else {
        format!(
            "drill failed: {}",
            m.discrepancies
                .first()
                .map_or("no reason given", String::as_str)
        )
    }
}

fn attempts(run: &Run) -> i32 {
    run.active + run.succeeded + run.failed
}

fn spent(obs: &JobObserved) -> String {
    match &obs.usage {
        Some((s, currency)) => format!(
            "{} tokens and {} in {} calls",
            s.input_tokens + s.output_tokens,
            money(s.cost_micros, currency),
            s.requests
        ),
        None => "usage unknown: the operator has no ledger".to_owned(),
    }
}

/// The phase and the kstatus verdicts.
fn verdicts(obs: &JobObserved) -> (&'static str, Vec<Verdict>) {
    const WAITING: &str = "waiting for a change to the Job or what it references";
    const FINAL: &str = "the Job has finished; create a new Job to run it again";
    let is_drill = obs.drill.is_some() || obs.schedule.is_some();
    if let Some(s) = &obs.schedule {
        let last = obs.drill.as_ref().map_or_else(
            || "no run has reported yet".to_owned(),
            |m| format!("last run: {}", drill_summary(m)),
        );
        return (
            phase::SCHEDULED,
            settled(
                "Scheduled",
                format!("runs on the schedule {:?}; {last}", s.schedule),
                "the schedule is in force",
            )
            .to_vec(),
        );
    }
    if let Some(run) = &obs.run {
        match &run.outcome {
            Some(Outcome::Succeeded) => {
                let message = match &obs.drill {
                    Some(m) => drill_summary(m),
                    None => format!(
                        "completed after {} attempt(s); used {}",
                        attempts(run).max(1),
                        spent(obs)
                    ),
                };
                let mut v = settled("Succeeded", message.clone(), FINAL).to_vec();
                v.push(verdict(COMPLETE, true, "Succeeded", message));
                return (phase::SUCCEEDED, v);
            }
            Some(Outcome::Failed { reason, message }) => {
                let refused = obs.usage.as_ref().is_some_and(|(s, _)| s.refusals > 0);
                let exit = obs
                    .last_exit
                    .as_ref()
                    .map(|e| format!("; the last attempt ended with {e}"))
                    .unwrap_or_default();
                let (reason, message) = if refused && !is_drill {
                    (
                        "BudgetExhausted".to_owned(),
                        format!(
                            "the run failed after its Budget refused {} call(s): a Budget of its chain is used up{exit}; it used {} before",
                            obs.usage.as_ref().map_or(0, |(s, _)| s.refusals),
                            spent(obs)
                        ),
                    )
                } else if let Some(m) = obs.drill.as_ref().filter(|m| !m.passed) {
                    ("DrillFailed".to_owned(), drill_summary(m))
                } else {
                    let what = match reason.as_str() {
                        "BackoffLimitExceeded" => format!(
                            "all {} attempt(s) failed (retries: {})",
                            attempts(run).max(1),
                            obs.retries
                        ),
                        "DeadlineExceeded" => "the run took longer than deadlineSeconds".to_owned(),
                        _ => message.clone(),
                    };
                    let used = if is_drill {
                        String::new()
                    } else {
                        format!("; it used {}", spent(obs))
                    };
                    (reason.clone(), format!("{what}{exit}{used}"))
                };
                let mut v = stalled(&reason, message.clone(), FINAL).to_vec();
                v.push(verdict(FAILED, true, reason, message));
                return (phase::FAILED, v);
            }
            None if run.suspended => {
                let queue = run.queue.as_deref().unwrap_or("?");
                return (
                    phase::QUEUED,
                    progressing(
                        "Queued",
                        format!("suspended in Kueue queue {queue:?} until Kueue admits it by its ClusterQueue's quotas"),
                        "waiting for Kueue",
                    )
                    .to_vec(),
                );
            }
            None => {
                let n = attempts(run).max(1);
                let message = if is_drill || obs.usage.is_none() {
                    format!("attempt {n} of {} running", obs.retries + 1)
                } else {
                    format!(
                        "attempt {n} of {} running; used so far: {}",
                        obs.retries + 1,
                        spent(obs)
                    )
                };
                return (
                    phase::RUNNING,
                    progressing("Running", message, "the run is in progress").to_vec(),
                );
            }
        }
    }
    if let Some(b) = &obs.block {
        return (
            phase::PENDING,
            stalled(&b.reason, b.message.clone(), WAITING).to_vec(),
        );
    }
    if let Some(b) = &obs.retrying {
        return (
            phase::PENDING,
            progressing(&b.reason, b.message.clone(), "retrying").to_vec(),
        );
    }
    match &obs.wait {
        Some(w) => (
            phase::WAITING,
            progressing(w.reason, w.message.clone(), "it starts on its own").to_vec(),
        ),
        None => (
            phase::PENDING,
            progressing("Starting", "creating the run", "it starts on its own").to_vec(),
        ),
    }
}

/// The status for `obs`, keeping what `old` recorded that this reconcile did not observe
/// (the start time of a run whose batch/v1 Job is gone).
pub fn job_status(old: Option<&JobStatus>, obs: &JobObserved, now: &Time) -> JobStatus {
    let (phase, mut v) = verdicts(obs);
    if let Some(p) = &obs.policy {
        v.push(verdict(
            POLICY_ALLOWED,
            p.condition.status == "True",
            p.condition.reason,
            p.condition.message.clone(),
        ));
    }
    if let Some(m) = &obs.drill {
        v.push(verdict(
            DRILL_PASSED,
            m.passed,
            if m.passed { "Passed" } else { "Failed" },
            drill_summary(m),
        ));
    }
    let old_conditions: &[Condition] = old.map_or(&[], |o| &o.conditions);
    let run = obs.run.as_ref();
    JobStatus {
        observed_generation: obs.generation,
        conditions: conditions(old_conditions, &v, obs.generation, now),
        phase: Some(phase.to_owned()),
        attempts: run.map_or(0, attempts),
        start_time: run
            .and_then(|r| r.start_time.clone())
            .or_else(|| old.and_then(|o| o.start_time.clone())),
        completion_time: run.and_then(|r| r.completion_time.clone()),
        result: obs
            .result
            .clone()
            .or_else(|| obs.drill.as_ref().map(drill_summary)),
        usage: obs.usage.as_ref().map(|(s, c)| usage(s, c)),
        drill: obs.drill.as_ref().map(drill_report),
        last_schedule_time: obs
            .schedule
            .as_ref()
            .and_then(|s| s.last_schedule_time.clone()),
    }
}

/// Whether `status` says the Job finished, and when (for its TTL).
pub fn finished(status: Option<&JobStatus>) -> Option<Option<&str>> {
    let s = status?;
    let done = s
        .conditions
        .iter()
        .any(|c| (c.type_ == COMPLETE || c.type_ == FAILED) && c.status == "True");
    done.then_some(s.completion_time.as_deref())
}

/// Cuts `text` to at most `limit` bytes on a character boundary, marking the cut.
pub fn bounded(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    const MARK: &str = " …(truncated)";
    let mut cut = limit.saturating_sub(MARK.len());
    while cut > 0 && !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{MARK}", &text[..cut])
}

#[cfg(test)]
mod tests;
