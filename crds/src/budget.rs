//! The `Budget` resource: caps on tokens, cost and rates over a period.
//!
//! Money is in integer micro-units of `currency` (1 USD = 1,000,000 micros): no floating point.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::conditions_schema;

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
    printcolumn = r#"{"name":"Used","type":"string","jsonPath":".status.usedDisplay"}"#,
    printcolumn = r#"{"name":"Spent","type":"string","jsonPath":".status.spentDisplay"}"#,
    printcolumn = r#"{"name":"Remaining","type":"string","jsonPath":".status.remainingDisplay"}"#,
    printcolumn = r#"{"name":"Exhausted","type":"string","jsonPath":".status.conditions[?(@.type==\"Exhausted\")].status"}"#,
    printcolumn = r#"{"name":"Resets","type":"date","jsonPath":".status.periodEnd"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
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
    /// A parent Budget (for example the tenant's) whose caps also apply. It may be in another
    /// namespace only if that Budget lists this one's namespace in `allowedChildNamespaces`;
    /// until it does, this Budget is `Ready=False` (`ParentNotGranted`) and Agents charged to
    /// it do not start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_ref: Option<BudgetParentRef>,
    /// Namespaces whose Budgets may name this Budget as their `parentRef` (`*`: any
    /// namespace). Budgets in this Budget's own namespace always may. Like Gateway API's
    /// ReferenceGrant, the grant is made by the side that is referred to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(validation = Rule::new("self.all(n, n == '*' || n.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'))")
        .message("allowedChildNamespaces entries are namespace names or '*'"))]
    pub allowed_child_namespaces: Vec<String>,
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

/// A parent Budget, in this Budget's namespace unless `namespace` says otherwise.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct BudgetParentRef {
    /// The parent's namespace; this Budget's own when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: Option<String>,
    /// The parent Budget's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
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

/// What Soma observed about a Budget. Spend comes from the usage ledger; without one (see the
/// operator's `--ledger-url`) only the period and the conditions are reported.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BudgetStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// kstatus conditions (`Ready`, `Reconciling`, `Stalled`) plus `Exhausted` and
    /// `ThresholdReached`.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Start of the current period (RFC 3339, in the Budget's time zone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_start: Option<String>,
    /// End of the current period (RFC 3339, in the Budget's time zone): when the caps reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_end: Option<String>,
    /// Where the spend figures come from: `Ledger`, or `None` when the operator has no ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_source: Option<String>,
    /// Requests recorded in the current period.
    #[serde(default)]
    pub requests: i64,
    /// Tokens spent in the current period (recorded in the ledger).
    #[serde(default)]
    pub spent_tokens: i64,
    /// Cost spent in the current period, in micros.
    #[serde(default)]
    pub spent_micros: i64,
    /// Tokens reserved by requests in flight, as the sidecars last reported.
    #[serde(default)]
    pub reserved_tokens: i64,
    /// Cost reserved by requests in flight, in micros.
    #[serde(default)]
    pub reserved_micros: i64,
    /// Tokens left under `limits.tokens` (spent and reserved taken off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_tokens: Option<i64>,
    /// Cost left under `limits.costMicros`, in micros.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_micros: Option<i64>,
    /// The highest share of a period cap used (spent plus reserved), in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent_used: Option<i64>,
    /// Requests the sidecars refused in the current period because a period cap (`tokens`,
    /// `costMicros`) was used up (rate-limit refusals are in the sidecars' own metrics).
    #[serde(default)]
    pub refusals: i64,
    /// Requests the sidecars sent to `brownOutModel` in the current period.
    #[serde(default)]
    pub brown_outs: i64,
    /// Thresholds reached in the current period (a Warning Event was raised once for each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thresholds_reached: Vec<i32>,
    /// Agents charging this Budget, directly or through a child Budget (`namespace/name`, at
    /// most 50).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    /// How many Agents charge it.
    #[serde(default)]
    pub agent_count: i64,
    /// Human-readable period, for `kubectl get budgets`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_label: Option<String>,
    /// Human-readable share used, for `kubectl get budgets`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_display: Option<String>,
    /// Human-readable spend, for `kubectl get budgets`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spent_display: Option<String>,
    /// Human-readable remainder, for `kubectl get budgets`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_display: Option<String>,
}
