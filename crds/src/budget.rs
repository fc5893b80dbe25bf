//! The `Budget` resource: caps on tokens, cost and rates over a period.
//!
//! Money is in integer micro-units of `currency` (1 USD = 1,000,000 micros): no floating point.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{LocalRef, conditions_schema};

/// Caps on what agents and Jobs that reference this Budget may spend.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "soma.dev",
    version = "v1alpha1",
    kind = "Budget",
    namespaced,
    status = "BudgetStatus",
    shortname = "bud",
    category = "soma",
    printcolumn = r#"{"name":"Period","type":"string","jsonPath":".status.periodLabel"}"#,
    printcolumn = r#"{"name":"Spent","type":"string","jsonPath":".status.spentDisplay"}"#,
    printcolumn = r#"{"name":"Remaining","type":"string","jsonPath":".status.remainingDisplay"}"#,
    printcolumn = r#"{"name":"Exhausted","type":"string","jsonPath":".status.conditions[?(@.type==\"Exhausted\")].status"}"#,
    printcolumn = r#"{"name":"Resets","type":"date","jsonPath":".status.periodEnd"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BudgetSpec {
    /// The caps. At least one must be set.
    pub limits: Limits,
    /// The period the token and cost caps apply to.
    pub period: Period,
    /// Percentages of a cap at which a `Warning` condition and Event are raised.
    #[serde(default = "default_thresholds")]
    #[schemars(length(max = 10))]
    #[x_kube(validation = Rule::new("self.all(t, t >= 1 && t <= 100)")
        .message("thresholds are percentages between 1 and 100"))]
    pub thresholds: Vec<i32>,
    /// What happens to a request that does not fit.
    #[serde(default)]
    pub on_exhausted: OnExhausted,
    /// A parent Budget (for example the tenant's) whose caps also apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_ref: Option<LocalRef>,
    /// ISO 4217 currency of `limits.costMicros` and the price table.
    #[serde(default = "default_currency")]
    #[schemars(regex(pattern = r"^[A-Z]{3}$"))]
    pub currency: String,
}

fn default_thresholds() -> Vec<i32> {
    vec![80, 95]
}
fn default_currency() -> String {
    "USD".to_owned()
}

/// Token, cost and rate caps.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "has(self.tokens) || has(self.costMicros) || has(self.tokensPerMinute) || has(self.requestsPerMinute)"
).message("a Budget needs at least one limit: tokens, costMicros, tokensPerMinute or requestsPerMinute"))]
pub struct Limits {
    /// Total tokens (input + output) per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens: Option<i64>,
    /// Total cost per period, in micro-units of the currency (1 USD = 1,000,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub cost_micros: Option<i64>,
    /// Tokens per minute, across all replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<i64>,
    /// Requests per minute, across all replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<i64>,
}

/// A calendar period in a time zone, or a rolling window: exactly one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.calendar) != has(self.rolling)")
    .message("period needs exactly one of calendar or rolling"))]
#[x_kube(validation = Rule::new("!has(self.timeZone) || has(self.calendar)")
    .message("period.timeZone applies to calendar periods only"))]
pub struct Period {
    /// Resets at the start of each calendar hour, day or month in `timeZone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calendar: Option<CalendarUnit>,
    /// An IANA time zone such as `Europe/Berlin`; UTC when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub time_zone: Option<String>,
    /// A sliding window such as `30m`, `24h` or `7d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[1-9][0-9]*(m|h|d)$"))]
    pub rolling: Option<String>,
}

/// Calendar period units.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CalendarUnit {
    /// Each hour.
    Hour,
    /// Each day.
    Day,
    /// Each month.
    Month,
}

/// The action when a request does not fit.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.action != 'BrownOut' || has(self.brownOutModel)")
    .message("onExhausted.brownOutModel is required when the action is BrownOut"))]
pub struct OnExhausted {
    /// `Deny` refuses with HTTP 429; `BrownOut` rewrites requests to `brownOutModel`.
    #[serde(default)]
    pub action: ExhaustedAction,
    /// The cheaper model used during brown-out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brown_out_model: Option<String>,
}

impl Default for OnExhausted {
    fn default() -> Self {
        Self {
            action: ExhaustedAction::Deny,
            brown_out_model: None,
        }
    }
}

/// What to do with a request that does not fit.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ExhaustedAction {
    /// Refuse it.
    #[default]
    Deny,
    /// Send it to a cheaper model.
    BrownOut,
}

/// What Soma observed about a Budget.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BudgetStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// kstatus conditions plus `Warning` and `Exhausted`.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Tokens spent in the current period.
    #[serde(default)]
    pub spent_tokens: i64,
    /// Cost spent in the current period, in micros.
    #[serde(default)]
    pub spent_micros: i64,
    /// Cost reserved by in-flight requests, in micros.
    #[serde(default)]
    pub reserved_micros: i64,
    /// Cost remaining, in micros.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_micros: Option<i64>,
    /// Start of the current period (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_start: Option<String>,
    /// End of the current period (RFC 3339): when the caps reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_end: Option<String>,
    /// Human-readable period, for `kubectl get budgets`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_label: Option<String>,
    /// Human-readable spend, for `kubectl get budgets`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spent_display: Option<String>,
    /// Human-readable remainder, for `kubectl get budgets`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_display: Option<String>,
}
