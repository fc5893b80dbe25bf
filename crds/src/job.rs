//! The `Job` resource: a one-shot agent task run to completion, or a DR drill of the ledger.
//!
//! The operator runs a Job as a `batch/v1` Job it owns (so Kubernetes' Job controller does the
//! retrying and the deadline), or, for a drill with a `schedule`, a `batch/v1` CronJob.
//!
//! Note that `kubectl get jobs` resolves to `batch/v1` Jobs; use `kubectl get sjob`,
//! `kubectl get jobs.soma.dev` or `kubectl get soma`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::agent::AgentSpec;
use crate::common::{LocalRef, SecretKeyRef, conditions_schema};

/// The label Kueue reads a workload's LocalQueue from.
pub const KUEUE_QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";

/// Longest result kept in `status.result`, in bytes (Kubernetes keeps at most 4096 bytes of a
/// container's termination message).
pub const RESULT_LIMIT: usize = 4096;

/// A task run to completion by an agent, or a disaster-recovery drill.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "soma.dev",
    version = "v1alpha1",
    kind = "Job",
    namespaced,
    status = "JobStatus",
    shortname = "sjob",
    category = "soma",
    validation = Rule::new("self.metadata.name.size() <= 52")
        .message("a Job's name is at most 52 characters: its batch/v1 Job (or CronJob) carries the same name"),
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Agent","type":"string","jsonPath":".spec.agentRef.name"}"#,
    printcolumn = r#"{"name":"Attempts","type":"integer","jsonPath":".status.attempts"}"#,
    printcolumn = r#"{"name":"Tokens","type":"integer","jsonPath":".status.usage.tokens"}"#,
    printcolumn = r#"{"name":"Cost","type":"string","jsonPath":".status.usage.costDisplay"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Drill","type":"string","priority":1,"jsonPath":".status.drill.outcome"}"#,
    printcolumn = r#"{"name":"RPO","type":"number","priority":1,"jsonPath":".status.drill.rpoSeconds"}"#,
    printcolumn = r#"{"name":"RTO","type":"number","priority":1,"jsonPath":".status.drill.rtoSeconds"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("[has(self.agentRef), has(self.template), has(self.drDrill)].filter(x, x).size() == 1")
    .message("a Job needs exactly one of agentRef, template or drDrill"))]
#[x_kube(validation = Rule::new("!has(self.schedule) || has(self.drDrill)")
    .message("schedule is for DR drills only: a task Job runs once"))]
#[x_kube(validation = Rule::new("!has(self.drDrill) || (!has(self.input) && !has(self.budgetRef) && !has(self.queueName))")
    .message("a DR drill calls no model: input, budgetRef and queueName do not apply to it"))]
#[x_kube(validation = Rule::new("self == oldSelf")
    .message("a Job's spec is immutable; create a new Job"))]
#[serde(rename_all = "camelCase")]
pub struct JobSpec {
    /// Run the task on an existing Agent's definition: its image, model, credentials, Budget,
    /// Capsules and sandbox, once, with `input`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_ref: Option<LocalRef>,
    /// Or an inline agent definition (its `scaling` and `port` do not apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<AgentSpec>,
    /// Or a DR drill of the usage ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dr_drill: Option<DrDrill>,
    /// The task's input, handed to the agent container as `SOMA_TASK_INPUT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub input: Option<String>,
    /// The Budget the run is charged to (defaults to the Agent's or the template's). While it
    /// or a parent is exhausted the Job does not start; it waits for the period to reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_ref: Option<LocalRef>,
    /// Seconds the run may take once started, retries included (`activeDeadlineSeconds`).
    /// Time spent waiting for a Budget, a queue or a free slot does not count.
    #[x_kube(validation = Rule::new("self > 0").message("deadlineSeconds must be positive"))]
    pub deadline_seconds: i64,
    /// Attempts after the first failure (`backoffLimit`).
    #[serde(default)]
    #[schemars(range(min = 0, max = 10))]
    pub retries: i32,
    /// Delete the Job (and its batch/v1 Job and pods) this many seconds after it finishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,
    /// A Kueue LocalQueue in the Job's namespace. Set: the batch/v1 Job carries
    /// `kueue.x-k8s.io/queue-name` and is created suspended, and Kueue admits it by its
    /// ClusterQueue's quotas. Unset: the operator's per-namespace limit of running Jobs
    /// (`--job-concurrency`) applies, in `priority` order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("queueName must be the name of a Kueue LocalQueue (a DNS label)"))]
    pub queue_name: Option<String>,
    /// Order among Jobs of the namespace waiting for a free slot (no `queueName`): higher
    /// first, then the oldest.
    #[serde(default)]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,
    /// DR drills only: run the drill on this cron schedule (a batch/v1 CronJob, `Forbid`
    /// concurrency) instead of once, in the kube-controller-manager's time zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    #[x_kube(validation = Rule::new("self.matches('^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|[0-9A-Za-z*/,?-]+( [0-9A-Za-z*/,?-]+){4})$')")
        .message("schedule must be a cron schedule of five fields (\"0 3 * * *\") or a macro such as @daily"))]
    pub schedule: Option<String>,
}

/// Back up the ledger, restore it into a scratch database, verify the restore (audit chain,
/// counts, the NATS JetStream copy of every record) and report RPO/RTO.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrDrill {
    /// Secret key holding the ledger's PostgreSQL URL. Unset: the operator's own ledger
    /// (`--ledger-url`), copied into a Secret owned by the Job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_secret_ref: Option<SecretKeyRef>,
    /// Secret key holding the URL of the scratch database the backup is restored into. Its
    /// user must own that database; the drill empties it before and after (and refuses a
    /// database that holds tables no drill wrote).
    pub scratch_secret_ref: SecretKeyRef,
    /// Verify the audit hash chains and seals of the restored ledger.
    #[serde(default = "default_true")]
    pub verify: bool,
    /// The JetStream stream holding the copy of every usage record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub stream: Option<String>,
    /// Seconds a record may lag between the ledger and the stream (the sidecars deliver to
    /// both independently) before a record found in one and not the other is a discrepancy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub stream_grace_seconds: Option<i64>,
}

fn default_true() -> bool {
    true
}

/// What Soma observed about a Job.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// kstatus conditions (`Ready`, `Reconciling`, `Stalled`) plus `Complete`, `Failed` and,
    /// for drills, `DrillPassed`.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// `Pending` (not started: a reference is missing or a policy denies it), `Waiting` (its
    /// Budget is exhausted, or no slot is free), `Queued` (suspended until Kueue admits it),
    /// `Running`, `Succeeded`, `Failed`, or `Scheduled` (a periodic drill).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Attempts started so far (pods of the batch/v1 Job).
    #[serde(default)]
    pub attempts: i32,
    /// When the run started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// When the Job finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// The agent's result: its termination message (the file `SOMA_RESULT_FILE` names), at
    /// most 4096 bytes; or a drill's summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// What the run used, from the usage ledger (records of agent `job/<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<RunUsage>,
    /// Measured figures of a DR drill (the last run of a scheduled one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<DrillReport>,
    /// When a scheduled drill last started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
}

/// What a run used, from the ledger.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunUsage {
    /// Model calls recorded.
    pub requests: i64,
    /// Prompt tokens.
    pub input_tokens: i64,
    /// Generated tokens.
    pub output_tokens: i64,
    /// Input plus output tokens.
    pub tokens: i64,
    /// Cost in micro-units of the Budget's currency.
    pub cost_micros: i64,
    /// The cost for `kubectl get sjob` (`0.12 USD`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_display: Option<String>,
    /// Calls the sidecar refused because a Budget was used up.
    #[serde(default)]
    pub refusals: i64,
}

/// Figures a DR drill measured (`soma dr drill`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrillReport {
    /// `Passed` or `Failed`.
    pub outcome: String,
    /// Recovery point: how much committed usage a restore from this backup loses, in seconds
    /// (the newest record committed after the backup's snapshot and before the backup was
    /// complete, measured from the snapshot; 0 when nothing was committed meanwhile).
    pub rpo_seconds: f64,
    /// Records committed after the snapshot that the backup therefore lacks.
    #[serde(default)]
    pub records_missed: i64,
    /// Recovery time: from the start of the restore to a verified restore, in seconds.
    pub rto_seconds: f64,
    /// Usage records restored and reconciled.
    #[serde(default)]
    pub records_restored: i64,
    /// Messages of the JetStream stream reconciled against the restore.
    #[serde(default)]
    pub stream_messages: i64,
    /// Whether the audit hash chains and seals of the restore verified.
    pub chain_verified: bool,
    /// When the backup's snapshot was taken (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_time: Option<String>,
    /// Why the drill failed, and the first discrepancies found (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub discrepancies: Vec<String>,
}
