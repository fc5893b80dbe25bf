//! The sidecar's configuration file.
//!
//! The operator writes it (`operator/src/agent/children.rs`, `SidecarSettings`) as JSON, which
//! is also YAML; this reader accepts that document unchanged and adds optional fields the
//! operator does not write yet (prices, Budget definitions, outbox path, limits, timeouts).
//! Every field is documented in `docs/sidecar.md`.

use std::path::PathBuf;

use serde::Deserialize;
use soma_metering::{BudgetDef, PriceTable};

/// Why the file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON or YAML.
    #[error("not valid JSON or YAML")]
    Syntax(#[source] serde_yaml::Error),
    /// Valid syntax, wrong fields.
    #[error("invalid configuration")]
    Shape(#[source] serde_json::Error),
    /// A `...Env` field names an environment variable that is unset or empty.
    #[error("{field} names the environment variable {var}, which is not set")]
    MissingEnv {
        /// The configuration field.
        field: &'static str,
        /// The variable it names.
        var: String,
    },
}

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// Proxy listener; loopback by default.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// `/healthz` and `/metrics`.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: String,
    /// The Agent, for labels and records.
    pub agent: AgentIdentity,
    /// Where calls go.
    pub provider: ProviderConfig,
    /// Where the provider key is read from.
    pub credentials: Credentials,
    /// The Budget calls are charged to.
    #[serde(default)]
    pub budget: Option<String>,
    /// The environment variable holding the per-pod client token.
    pub client_token_env: String,
    /// Tools the agent may call (not enforced by the proxy yet).
    #[serde(default)]
    pub tools: Vec<String>,
    /// Capsules the agent may use (not enforced by the proxy yet).
    #[serde(default)]
    pub capsules: Vec<String>,

    // Fields the sidecar adds; all optional.
    /// Prices per model (micros per million tokens). Absent: cost is not metered (0) and any
    /// model is accepted; present: a model missing from it is refused as unknown.
    #[serde(default)]
    pub prices: Option<PriceTable>,
    /// Budget definitions: `budget` and its `parentRef` chain are looked up here.
    #[serde(default)]
    pub budgets: Vec<BudgetDef>,
    /// The SQLite outbox (WAL): usage records and the embedded budget authority's state.
    #[serde(default = "default_outbox_path")]
    pub outbox_path: PathBuf,
    /// Which budget authority enforces `budget`: `embedded` (the default: this sidecar alone,
    /// its state rebuilt from the outbox) or `{"postgres": {...}}` (replicas sharing Budgets
    /// through the PostgreSQL at `databaseUrl`, each leasing slices).
    #[serde(default)]
    pub authority: AuthorityConfig,
    /// PostgreSQL URL: the ledger (settled usage is delivered there in the background) and,
    /// with `authority: postgres`, the cluster budget authority. Read from the file, never
    /// logged.
    #[serde(default)]
    pub database_url: Option<String>,
    /// The environment variable holding `databaseUrl` instead (the operator sets it from a
    /// Secret, so the password is never in the ConfigMap). Ignored when `databaseUrl` is set.
    #[serde(default)]
    pub database_url_env: Option<String>,
    /// NATS URL; when set, settled usage is published to JetStream in the background.
    #[serde(default)]
    pub nats_url: Option<String>,
    /// How often delivered outbox rows older than the longest budget window are deleted, in
    /// milliseconds (0: never).
    #[serde(default = "default_prune_interval")]
    pub prune_interval_ms: u64,
    /// Pause between delivery rounds (ledger and events) when the outbox is drained, in milliseconds.
    #[serde(default = "default_delivery_interval")]
    pub delivery_interval_ms: u64,
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

/// `authority`: `"embedded"` or `{"postgres": {"leaseTtlMs": 30000}}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuthorityConfig {
    /// One sidecar: Budgets in memory, rebuilt from the outbox at start-up.
    #[default]
    Embedded,
    /// Many replicas: Budget windows and leases in PostgreSQL (`databaseUrl`).
    Postgres(PostgresAuthority),
}

/// `authority.postgres`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PostgresAuthority {
    /// How long a lease lives without a heartbeat (heartbeats run every third of it); a
    /// replica gone longer has its unused slice reclaimed by the others.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_ms: u64,
    /// How long a lease must have been expired before another replica cuts it back to what
    /// its holder last reported and reuses the rest. Default: ten lease TTLs.
    #[serde(default)]
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

fn default_lease_ttl() -> u64 {
    30_000
}

fn default_prune_interval() -> u64 {
    60_000
}

/// `agent`.
#[derive(Clone, Debug, Deserialize)]
pub struct AgentIdentity {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// `provider`.
#[derive(Clone, Debug, Deserialize)]
pub struct ProviderConfig {
    /// Which wire format the upstream speaks.
    pub kind: ProviderKind,
    /// Base URL, such as `https://api.openai.com` or `http://vllm:8000/v1`.
    pub upstream: String,
    /// The Agent's model.
    pub model: String,
}

/// `provider.kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProviderKind {
    /// OpenAI.
    Openai,
    /// Anthropic.
    Anthropic,
    /// Anything speaking OpenAI's API.
    OpenaiCompatible,
}

/// `credentials`: `"none"`, `{"file": PATH}` or `{"vault": {...}}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Credentials {
    /// No key (a keyless local endpoint).
    None,
    /// A file mounted from a Secret.
    File(PathBuf),
    /// A Vault KV path (not supported by this build).
    Vault {
        /// KV path.
        path: String,
        /// Field.
        key: String,
        /// Kubernetes-auth role.
        #[serde(default)]
        role: Option<String>,
    },
}

/// `timeouts`, in milliseconds.
#[derive(Clone, Copy, Debug, Deserialize)]
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
fn default_body_limit() -> usize {
    16 * 1024 * 1024
}
fn default_max_tokens() -> u64 {
    4_096
}
fn default_image_tokens() -> u64 {
    soma_metering::tokens::DEFAULT_IMAGE_TOKENS
}
fn default_anthropic_version() -> String {
    "2023-06-01".into()
}

impl Config {
    /// Parses the file's text (JSON or YAML). YAML is read into a JSON value first, so that
    /// enums have one spelling in both (`{"file": PATH}`, not a YAML tag).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let value: serde_json::Value = serde_yaml::from_str(text).map_err(ConfigError::Syntax)?;
        serde_json::from_value(value).map_err(ConfigError::Shape)
    }

    /// Fills the fields that the file names an environment variable for (`databaseUrlEnv`),
    /// reading variables through `var`. A named variable that is unset or empty is an error:
    /// starting without the ledger the operator asked for would look healthy and meter nothing.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if self.database_url.is_none()
            && let Some(name) = &self.database_url_env
        {
            match var(name).filter(|v| !v.trim().is_empty()) {
                Some(url) => self.database_url = Some(url),
                None => {
                    return Err(ConfigError::MissingEnv {
                        field: "databaseUrlEnv",
                        var: name.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exactly what `soma-operator render -f examples/agent.yaml` writes today.
    const OPERATOR_DOCUMENT: &str = r#"{
  "listen": "127.0.0.1:4000",
  "adminListen": "0.0.0.0:9090",
  "agent": { "namespace": "research", "name": "research-assistant" },
  "provider": { "kind": "openai", "upstream": "https://api.openai.com", "model": "gpt-4o" },
  "credentials": { "file": "/etc/soma/provider-key/api-key" },
  "budget": "research-team",
  "clientTokenEnv": "SOMA_POD_UID",
  "tools": ["web-search"],
  "capsules": ["support-kb"]
}"#;

    #[test]
    fn reads_the_operators_document_unchanged() {
        let c = Config::parse(OPERATOR_DOCUMENT).unwrap();
        assert_eq!(c.provider.kind, ProviderKind::Openai);
        assert!(matches!(c.credentials, Credentials::File(ref p) if p.ends_with("api-key")));
        assert_eq!(c.budget.as_deref(), Some("research-team"));
        assert_eq!(c.client_token_env, "SOMA_POD_UID");
        assert!(c.prices.is_none() && c.budgets.is_empty());
        assert_eq!(c.body_limit_bytes, 16 * 1024 * 1024);
    }

    #[test]
    fn yaml_reads_too_and_typos_are_reported() {
        let y = "agent: {namespace: a, name: b}\nprovider: {kind: anthropic, upstream: 'http://x', model: m}\ncredentials: none\nclientTokenEnv: T\n";
        let c = Config::parse(y).unwrap();
        assert_eq!(c.provider.kind, ProviderKind::Anthropic);
        assert!(Config::parse("agent: [").is_err());
        assert!(Config::parse("{\"agent\": 1}").is_err());
    }

    #[test]
    fn database_url_from_the_environment() {
        let base = r#""agent": {"namespace": "a", "name": "b"}, "provider": {"kind": "openai", "upstream": "http://x", "model": "m"}, "credentials": "none", "clientTokenEnv": "T""#;
        let doc = format!(r#"{{{base}, "databaseUrlEnv": "SOMA_DATABASE_URL"}}"#);
        let mut c = Config::parse(&doc).unwrap();
        c.apply_env(|n| (n == "SOMA_DATABASE_URL").then(|| "postgres://u:p@db/soma".into()))
            .unwrap();
        assert_eq!(c.database_url.as_deref(), Some("postgres://u:p@db/soma"));

        let mut c = Config::parse(&doc).unwrap();
        let err = c.apply_env(|_| Some(" ".into())).unwrap_err();
        assert!(err.to_string().contains("SOMA_DATABASE_URL"), "{err}");
        assert!(c.database_url.is_none());

        // An explicit URL wins and the variable is not needed.
        let doc = format!(
            r#"{{{base}, "databaseUrl": "postgres://x/y", "databaseUrlEnv": "SOMA_DATABASE_URL"}}"#
        );
        let mut c = Config::parse(&doc).unwrap();
        c.apply_env(|_| None).unwrap();
        assert_eq!(c.database_url.as_deref(), Some("postgres://x/y"));
    }

    #[test]
    fn authority_shapes() {
        let base = r#""agent": {"namespace": "a", "name": "b"}, "provider": {"kind": "openai", "upstream": "http://x", "model": "m"}, "credentials": "none", "clientTokenEnv": "T""#;
        let c = Config::parse(&format!("{{{base}}}")).unwrap();
        assert_eq!(c.authority, AuthorityConfig::Embedded);
        let c =
            Config::parse(&format!(r#"{{{base}, "authority": {{"postgres": {{}}}}}}"#)).unwrap();
        assert_eq!(
            c.authority,
            AuthorityConfig::Postgres(PostgresAuthority::default())
        );
        let c = Config::parse(&format!(
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
                Config::parse(&format!(r#"{{{base}, "authority": {bad}}}"#)).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn credential_shapes() {
        for (json, ok) in [
            (r#""none""#, true),
            (r#"{"file": "/k"}"#, true),
            (r#"{"vault": {"path": "secret/x", "key": "k"}}"#, true),
            (r#"{"env": "X"}"#, false),
        ] {
            let r: Result<Credentials, _> = serde_json::from_str(json);
            assert_eq!(r.is_ok(), ok, "{json}");
        }
    }
}
