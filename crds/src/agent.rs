//! The `Agent` resource: a long-running agent workload.
//!
//! The operator turns an Agent into a ServiceAccount, a Deployment (the agent container plus
//! the metering sidecar), a Service, a NetworkPolicy and the sidecar's ConfigMap.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{LocalRef, SecretKeyRef, conditions_schema};

/// Environment variable names that carry provider keys. They must never be set on the agent
/// container: keys live in the sidecar alone (PRODUCT.md, invariant 1).
pub const PROVIDER_KEY_ENV_NAMES: &[&str] = &[
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "AZURE_OPENAI_API_KEY",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "MISTRAL_API_KEY",
    "COHERE_API_KEY",
    "GROQ_API_KEY",
    "TOGETHER_API_KEY",
    "OPENROUTER_API_KEY",
];

/// An AI agent run as a governed workload.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "soma.dev",
    version = "v1alpha1",
    kind = "Agent",
    namespaced,
    status = "AgentStatus",
    shortname = "ag",
    category = "soma",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Replicas","type":"string","jsonPath":".status.replicaSummary","description":"ready/desired replicas"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.scaling.desiredReplicas","description":"replicas the autoscaler wants"}"#,
    printcolumn = r#"{"name":"Scaling","type":"string","jsonPath":".status.scaling.reason","description":"which rule set the replica count"}"#,
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.model.name"}"#,
    printcolumn = r#"{"name":"Budget","type":"string","jsonPath":".spec.budgetRef.name"}"#,
    printcolumn = r#"{"name":"Budget Used","type":"string","jsonPath":".status.budgetUsed"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("!has(self.ledgerCredentials) || (has(self.credentials) && has(self.credentials.vault))")
    .message("ledgerCredentials.vault logs in to Vault as credentials.vault does: set credentials.vault (the provider key from Vault), or remove ledgerCredentials"))]
#[x_kube(validation = Rule::new("!has(self.port) || !has(self.scaling) || self.scaling.minReplicas > 0")
    .message("scaling.minReplicas 0 is only for an Agent without a port: nothing wakes a scaled-to-zero Agent when traffic arrives at its Service yet (planned). A worker Agent (no port) is woken by the Soma Jobs whose spec.agentRef names it. Set scaling.minReplicas to 1 or more, or remove port"))]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// The agent's container image. Pin it by digest (`repo@sha256:…`); policy may require it.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,

    /// Entrypoint override for the agent container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub command: Vec<String>,

    /// Arguments for the agent container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub args: Vec<String>,

    /// Literal environment variables for the agent container. Provider key names (such as
    /// `OPENAI_API_KEY`) are refused: keys are delivered to the metering sidecar only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    #[x_kube(validation = Rule::new(
        "self.all(e, !(e.name in ['OPENAI_API_KEY', 'ANTHROPIC_API_KEY', 'AZURE_OPENAI_API_KEY', 'GEMINI_API_KEY', 'GOOGLE_API_KEY', 'MISTRAL_API_KEY', 'COHERE_API_KEY', 'GROQ_API_KEY', 'TOGETHER_API_KEY', 'OPENROUTER_API_KEY']))"
    ).message("provider API keys must not be set on the agent container; reference them in spec.credentials so only the metering sidecar receives them"))]
    pub env: Vec<EnvVar>,

    /// The port the agent serves on. When set, a Service exposes it; when unset the agent
    /// only calls out (a worker) and gets no Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,

    /// Which model the agent calls, through the metering sidecar.
    pub model: ModelSpec,

    /// Where the sidecar reads the provider key from. Never mounted into the agent container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,

    /// Where the sidecar gets its own PostgreSQL user for the usage ledger instead of the
    /// operator's shared ledger URL: `vault` asks Vault's database secrets engine for a
    /// short-lived user, logging in as `credentials.vault` does (required). Needs an operator
    /// with a ledger (`--ledger-url`). See docs/vault.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_credentials: Option<LedgerCredentials>,

    /// The Budget this agent's calls are charged to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_ref: Option<LocalRef>,

    /// Capsules (signed knowledge bundles) the agent may use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub capsules: Vec<LocalRef>,

    /// Tools the agent may call, by name. Empty means none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    pub tools: Vec<String>,

    /// Sandbox settings for the agent's pods.
    #[serde(default)]
    pub sandbox: Sandbox,

    /// Replica bounds and autoscaling targets.
    #[serde(default)]
    pub scaling: Scaling,
}

/// A literal environment variable.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct EnvVar {
    /// Variable name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub name: String,
    /// Variable value.
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub value: String,
}

/// The model provider's wire protocol.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Provider {
    /// OpenAI's API.
    Openai,
    /// Anthropic's API.
    Anthropic,
    /// Any endpoint that speaks OpenAI's API (vLLM, Ollama, Azure OpenAI, …); needs `endpoint`.
    OpenaiCompatible,
}

/// The model an agent calls.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.provider != 'openaiCompatible' || has(self.endpoint)")
    .message("model.endpoint is required when model.provider is openaiCompatible"))]
pub struct ModelSpec {
    /// Provider protocol.
    pub provider: Provider,
    /// Model name as the provider knows it, for example `gpt-4o-mini` or `claude-sonnet-4-5`.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Base URL of the provider; defaults to the provider's public API. Each call's path is
    /// joined to it (a trailing `/v1` is not repeated), so it carries no query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')")
        .message("model.endpoint must be an http(s) URL"))]
    #[x_kube(validation = Rule::new("!self.contains('?')")
        .message("model.endpoint must not carry a query: each call's path is joined to it"))]
    pub endpoint: Option<String>,
}

/// Where the provider key comes from: exactly one source.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.secretRef) != has(self.vault)")
    .message("credentials needs exactly one of secretRef or vault"))]
pub struct Credentials {
    /// A key in a Secret of the Agent's namespace, mounted into the sidecar only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// A Vault (or OpenBao) KV path the sidecar reads at start and on rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<VaultRef>,
}

/// A Vault (or OpenBao) KV v2 secret holding the provider key. The sidecar logs in with its
/// own projected service-account token (Kubernetes or JWT auth) or an AppRole Secret (each
/// mounted into the sidecar container only), reads the field, renews its token, re-reads the
/// secret every `refreshSeconds` and revokes the token when the pod stops. See docs/vault.md.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.auth) && self.auth == 'appRole') == has(self.appRole)")
    .message("credentials.vault.appRole (the Secret holding the AppRole role id and secret id) is required with auth: appRole, and only then"))]
pub struct VaultRef {
    /// Vault's address, such as `https://vault.vault.svc:8200`. Unset: the operator's default
    /// (`--vault-address`, chart `vault.address`), else the sidecar's `VAULT_ADDR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1), regex(pattern = r"^https?://"))]
    pub address: Option<String>,
    /// Vault Enterprise / OpenBao namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub namespace: Option<String>,
    /// KV v2 mount. Default `secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub mount: Option<String>,
    /// Path of the secret within the mount, for example `teams/search/openai` (the API form
    /// `secret/data/teams/search/openai` is read the same).
    #[schemars(length(min = 1))]
    pub path: String,
    /// Field within the secret.
    #[schemars(length(min = 1))]
    pub key: String,
    /// A fixed version of the secret. Unset: the latest, followed as it rotates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub version: Option<u64>,
    /// How the sidecar logs in: `kubernetes` (Vault's Kubernetes auth), `jwt` (Vault's JWT
    /// auth, validating the same token against the cluster's OIDC keys) or `appRole` (a role
    /// id and secret id from the Secret `appRole` names).
    #[serde(default)]
    pub auth: VaultAuthMethod,
    /// The AppRole login material, with `auth: appRole` (and only then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_role: Option<VaultAppRole>,
    /// The auth method's mount. Default: the operator's `--vault-auth-mount` (Kubernetes auth
    /// only), else `kubernetes`, `jwt` or `approle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub auth_mount: Option<String>,
    /// The Vault role the sidecar logs in as (Kubernetes and JWT auth; AppRole's role is its
    /// role id). Unset: the operator's `--vault-role`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Audience of the sidecar's projected service-account token (Kubernetes and JWT auth).
    /// Default: the operator's `--vault-audience`, else `vault`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub audience: Option<String>,
    /// How often the secret is re-read, in seconds: a rotated key is in use within this.
    /// Default 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub refresh_seconds: Option<u32>,
}

/// `credentials.vault.auth`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum VaultAuthMethod {
    /// Vault's Kubernetes auth method (Vault calls the TokenReview API).
    #[default]
    Kubernetes,
    /// Vault's JWT auth method (Vault checks the token's signature itself).
    Jwt,
    /// Vault's AppRole auth method (a role id and a secret id from a Secret).
    AppRole,
}

/// `credentials.vault.appRole`: a Secret of the Agent's namespace holding the AppRole role id
/// and secret id. The operator mounts the two keys into the sidecar container only (read-only
/// files); the agent container, the ConfigMap and the environment never hold them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultAppRole {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// The key holding the role id. Default `role-id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub role_id_key: Option<String>,
    /// The key holding the secret id. Default `secret-id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub secret_id_key: Option<String>,
}

/// `ledgerCredentials`: where the sidecar's ledger user comes from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LedgerCredentials {
    /// Vault's (or OpenBao's) database secrets engine: `GET <mount>/creds/<role>`, with the
    /// Vault session of `credentials.vault`. The lease is renewed at two thirds of its TTL,
    /// replaced when renewal is refused, and revoked when the pod stops.
    pub vault: VaultDatabase,
}

/// `ledgerCredentials.vault`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultDatabase {
    /// The database secrets engine's mount. Default: the operator's `--vault-ledger-mount`,
    /// else `database`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub mount: Option<String>,
    /// The engine's role whose creation statements make the ledger user. Default: the
    /// operator's `--vault-ledger-role`; with neither, the operator does not start the
    /// Agent's pods (`Stalled`, reason `LedgerCredentialsUnusable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub role: Option<String>,
}

/// Sandbox settings. The defaults are the strict ones; only `runtimeClassName`, resources,
/// egress and timeouts can be changed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    /// RuntimeClass for stronger isolation, for example `gvisor` or `kata`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
    /// Destinations the pod may reach besides DNS and the model provider. Everything else is
    /// denied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub egress: Vec<EgressRule>,
    /// Resources of the agent container; the operator's defaults apply when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Mount the ServiceAccount token into the pod. Off unless the agent needs the API.
    #[serde(default)]
    pub automount_service_account_token: bool,
    /// Longest a single request to the agent may take, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub request_timeout_seconds: Option<i64>,
}

/// One allowed egress destination: a CIDR, or a host name with ports.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.cidr) != has(self.host)")
    .message("an egress rule needs exactly one of cidr or host"))]
pub struct EgressRule {
    /// An IP range such as `10.20.0.0/16`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("isCIDR(self)").message("egress cidr must be a valid CIDR such as 10.0.0.0/8"))]
    pub cidr: Option<String>,
    /// A DNS name such as `api.github.com`. NetworkPolicy is L3/L4: host rules open the given
    /// ports to public addresses; use a CNI with FQDN policies for exact host enforcement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 253),
        regex(pattern = r"^(\*\.)?([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)+[a-z]{2,}$")
    )]
    pub host: Option<String>,
    /// TCP ports; empty means 443.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub ports: Vec<u16>,
}

/// Replica bounds and autoscaling parameters.
///
/// Autoscaling runs when `maxReplicas` is greater than `minReplicas` (and greater than 1, or
/// than 0 for an Agent without a `port`): every interval the operator reads the sidecars' load
/// (`GET /load`), steps the Agent's conductance / Erlang-C autoscaler and sets the
/// Deployment's replicas under the field manager `soma-autoscaler` (docs/autoscaler.md).
/// Otherwise the Deployment has `max(minReplicas, 1)` replicas. Every other field tunes the
/// autoscaler; unset, it keeps the default that docs/autoscaler.md gives and measures.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas")
    .message("scaling.minReplicas must not exceed scaling.maxReplicas"))]
#[x_kube(validation = Rule::new("!has(self.idleToZeroSeconds) || self.minReplicas == 0")
    .message("scaling.idleToZeroSeconds applies only to an Agent that may scale to zero: set scaling.minReplicas to 0, or remove idleToZeroSeconds"))]
#[x_kube(validation = Rule::new("!has(self.coldStartHoldSeconds) || self.minReplicas == 0")
    .message("scaling.coldStartHoldSeconds applies only to an Agent that may scale to zero: set scaling.minReplicas to 0, or remove coldStartHoldSeconds"))]
#[x_kube(validation = Rule::new("!has(self.brownOutAction) || self.brownOutAction != 'downgrade' || has(self.brownOutModel)")
    .message("scaling.brownOutAction downgrade needs scaling.brownOutModel: the model the downgraded requests are sent to"))]
#[x_kube(validation = Rule::new("!has(self.brownOutModel) || (has(self.brownOutAction) && self.brownOutAction == 'downgrade')")
    .message("scaling.brownOutModel is used only with scaling.brownOutAction downgrade: set brownOutAction to downgrade, or remove brownOutModel"))]
pub struct Scaling {
    /// Fewest replicas. 0 (scale to zero) only for an Agent without a `port`: such an Agent
    /// is woken by the Soma Jobs whose `spec.agentRef` names it (docs/autoscaler.md, "Scale
    /// to zero"); nothing wakes a scaled-to-zero Agent on inbound traffic yet, so an Agent
    /// with a `port` is refused `minReplicas: 0`.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// Most replicas. Above `minReplicas`, the autoscaler chooses the count in between.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Target 95th-percentile queue wait, in milliseconds, for Erlang-C sizing (the
    /// autoscaler's `waitTargetS`); default 2000. Lower buys replicas sooner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3_600_000))]
    pub target_p95_wait_ms: Option<i64>,
    /// Highest utilisation ρ the Erlang-C sizing plans for (`rhoMax`), strictly between 0
    /// and 1; default 0.7. Lower buys headroom with replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self < 1.0")
        .message("scaling.maxUtilisation must be greater than 0 and less than 1 (the highest planned utilisation; default 0.7)"))]
    pub max_utilisation: Option<f64>,
    /// Plan the queue for a P95 wait of `waitHeadroom × targetP95WaitMs` (`waitHeadroom`),
    /// in (0, 1]; default 0.5. Erlang-C predicts a long-run P95 while an SLO is judged minute
    /// by minute: planning at the target itself misses it about half the time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0")
        .message("scaling.waitHeadroom must be greater than 0 and at most 1 (a share of targetP95WaitMs; default 0.5)"))]
    pub wait_headroom: Option<f64>,
    /// Requests one replica serves at once (M/M/k servers per replica, `slotsPerReplica`);
    /// default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1024")
        .message("scaling.slotsPerReplica must be between 1 and 1024 (concurrent requests one replica serves; default 1)"))]
    pub slots_per_replica: Option<i32>,
    /// Conductance `C ← (1 − βΔt)·C + αΔt·EMA_τ(|f|)`: how replicas follow sustained flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conductance: Option<ConductanceSettings>,
    /// How arrival rate and service time are estimated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimator: Option<EstimatorSettings>,
    /// A backlog of waiting requests is planned away within this many seconds
    /// (`backlogDrainS`); default 15. The load that drained it is held for
    /// `reversalHoldSeconds + coldStartHoldSeconds` (at most `floorHoldSeconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 3600")
        .message("scaling.backlogDrainSeconds must be between 1 and 3600 (default 15)"))]
    pub backlog_drain_seconds: Option<i64>,
    /// How long a peak of offered load keeps replicas for its return, seconds (the
    /// autoscaler's `floorHoldS`); default 900, 0 disables. docs/autoscaler.md shows the
    /// simulated trade-off: shorter saves replica-hours and costs SLO minutes on bursty traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86_400))]
    pub floor_hold_seconds: Option<i64>,
    /// After a scale-up, no scale-down for this long, seconds (`reversalHoldS`): at most two
    /// direction changes per this period; default 120. Also part of how long the load that
    /// drained a backlog is held (with `coldStartHoldSeconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86_400))]
    pub reversal_hold_seconds: Option<i64>,
    /// With `minReplicas: 0`: scale to zero after this many seconds without traffic and
    /// without a pending or running Soma Job that references the Agent (`idleToZeroS`);
    /// default 300. Until then one replica stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 86400")
        .message("scaling.idleToZeroSeconds must be between 0 and 86400 (default 300)"))]
    pub idle_to_zero_seconds: Option<i64>,
    /// After a start from zero (`minReplicas: 0`), no scale-down for this many seconds, while
    /// the new pod starts and its load signal is still empty (`coldStartHoldS`); default 60.
    /// With `reversalHoldSeconds`, also how long the load that drained a backlog is held, so
    /// that a burst returning as the reversal hold ends finds those pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 86400")
        .message("scaling.coldStartHoldSeconds must be between 0 and 86400 (default 60)"))]
    pub cold_start_hold_seconds: Option<i64>,
    /// What a brown-out does with the traffic the allowed replicas cannot serve within the
    /// target: `shed` (refuse the lowest-priority share) or `downgrade` (send it to a cheaper
    /// model, `brownOutModel`); default `shed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brown_out_action: Option<BrownOutAction>,
    /// The model downgraded requests are sent to under `brownOutAction: downgrade` (required
    /// with it): a model of the Agent's provider that the sidecar's price table knows (it is
    /// priced and reserved at that model; a sidecar that does not know it refuses the
    /// brown-out and keeps serving, saying so in its log and `soma_proxy_live_updates_total`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub brown_out_model: Option<String>,
}

/// `scaling.conductance`: each field optional, defaulting one by one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConductanceSettings {
    /// Growth rate α, per second: how fast sustained flow builds conductance; default
    /// β/0.7 ≈ 0.005952 (the steady state is then the replica count at 70 % utilisation).
    /// 0 turns conductance off (the Erlang-C floors alone size the Agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 10.0")
        .message("scaling.conductance.alpha must be between 0 and 10 per second (default ≈ 0.005952)"))]
    pub alpha: Option<f64>,
    /// Decay rate β, per second: `1/β` is how long conductance outlives its flow; default
    /// 1/240 ≈ 0.004167.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 10.0")
        .message("scaling.conductance.beta must be greater than 0 and at most 10 per second (default ≈ 0.004167)"))]
    pub beta: Option<f64>,
    /// Time constant τ of the flow's moving average that feeds growth, seconds; default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 86400")
        .message("scaling.conductance.tauSeconds must be between 1 and 86400 (default 30)"))]
    pub tau_seconds: Option<i64>,
}

/// `scaling.estimator`: each field optional, defaulting one by one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EstimatorSettings {
    /// Time constant of the arrival-rate moving average, seconds (`arrivalTauS`); default 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 86400")
        .message("scaling.estimator.arrivalTauSeconds must be between 1 and 86400 (default 60)"))]
    pub arrival_tau_seconds: Option<i64>,
    /// The service-time estimate is, in effect, the mean of about this many recent requests
    /// (`serviceRequests`); default 500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000000")
        .message("scaling.estimator.serviceRequests must be between 1 and 1000000 (default 500)"))]
    pub service_requests: Option<i64>,
    /// Service time assumed before any request completes, milliseconds
    /// (`priorServiceTimeS`); default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 3600000")
        .message("scaling.estimator.priorServiceTimeMs must be between 1 and 3600000 (default 1000)"))]
    pub prior_service_time_ms: Option<i64>,
}

/// `scaling.brownOutAction`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BrownOutAction {
    /// Refuse the lowest-priority share of requests.
    #[default]
    Shed,
    /// Send the lowest-priority share to a cheaper, faster model.
    Downgrade,
}

impl Default for Scaling {
    fn default() -> Self {
        Self {
            min_replicas: default_min_replicas(),
            max_replicas: default_max_replicas(),
            target_p95_wait_ms: None,
            max_utilisation: None,
            wait_headroom: None,
            slots_per_replica: None,
            conductance: None,
            estimator: None,
            backlog_drain_seconds: None,
            floor_hold_seconds: None,
            reversal_hold_seconds: None,
            idle_to_zero_seconds: None,
            cold_start_hold_seconds: None,
            brown_out_action: None,
            brown_out_model: None,
        }
    }
}

fn default_min_replicas() -> i32 {
    1
}
fn default_max_replicas() -> i32 {
    1
}

/// What Soma observed about an Agent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// kstatus conditions: `Ready`, `Reconciling`, `Stalled`.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Replicas the Deployment has.
    #[serde(default)]
    pub replicas: i32,
    /// Replicas that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Replicas Soma wants.
    #[serde(default)]
    pub desired_replicas: i32,
    /// `ready/desired`, for `kubectl get agents`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_summary: Option<String>,
    /// Share of the Budget spent, for `kubectl get agents` (filled by the Budget controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_used: Option<String>,
    /// The verified signature of `spec.image`, when the operator requires signed images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<AgentImageStatus>,
    /// Why the autoscaler chose this many replicas (only while autoscaling runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<ScalingStatus>,
}

/// The autoscaler's last decision: every number that led to the replica count.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingStatus {
    /// Replicas the autoscaler wants.
    pub desired_replicas: i32,
    /// Replicas the Deployment had when it decided (`spec.replicas`).
    pub current_replicas: i32,
    /// Which rule set the count: `conductance`, `erlangFloor`, `floorHold`, `minReplicas`,
    /// `cap`, `idle` (scaled to zero), `idleHold` (one replica until the idle period ends),
    /// `queuedWork` (woken or kept up by Soma Jobs), `coldStartHold` or `reversalHold`.
    pub reason: String,
    /// Conductance `C` of the Agent's route, in replicas.
    pub conductance: f64,
    /// Smallest replica count meeting the utilisation cap and the wait target now.
    pub erlang_floor: i32,
    /// The floor for the highest load of the last `floorHoldSeconds`.
    pub held_floor: i32,
    /// Estimated arrival rate the floor was sized for, requests per second.
    pub arrival_rate: f64,
    /// Estimated mean service time, seconds.
    pub service_time_s: f64,
    /// Estimated burstiness of arrivals (squared coefficient of variation; 1 for Poisson
    /// arrivals, never below): the Erlang-C wait scales with it and the service times'
    /// variability, `(arrivalScv + c_s²)/2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrival_scv: Option<f64>,
    /// Predicted utilisation at `desiredReplicas` (absent when the queue is unstable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilisation: Option<f64>,
    /// Predicted P95 queue wait at `desiredReplicas`, seconds (absent when unstable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95_wait_s: Option<f64>,
    /// Ready pods whose sidecar answered `GET /load` in the last step.
    pub reporting_pods: i32,
    /// Soma Jobs referencing this Agent that are waiting, queued or running: the work that
    /// wakes an Agent with `minReplicas: 0` and keeps it up.
    #[serde(default)]
    pub pending_jobs: i32,
    /// When the autoscaler last stepped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_step_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// When it last changed the Deployment's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// The brown-out the operator asks of the Agent's sidecars, while one is in force: no
    /// replica count within `maxReplicas` meets the wait target, so this share of the
    /// lowest-priority traffic (`x-soma-priority`) is shed or downgraded. Published through
    /// the ledger (`soma_agent_live`, within a second) and the sidecar's ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brown_out: Option<BrownOutStatus>,
    /// The revision of the last brown-out decision (engaged, changed or cleared), in
    /// milliseconds since the Unix epoch or one past the previous revision: the sidecars take a
    /// decision only when it is newer than the one they hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brown_out_revision: Option<i64>,
    /// The autoscaler's memory (estimates, conductance, held loads, hold timers), from which
    /// a new operator leader continues without a jump in replicas. Internal; may change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::common::preserved_object_schema")]
    pub state: Option<serde_json::Value>,
}

/// A brown-out in force: what the Agent's sidecars do with the lowest-priority traffic.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrownOutStatus {
    /// Share of arriving traffic taken, lowest priority first (`high` is never taken).
    pub fraction: f64,
    /// `shed` (503 with `Retry-After`) or `downgrade` (sent to `model`).
    pub action: String,
    /// The model downgraded requests go to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The autoscaler's reason, as shed requests carry it.
    pub message: String,
}

/// The verification of an Agent's image: what `spec.image` resolved to and who signed it.
/// The agent container runs `repository@digest`, so a tag moved later cannot swap in other
/// content.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentImageStatus {
    /// `spec.image` as verified (a tag or a digest reference).
    pub reference: String,
    /// The digest it resolved to and whose signature verified, `sha256:<hex>`.
    pub digest: String,
    /// Who signed: `key:sha256:<hex>` (public key fingerprint) or
    /// `keyless:subject=<subject>,issuer=<issuer>`.
    pub signer: String,
    /// When the signature of this digest was first verified (RFC 3339).
    pub verified_at: String,
}
