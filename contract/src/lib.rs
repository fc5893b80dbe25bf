//! The contract between the operator and the metering sidecar: the sidecar's configuration
//! file, typed once (and, in [`drill`], the DR drill's report between the CLI and the
//! operator; in [`load`], the load a sidecar reports to the operator's autoscaler and the
//! brown-out asked of it; in [`readiness`], what a sidecar's `/readyz` says about its
//! credentials). The operator builds a [`SidecarConfig`] and writes it into the Agent's
//! ConfigMap (`soma-operator render` shows it); the sidecar (`soma-proxy`) reads the same type
//! back. A field added here is seen by both sides or by neither.
//!
//! ```text
//!  operator: Agent + resolved Budget chain ─► SidecarConfig ─► ConfigMap <agent>-sidecar (JSON)
//!  sidecar:  /etc/soma/proxy/config.yaml ─► SidecarConfig::parse ─► normalise ─► serve
//!            └─ live: the file again on change, and the ledger's soma_budgets rows and the
//!               Agent's soma_agent_live row (LISTEN)
//! ```
//!
//! Some parts are **live**: a change takes effect in running sidecars without a restart
//! ([`SidecarConfig::live_part`]). Everything else is part of the pod template's hash, so a
//! change to it rolls the pods. Serde only: no kube, no HTTP, no database.
#![forbid(unsafe_code)]

pub mod drill;
pub mod load;
pub mod readiness;
pub mod recall;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use soma_metering::{BudgetDef, BudgetKey, PriceTable};

/// Why the file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON or YAML.
    #[error("not valid JSON or YAML")]
    Syntax(#[source] serde_yaml::Error),
    /// Valid syntax, wrong fields.
    #[error("invalid configuration")]
    Shape(#[source] serde_json::Error),
    /// A Budget reference does not read as `namespace/name` or a bare name.
    #[error("invalid configuration")]
    Budget(#[source] soma_metering::chain::KeyError),
    /// `ledgerCredentials` cannot work with the rest of the file.
    #[error("invalid configuration: {0}")]
    LedgerCredentials(String),
    /// `brownOut` asks for something the sidecar cannot do.
    #[error("invalid configuration: {0}")]
    BrownOut(String),
}

/// The whole file. Every field is documented in `docs/sidecar.md`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarConfig {
    /// Proxy listener; loopback by default.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// `/healthz`, `/readyz` and `/metrics`.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: String,
    /// The Agent, for labels and records.
    pub agent: AgentIdentity,
    /// Where calls go.
    pub provider: ProviderConfig,
    /// Where the provider key is read from.
    pub credentials: Credentials,
    /// The Budget calls are charged to: `namespace/name`, or a bare name in the Agent's
    /// namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<String>,
    /// The environment variable holding the per-pod client token.
    pub client_token_env: String,
    /// Tools the agent may call (not enforced by the proxy yet).
    #[serde(default)]
    pub tools: Vec<String>,
    /// The pod's Capsules: a name, or `{"name", "digest"}` for content delivered into
    /// `recall.capsulesDir` (loaded, checked against the digest, and served by recall).
    #[serde(default)]
    pub capsules: Vec<recall::SidecarCapsule>,
    /// `POST /v1/recall`: where the Capsules are and how queries are bounded. Left out when
    /// at its defaults, so configurations (and pod template hashes) of older operators stay
    /// the same.
    #[serde(default, skip_serializing_if = "recall::RecallSettings::is_default")]
    pub recall: recall::RecallSettings,
    /// Capsules no longer to serve (live): recall answers 410 with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_capsules: Vec<recall::RevokedCapsule>,
    /// Prices per model (micros per million tokens). Absent: cost is not metered (0) and any
    /// model is accepted; present: a model missing from it is refused as unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prices: Option<PriceTable>,
    /// Budget definitions (live): `budget` and its `parentRef` chain are looked up here and,
    /// with a ledger, in its `soma_budgets` table, the newer generation winning.
    #[serde(default)]
    pub budgets: Vec<BudgetDef>,
    /// The brown-out the operator's autoscaler asks of this Agent's sidecars (live): shed or
    /// downgrade this share of arriving traffic, lowest `x-soma-priority` first. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brown_out: Option<load::BrownOut>,
    /// Orders the operator's brown-out decisions (live): the revision `brownOut` (or its
    /// absence) was decided at. With a ledger, the Agent's `soma_agent_live` row carries the
    /// same revision; the newer one is in force. 0 (absent) in a hand-written file, where a
    /// changed `brownOut` is taken as it is.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub brown_out_revision: i64,
    /// The SQLite outbox (WAL): usage records and the embedded budget authority's state.
    #[serde(default = "default_outbox_path")]
    pub outbox_path: PathBuf,
    /// Which budget authority enforces `budget`: `embedded` (this sidecar alone, its state
    /// rebuilt from the outbox) or `{"postgres": {...}}` (replicas sharing Budgets through the
    /// PostgreSQL at `databaseUrl`, each leasing slices).
    #[serde(default)]
    pub authority: AuthorityConfig,
    /// PostgreSQL URL: the ledger and, with `authority: postgres`, the cluster budget
    /// authority. Never written by the operator (it may hold a password); see `databaseUrlEnv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// The environment variable holding `databaseUrl` (the operator sets it from a Secret, so
    /// the password is never in the ConfigMap). Ignored when `databaseUrl` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_url_env: Option<String>,
    /// Where the ledger's PostgreSQL user and password come from instead of `databaseUrl`:
    /// `{"vault": {"mount": "database", "role": "soma-ledger"}}` asks Vault's database secrets
    /// engine for a short-lived user (logging in as `credentials.vault` does, which it
    /// requires), renews its lease, replaces it when refused, and revokes it at stop.
    /// `databaseUrl` then names only the host, port, database and options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_credentials: Option<LedgerCredentials>,
    /// NATS URL; when set, settled usage is published to JetStream in the background.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
    /// How often delivered outbox rows older than the longest budget window are deleted, in
    /// milliseconds (0: never).
    #[serde(default = "default_prune_interval")]
    pub prune_interval_ms: u64,
    /// Pause between delivery rounds (ledger and events) when the outbox is drained, in ms.
    #[serde(default = "default_delivery_interval")]
    pub delivery_interval_ms: u64,
    /// When the sidecar is told to stop (SIGTERM), how long it keeps delivering its outbox to
    /// the ledger and the stream before it exits, in ms (0: it exits at once). The outbox is
    /// an emptyDir: a Job's pod is removed after it finishes, and what was not delivered by
    /// then is lost. Stays below the pod's termination grace period (30 s by default).
    #[serde(
        default = "default_flush_on_stop",
        skip_serializing_if = "is_default_flush_on_stop"
    )]
    pub flush_on_stop_ms: u64,
    /// How the live parts of the configuration are followed.
    #[serde(default)]
    pub live: LiveSettings,
    /// How often the request journal is folded into the outbox database, in milliseconds
    /// (every read of the outbox folds it too).
    #[serde(default = "default_fold_interval")]
    pub fold_interval_ms: u64,
    /// Threads serving requests. 1 (the default) runs every request on one thread, with no
    /// hand-off between threads; more spread requests over that many threads, for a sidecar
    /// given more than one core.
    #[serde(default = "default_worker_threads")]
    pub worker_threads: std::num::NonZeroUsize,
    /// Requests served at once (at least 1); beyond it a request gets 503 in the client's
    /// format at once.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: std::num::NonZeroUsize,
    /// How long the agent's last report of its own queue (`PUT /v1/queue`,
    /// [`load::QueueReport`]) counts, in milliseconds (at least 1): an agent that stops
    /// reporting stops adding to `waiting` after this long. Report more often than this.
    #[serde(default = "default_queue_report_ttl")]
    pub queue_report_ttl_ms: std::num::NonZeroU64,
    /// What a request that declares server tools (web search, web fetch) may use per tool
    /// where it does not say: reserved on its Budgets beside the prompt and output bound.
    #[serde(default)]
    pub server_tools: soma_metering::ToolAllowance,
    /// Largest request body accepted, in bytes.
    #[serde(default = "default_body_limit")]
    pub body_limit_bytes: usize,
    /// Output tokens assumed for the worst case when a request sets no `max_tokens`.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u64,
    /// Prompt tokens assumed for each image in a request (the provider charges images by their
    /// pixels, which the sidecar does not decode). The default covers the dearest documented
    /// formula (OpenAI's gpt-4o-mini at high detail); set the bound of your models to reserve
    /// less, for example 1,445 for gpt-4o or 1,600 for Claude.
    #[serde(default = "default_image_tokens")]
    pub image_tokens: u64,
    /// Upstream timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// `anthropic-version` sent when the client sends none.
    #[serde(default = "default_anthropic_version")]
    pub anthropic_version: String,
}

/// `live`: how the sidecar follows the live parts of its configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct LiveSettings {
    /// How often the configuration file is looked at for a change, in ms (0: never). A
    /// ConfigMap volume follows its ConfigMap within the kubelet's sync period (about a
    /// minute); the ledger's notification path takes milliseconds.
    pub file_check_ms: u64,
    /// With a ledger: how often the `soma_budgets` rows (and the Agent's `soma_agent_live`
    /// row) are read even without a notification
    /// (a missed notification, a reconnect), in ms (0: notifications only).
    pub ledger_poll_ms: u64,
}

impl Default for LiveSettings {
    fn default() -> Self {
        LiveSettings {
            file_check_ms: 2_000,
            ledger_poll_ms: 5_000,
        }
    }
}

/// `authority`: `"embedded"` or `{"postgres": {"leaseTtlMs": 30000}}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuthorityConfig {
    /// One sidecar: Budgets in memory, rebuilt from the outbox at start-up.
    #[default]
    Embedded,
    /// Many replicas: Budget windows and leases in PostgreSQL (`databaseUrl`).
    Postgres(PostgresAuthority),
}

/// `authority.postgres`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PostgresAuthority {
    /// How long a lease lives without a heartbeat (heartbeats run every third of it); a
    /// replica gone longer has its unused slice reclaimed by the others.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_ms: u64,
    /// How long a lease must have been expired before another replica cuts it back to what
    /// its holder last reported and reuses the rest. Default: ten lease TTLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reclaim_after_ms: Option<u64>,
}

impl Default for PostgresAuthority {
    fn default() -> Self {
        PostgresAuthority {
            lease_ttl_ms: default_lease_ttl(),
            reclaim_after_ms: None,
        }
    }
}

/// `agent`: whose sidecar this is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentIdentity {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// `provider`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderConfig {
    /// Which wire format the upstream speaks.
    pub kind: ProviderKind,
    /// Base URL, such as `https://api.openai.com` or `http://vllm:8000/v1`.
    pub upstream: String,
    /// The Agent's model.
    pub model: String,
}

/// `provider.kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProviderKind {
    /// OpenAI.
    Openai,
    /// Anthropic.
    Anthropic,
    /// Anything speaking OpenAI's API.
    OpenaiCompatible,
}

impl ProviderKind {
    /// The spelling in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::OpenaiCompatible => "openaiCompatible",
        }
    }
}

/// `credentials`: `"none"`, `{"file": PATH}` or `{"vault": {...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Credentials {
    /// No key (a keyless local endpoint).
    None,
    /// A file mounted from a Secret.
    File(PathBuf),
    /// A key in a Vault (or OpenBao) KV v2 secret, fetched, renewed and re-read by the sidecar.
    Vault(Box<VaultCredentials>),
}

/// `ledgerCredentials`: `{"vault": {...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LedgerCredentials {
    /// Dynamic credentials from Vault's (or OpenBao's) database secrets engine.
    Vault(VaultDatabase),
}

/// `ledgerCredentials.vault`: `GET <mount>/creds/<role>`, with the Vault session of
/// `credentials.vault`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultDatabase {
    /// The database secrets engine's mount.
    #[serde(default = "default_database_mount")]
    pub mount: String,
    /// The engine's role whose creation statements make the ledger's user.
    pub role: String,
}

fn default_database_mount() -> String {
    "database".into()
}

/// `credentials.vault`: where the sidecar logs in and which KV v2 field holds the provider key.
/// Nothing here is secret: the sidecar reads its login material (a projected token, a JWT, an
/// AppRole secret id) from files named here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultCredentials {
    /// Vault's address, such as `https://vault.vault.svc:8200`. Absent: the sidecar's
    /// `VAULT_ADDR` environment variable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Vault Enterprise / OpenBao namespace (`X-Vault-Namespace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// A PEM CA bundle for Vault's TLS certificate; absent: the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert_path: Option<PathBuf>,
    /// How the sidecar logs in.
    #[serde(default)]
    pub auth: VaultAuth,
    /// The role the sidecar logs in as (Kubernetes and JWT auth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The KV v2 mount.
    #[serde(default = "default_kv_mount")]
    pub mount: String,
    /// The secret's path within the mount, such as `teams/search/openai`. The API form
    /// `<mount>/data/<path>` is accepted too ([`VaultCredentials::kv_path`]).
    pub path: String,
    /// The field of the secret holding the key.
    pub key: String,
    /// A fixed version of the secret; absent: the latest, re-read every `refreshMs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// How often the secret is re-read (a rotated key is in use within this), in ms; also the
    /// pause between retries after a failure (at most 5 s).
    #[serde(default = "default_vault_refresh")]
    pub refresh_ms: u64,
}

impl VaultCredentials {
    /// The path within [`Self::mount`]: `path` with a leading `<mount>/data/` (the API form,
    /// as in Vault's UI and CLI error messages) removed.
    pub fn kv_path(&self) -> &str {
        let path = self.path.trim_matches('/');
        path.strip_prefix(self.mount.trim_matches('/'))
            .and_then(|rest| rest.strip_prefix("/data/"))
            .unwrap_or(path)
    }
}

/// `credentials.vault.auth`: `{"kubernetes": {...}}`, `{"jwt": {...}}` or `{"appRole": {...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum VaultAuth {
    /// Vault's Kubernetes auth method with the sidecar's own projected service-account token.
    Kubernetes(KubernetesAuth),
    /// Vault's JWT auth method with a token read from a file.
    Jwt(JwtAuth),
    /// AppRole: a role id and a secret id read from files.
    AppRole(AppRoleAuth),
}

impl Default for VaultAuth {
    fn default() -> Self {
        VaultAuth::Kubernetes(KubernetesAuth::default())
    }
}

impl VaultAuth {
    /// The method's name, for logs and `render`.
    pub fn method(&self) -> &'static str {
        match self {
            VaultAuth::Kubernetes(_) => "kubernetes",
            VaultAuth::Jwt(_) => "jwt",
            VaultAuth::AppRole(_) => "appRole",
        }
    }
}

/// `auth.kubernetes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct KubernetesAuth {
    /// The auth mount.
    pub mount: String,
    /// The projected service-account token (mounted into the sidecar container only).
    pub token_path: PathBuf,
}

impl Default for KubernetesAuth {
    fn default() -> Self {
        KubernetesAuth {
            mount: "kubernetes".into(),
            token_path: PathBuf::from(VAULT_TOKEN_PATH),
        }
    }
}

/// Where the operator mounts the sidecar's projected service-account token for Vault.
pub const VAULT_TOKEN_PATH: &str = "/var/run/secrets/soma.dev/vault/token";

/// `auth.jwt`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct JwtAuth {
    /// The auth mount.
    pub mount: String,
    /// A file holding the JWT (re-read at every login, so a rotated token is picked up).
    pub token_path: PathBuf,
}

impl Default for JwtAuth {
    fn default() -> Self {
        JwtAuth {
            mount: "jwt".into(),
            token_path: PathBuf::from(VAULT_TOKEN_PATH),
        }
    }
}

/// `auth.appRole`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppRoleAuth {
    /// The auth mount.
    #[serde(default = "default_approle_mount")]
    pub mount: String,
    /// A file holding the role id.
    pub role_id_path: PathBuf,
    /// A file holding the secret id.
    pub secret_id_path: PathBuf,
}

fn default_kv_mount() -> String {
    "secret".into()
}
fn default_approle_mount() -> String {
    "approle".into()
}
fn default_vault_refresh() -> u64 {
    60_000
}

/// `timeouts`, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Timeouts {
    /// TCP (and TLS) connect.
    pub connect_ms: u64,
    /// From sending the request to the upstream's response headers.
    pub response_headers_ms: u64,
    /// Longest silence between two body chunks.
    pub idle_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_ms: 10_000,
            response_headers_ms: 600_000,
            idle_ms: 300_000,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:4000".into()
}
fn default_admin_listen() -> String {
    "0.0.0.0:9090".into()
}
fn default_outbox_path() -> PathBuf {
    PathBuf::from("/var/lib/soma/outbox.db")
}
fn default_delivery_interval() -> u64 {
    1_000
}
fn default_flush_on_stop() -> u64 {
    10_000
}
fn is_default_flush_on_stop(ms: &u64) -> bool {
    *ms == default_flush_on_stop()
}
fn default_prune_interval() -> u64 {
    60_000
}
fn default_lease_ttl() -> u64 {
    30_000
}
fn default_fold_interval() -> u64 {
    100
}
fn default_worker_threads() -> std::num::NonZeroUsize {
    std::num::NonZeroUsize::MIN
}
fn default_max_in_flight() -> std::num::NonZeroUsize {
    std::num::NonZeroUsize::new(1_024).unwrap_or(std::num::NonZeroUsize::MIN)
}
fn default_queue_report_ttl() -> std::num::NonZeroU64 {
    std::num::NonZeroU64::new(30_000).unwrap_or(std::num::NonZeroU64::MIN)
}
fn default_body_limit() -> usize {
    16 * 1024 * 1024
}
fn default_max_tokens() -> u64 {
    4_096
}
fn default_image_tokens() -> u64 {
    soma_metering::tokens::DEFAULT_IMAGE_TOKENS
}
fn is_zero(v: &i64) -> bool {
    *v == 0
}
fn default_anthropic_version() -> String {
    "2023-06-01".into()
}

/// The parts of a [`SidecarConfig`] a running sidecar takes without a restart: the Budget
/// definitions (caps, thresholds, action, period, parents), the brown-out and the revoked
/// Capsules. Which Budget
/// the Agent charges (`budget`) is part of the Agent's spec; a change to it rolls the pods.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LivePart {
    /// `budgets`.
    pub budgets: Vec<BudgetDef>,
    /// `brownOut`.
    pub brown_out: Option<load::BrownOut>,
    /// `revokedCapsules`.
    pub revoked_capsules: Vec<recall::RevokedCapsule>,
    /// `brownOutRevision`.
    pub brown_out_revision: i64,
}

impl SidecarConfig {
    /// A configuration with every optional field at its default.
    pub fn new(
        agent: AgentIdentity,
        provider: ProviderConfig,
        credentials: Credentials,
        client_token_env: impl Into<String>,
    ) -> SidecarConfig {
        SidecarConfig {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            agent,
            provider,
            credentials,
            budget: None,
            client_token_env: client_token_env.into(),
            tools: Vec::new(),
            capsules: Vec::new(),
            recall: recall::RecallSettings::default(),
            revoked_capsules: Vec::new(),
            prices: None,
            budgets: Vec::new(),
            brown_out: None,
            brown_out_revision: 0,
            outbox_path: default_outbox_path(),
            authority: AuthorityConfig::default(),
            database_url: None,
            database_url_env: None,
            ledger_credentials: None,
            nats_url: None,
            prune_interval_ms: default_prune_interval(),
            delivery_interval_ms: default_delivery_interval(),
            flush_on_stop_ms: default_flush_on_stop(),
            live: LiveSettings::default(),
            fold_interval_ms: default_fold_interval(),
            worker_threads: default_worker_threads(),
            max_in_flight: default_max_in_flight(),
            queue_report_ttl_ms: default_queue_report_ttl(),
            server_tools: soma_metering::ToolAllowance::default(),
            body_limit_bytes: default_body_limit(),
            default_max_tokens: default_max_tokens(),
            image_tokens: default_image_tokens(),
            timeouts: Timeouts::default(),
            anthropic_version: default_anthropic_version(),
        }
    }

    /// Parses the file's text (JSON or YAML) and normalises it ([`Self::normalise`]). YAML is
    /// read into a JSON value first, so that enums have one spelling in both (`{"file": PATH}`,
    /// not a YAML tag).
    pub fn parse(text: &str) -> Result<SidecarConfig, ConfigError> {
        let value: serde_json::Value = serde_yaml::from_str(text).map_err(ConfigError::Syntax)?;
        let mut config: SidecarConfig =
            serde_json::from_value(value).map_err(ConfigError::Shape)?;
        config.normalise()?;
        Ok(config)
    }

    /// Makes every Budget reference explicit: a Budget definition without a namespace is in
    /// the Agent's namespace, and `budget` becomes `namespace/name`.
    pub fn normalise(&mut self) -> Result<(), ConfigError> {
        let ns = self.agent.namespace.clone();
        for def in &mut self.budgets {
            if def.namespace.is_empty() {
                def.namespace.clone_from(&ns);
            }
        }
        if let Some(b) = &self.budget {
            self.budget = Some(
                BudgetKey::parse_in(&ns, b)
                    .map_err(ConfigError::Budget)?
                    .to_string(),
            );
        }
        if self.ledger_credentials.is_some() && !matches!(self.credentials, Credentials::Vault(_)) {
            return Err(ConfigError::LedgerCredentials(
                "ledgerCredentials.vault logs in to Vault as credentials.vault does: set credentials.vault".into(),
            ));
        }
        if let Some(b) = &self.brown_out {
            b.validate().map_err(ConfigError::BrownOut)?;
        }
        Ok(())
    }

    /// The Budget calls are charged to, as a key.
    pub fn budget_key(&self) -> Option<BudgetKey> {
        self.budget
            .as_deref()
            .and_then(|b| BudgetKey::parse_in(&self.agent.namespace, b).ok())
    }

    /// The parts a running sidecar follows without a restart.
    pub fn live_part(&self) -> LivePart {
        LivePart {
            budgets: self.budgets.clone(),
            brown_out: self.brown_out.clone(),
            revoked_capsules: self.revoked_capsules.clone(),
            brown_out_revision: self.brown_out_revision,
        }
    }

    /// The configuration without its live parts: what a change of must roll the pods.
    pub fn without_live_part(&self) -> SidecarConfig {
        SidecarConfig {
            budgets: Vec::new(),
            brown_out: None,
            revoked_capsules: Vec::new(),
            brown_out_revision: 0,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// What an operator of the first wave wrote (bare Budget names, no live settings).
    const FIRST_WAVE_DOCUMENT: &str = r#"{
  "listen": "127.0.0.1:4000",
  "adminListen": "0.0.0.0:9090",
  "agent": { "namespace": "research", "name": "research-assistant" },
  "provider": { "kind": "openai", "upstream": "https://api.openai.com", "model": "gpt-4o" },
  "credentials": { "file": "/etc/soma/provider-key/api-key" },
  "budget": "research-team",
  "clientTokenEnv": "SOMA_POD_UID",
  "tools": ["web-search"],
  "capsules": ["support-kb"],
  "budgets": [{"name": "research-team", "limits": {"tokens": 5}, "period": {"calendar": "day"},
               "parentRef": {"name": "acme"}}]
}"#;

    #[test]
    fn reads_an_older_document_and_makes_budgets_explicit() {
        let c = SidecarConfig::parse(FIRST_WAVE_DOCUMENT).unwrap();
        assert_eq!(c.provider.kind, ProviderKind::Openai);
        assert!(matches!(c.credentials, Credentials::File(ref p) if p.ends_with("api-key")));
        assert_eq!(c.budget.as_deref(), Some("research/research-team"));
        assert_eq!(c.budgets[0].key().to_string(), "research/research-team");
        assert_eq!(
            c.budgets[0].parent_key().unwrap().to_string(),
            "research/acme"
        );
        assert_eq!(c.body_limit_bytes, 16 * 1024 * 1024);
        assert_eq!(c.live, LiveSettings::default());
    }

    #[test]
    fn what_the_operator_writes_the_sidecar_reads_back() {
        let mut c = SidecarConfig::new(
            AgentIdentity {
                namespace: "a".into(),
                name: "b".into(),
            },
            ProviderConfig {
                kind: ProviderKind::Anthropic,
                upstream: "http://x".into(),
                model: "m".into(),
            },
            Credentials::Vault(
                serde_json::from_str(r#"{"path": "secret/data/k", "key": "api-key"}"#).unwrap(),
            ),
            "T",
        );
        c.budget = Some("a/team".into());
        c.authority = AuthorityConfig::Postgres(PostgresAuthority::default());
        c.database_url_env = Some("SOMA_DATABASE_URL".into());
        let text = serde_json::to_string_pretty(&c).unwrap();
        assert!(!text.contains("databaseUrl\""), "{text}");
        assert_eq!(SidecarConfig::parse(&text).unwrap(), c);
    }

    #[test]
    fn yaml_reads_too_and_typos_are_reported() {
        let y = "agent: {namespace: a, name: b}\nprovider: {kind: anthropic, upstream: 'http://x', model: m}\ncredentials: none\nclientTokenEnv: T\n";
        let c = SidecarConfig::parse(y).unwrap();
        assert_eq!(c.provider.kind, ProviderKind::Anthropic);
        assert!(SidecarConfig::parse("agent: [").is_err());
        assert!(SidecarConfig::parse("{\"agent\": 1}").is_err());
        let bad_budget = format!("{y}budget: 'a/b/c'\n");
        assert!(matches!(
            SidecarConfig::parse(&bad_budget),
            Err(ConfigError::Budget(_))
        ));
        let bad_live = format!("{y}live: {{fileCheck: 3}}\n");
        assert!(SidecarConfig::parse(&bad_live).is_err());
    }

    #[test]
    fn authority_and_credential_shapes() {
        let base = r#""agent": {"namespace": "a", "name": "b"}, "provider": {"kind": "openai", "upstream": "http://x", "model": "m"}, "credentials": "none", "clientTokenEnv": "T""#;
        let c = SidecarConfig::parse(&format!("{{{base}}}")).unwrap();
        assert_eq!(c.authority, AuthorityConfig::Embedded);
        let c = SidecarConfig::parse(&format!(
            r#"{{{base}, "authority": {{"postgres": {{"leaseTtlMs": 900}}}}}}"#
        ))
        .unwrap();
        assert_eq!(
            c.authority,
            AuthorityConfig::Postgres(PostgresAuthority {
                lease_ttl_ms: 900,
                reclaim_after_ms: None
            })
        );
        for bad in [r#""sqlite""#, r#"{"postgres": {"leaseTTL": 1}}"#] {
            assert!(
                SidecarConfig::parse(&format!(r#"{{{base}, "authority": {bad}}}"#)).is_err(),
                "{bad}"
            );
        }
        for (json, ok) in [
            (r#""none""#, true),
            (r#"{"file": "/k"}"#, true),
            (r#"{"vault": {"path": "secret/x", "key": "k"}}"#, true),
            (
                r#"{"vault": {"path": "x", "key": "k", "auth": {"appRole": {"roleIdPath": "/r", "secretIdPath": "/s"}}}}"#,
                true,
            ),
            (
                r#"{"vault": {"path": "x", "key": "k", "auth": {"jwt": {"tokenPath": "/t"}}}}"#,
                true,
            ),
            (
                r#"{"vault": {"path": "x", "key": "k", "auth": {"appRole": {}}}}"#,
                false,
            ),
            (
                r#"{"vault": {"path": "x", "key": "k", "auth": {"ldap": {}}}}"#,
                false,
            ),
            (
                r#"{"vault": {"path": "x", "key": "k", "rol": "typo"}}"#,
                false,
            ),
            (r#"{"vault": {"path": "x"}}"#, false),
            (r#"{"env": "X"}"#, false),
        ] {
            let r: Result<Credentials, _> = serde_json::from_str(json);
            assert_eq!(r.is_ok(), ok, "{json}");
        }
    }

    #[test]
    fn ledger_credentials_need_a_vault_login() {
        let base = r#""agent": {"namespace": "a", "name": "b"}, "provider": {"kind": "openai", "upstream": "http://x", "model": "m"}, "clientTokenEnv": "T", "databaseUrl": "postgres://db/soma""#;
        let vault = r#""credentials": {"vault": {"path": "x", "key": "k", "role": "r"}}"#;
        let c = SidecarConfig::parse(&format!(
            r#"{{{base}, {vault}, "ledgerCredentials": {{"vault": {{"role": "soma-ledger"}}}}}}"#
        ))
        .unwrap();
        assert_eq!(
            c.ledger_credentials,
            Some(LedgerCredentials::Vault(VaultDatabase {
                mount: "database".into(),
                role: "soma-ledger".into()
            }))
        );
        assert!(matches!(
            SidecarConfig::parse(&format!(
                r#"{{{base}, "credentials": "none", "ledgerCredentials": {{"vault": {{"role": "r"}}}}}}"#
            )),
            Err(ConfigError::LedgerCredentials(_))
        ));
        for bad in [
            r#"{"vault": {}}"#,
            r#"{"vault": {"role": "r", "path": "x"}}"#,
            r#"{"secret": {"role": "r"}}"#,
        ] {
            assert!(
                SidecarConfig::parse(&format!(
                    r#"{{{base}, {vault}, "ledgerCredentials": {bad}}}"#
                ))
                .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn vault_defaults_and_the_kv_path() {
        let v: VaultCredentials =
            serde_json::from_str(r#"{"path": "secret/data/teams/a", "key": "k", "role": "r"}"#)
                .unwrap();
        assert_eq!(v.auth, VaultAuth::Kubernetes(KubernetesAuth::default()));
        assert_eq!((v.mount.as_str(), v.refresh_ms), ("secret", 60_000));
        for (mount, path, want) in [
            ("secret", "secret/data/teams/a", "teams/a"),
            ("secret", "/teams/a/", "teams/a"),
            ("secret", "secret/teams/a", "secret/teams/a"),
            ("kv", "kv/data/x", "x"),
            ("kv", "secret/data/x", "secret/data/x"),
        ] {
            let v = VaultCredentials {
                mount: mount.into(),
                path: path.into(),
                ..v.clone()
            };
            assert_eq!(v.kv_path(), want, "{mount} {path}");
        }
    }

    #[test]
    fn live_parts_are_not_part_of_the_rest() {
        let c = SidecarConfig::parse(FIRST_WAVE_DOCUMENT).unwrap();
        assert!(c.without_live_part().budgets.is_empty());
        assert_eq!(c.live_part().budgets.len(), 1);
        let browned = FIRST_WAVE_DOCUMENT.replacen(
            "\"tools\"",
            r#""brownOut": {"fraction": 0.3, "action": "shed", "message": "m"}, "brownOutRevision": 7, "tools""#,
            1,
        );
        let c = SidecarConfig::parse(&browned).unwrap();
        assert_eq!(c.live_part().brown_out.map(|b| b.fraction), Some(0.3));
        assert_eq!(c.live_part().brown_out_revision, 7);
        assert_eq!(c.without_live_part().brown_out, None);
        assert_eq!(
            c.without_live_part(),
            SidecarConfig::parse(FIRST_WAVE_DOCUMENT)
                .unwrap()
                .without_live_part()
        );
    }

    #[test]
    fn a_brown_out_the_sidecar_cannot_enforce_does_not_read() {
        for bad in [
            r#""brownOut": {"fraction": 2, "action": "shed"}"#,
            r#""brownOut": {"fraction": 0.5, "action": "downgrade"}"#,
            r#""brownOut": {"fraction": 0.5, "action": "drop"}"#,
        ] {
            let doc = FIRST_WAVE_DOCUMENT.replacen("\"tools\"", &format!("{bad}, \"tools\""), 1);
            assert!(SidecarConfig::parse(&doc).is_err(), "{bad}");
        }
    }
}
