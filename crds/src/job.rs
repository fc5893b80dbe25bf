//! The `Job` resource: a one-shot agent task run to completion, or a DR drill of the ledger.
//!
//! Note that `kubectl get jobs` resolves to `batch/v1` Jobs; use `kubectl get sjob`,
//! `kubectl get jobs.soma.dev` or `kubectl get soma`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::agent::AgentSpec;
use crate::common::{LocalRef, SecretKeyRef, conditions_schema};

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
    printcolumn = r#"{"name":"Complete","type":"string","jsonPath":".status.conditions[?(@.type==\"Complete\")].status"}"#,
    printcolumn = r#"{"name":"Failed","type":"string","jsonPath":".status.conditions[?(@.type==\"Failed\")].status"}"#,
    printcolumn = r#"{"name":"Agent","type":"string","jsonPath":".spec.agentRef.name"}"#,
    printcolumn = r#"{"name":"Attempts","type":"integer","jsonPath":".status.attempts"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("[has(self.agentRef), has(self.template), has(self.drDrill)].filter(x, x).size() == 1")
    .message("a Job needs exactly one of agentRef, template or drDrill"))]
#[x_kube(validation = Rule::new("self == oldSelf")
    .message("a Job's spec is immutable; create a new Job"))]
#[serde(rename_all = "camelCase")]
pub struct JobSpec {
    /// Run the task on an existing Agent's definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_ref: Option<LocalRef>,
    /// Or an inline agent definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<AgentSpec>,
    /// Or a DR drill of the usage ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dr_drill: Option<DrDrill>,
    /// The task's input, handed to the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub input: Option<String>,
    /// The Budget the run is charged to (defaults to the Agent's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_ref: Option<LocalRef>,
    /// Seconds the whole Job may take, retries included.
    #[x_kube(validation = Rule::new("self > 0").message("deadlineSeconds must be positive"))]
    pub deadline_seconds: i64,
    /// Attempts after the first failure.
    #[serde(default)]
    #[schemars(range(min = 0, max = 10))]
    pub retries: i32,
    /// Delete the Job this many seconds after it finishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,
}

/// Back up the ledger, restore it into scratch, verify it, and report RPO/RTO.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrDrill {
    /// Secret key holding the ledger's PostgreSQL connection URL.
    pub ledger_secret_ref: SecretKeyRef,
    /// Secret key holding the scratch database's connection URL; restored into, then dropped.
    pub scratch_secret_ref: SecretKeyRef,
    /// Verify the audit hash chain and row counts after restore.
    #[serde(default = "default_true")]
    pub verify: bool,
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
    /// kstatus conditions plus `Complete` and `Failed`.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Attempts started so far.
    #[serde(default)]
    pub attempts: i32,
    /// When the first attempt started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// When the Job finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// The agent's result, or a summary of the drill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// Measured figures of a DR drill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<DrillReport>,
}

/// Figures a DR drill measured.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrillReport {
    /// Recovery point objective met: age of the newest restored record, in seconds.
    pub rpo_seconds: f64,
    /// Recovery time: from start of restore to verified, in seconds.
    pub rto_seconds: f64,
    /// Rows restored and counted.
    pub rows_verified: i64,
    /// Whether the audit hash chain verified end to end.
    pub chain_verified: bool,
}
