//! What the operator itself is configured with: the sidecar it injects, the defaults it
//! applies, and which namespaces it watches. Filled from flags and environment by `main`.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use soma_metering::PriceTable;
use std::collections::BTreeMap;

/// The metering sidecar's image, ports, and where its usage goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarConfig {
    /// Image of the `soma-proxy` metering sidecar.
    pub image: String,
    /// Port the proxy listens on, on 127.0.0.1 only.
    pub port: u16,
    /// Port of the sidecar's `/healthz` and `/metrics`, on all addresses (probes, Prometheus).
    pub admin_port: u16,
    /// Prices per model, handed to every sidecar (cost is metered only with prices; with a
    /// table, a model missing from it is refused as unknown).
    pub prices: Option<PriceTable>,
    /// NATS URL the sidecars publish settled usage to (JetStream), if any.
    pub nats_url: Option<String>,
    /// OTLP endpoint the sidecars export their GenAI spans to, if any. Set: every sidecar gets
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME=soma-proxy` and
    /// `OTEL_RESOURCE_ATTRIBUTES` naming its namespace, pod and Agent.
    pub otlp_endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` for the sidecars (`grpc` or `http/protobuf`); unset, the
    /// sidecar's default, HTTP/protobuf.
    pub otlp_protocol: Option<String>,
    /// Namespaces the Agents' pods may open connections to on any port, beside DNS, the
    /// provider and the Agent's allow-list: where the platform runs the ledger's PostgreSQL,
    /// NATS and the OpenTelemetry collector. NetworkPolicy cannot name a host, and these live
    /// in the cluster's private ranges, which the provider rule leaves closed.
    pub egress_namespaces: Vec<String>,
    /// Namespaces allowed to reach the sidecar's metrics port (where Prometheus runs); empty:
    /// any pod may, as before. Opened in every Agent's NetworkPolicy.
    pub metrics_namespaces: Vec<String>,
    /// Annotate every Agent pod with `prometheus.io/scrape`, `prometheus.io/port` and
    /// `prometheus.io/path` for a Prometheus that discovers pods by annotation (instead of
    /// the chart's PodMonitor).
    pub scrape_annotations: bool,
}

impl Default for SidecarConfig {
    fn default() -> Self {
        Self {
            image: "ghcr.io/soma-dev/soma-proxy:0.1.0".to_owned(),
            port: 4000,
            admin_port: 9090,
            prices: None,
            nats_url: None,
            otlp_endpoint: None,
            otlp_protocol: None,
            egress_namespaces: Vec::new(),
            metrics_namespaces: Vec::new(),
            scrape_annotations: false,
        }
    }
}

/// The key of the per-Agent ledger Secret holding the URL.
pub const LEDGER_SECRET_KEY: &str = "database-url";

/// A value that must never be printed (a URL with a password): `Debug` shows `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(String);

impl Redacted {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The usage ledger, as the operator uses it and hands it to the sidecars.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerConfig {
    /// The PostgreSQL URL. Set: every sidecar gets it (through a Secret `<agent>-ledger` in
    /// the Agent's namespace), delivers usage there and shares its Budgets with the other
    /// replicas through leases; the operator publishes Budget definitions there, reads spend
    /// for Budget status and seals the audit chain. Unset: each sidecar enforces its Budgets
    /// alone and keeps usage in its outbox; Agents say so in their `BudgetScope` condition.
    pub url: Option<Redacted>,
    /// The Secret (in the operator's namespace) holding the key that signs ledger seals; the
    /// public key is published in a ConfigMap of the same name.
    pub seal_key_secret: String,
    /// Least time between two status refreshes of a Budget the sidecars keep charging.
    pub refresh: std::time::Duration,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            url: None,
            seal_key_secret: "soma-ledger-seal-key".to_owned(),
            refresh: std::time::Duration::from_secs(5),
        }
    }
}

/// Reads a price table file (YAML or JSON: model → `inputPerMTok`, `outputPerMTok`, optional
/// `cachedInputPerMTok`, `cacheWritePerMTok` and `cacheWrite1hPerMTok` in micro-units per
/// million tokens, and `webSearchPerUse`, `webFetchPerUse` in micro-units per use).
pub fn read_price_table(text: &str) -> Result<PriceTable, serde_yaml::Error> {
    serde_yaml::from_str(text)
}

/// Settings shared by every reconcile.
#[derive(Clone, Debug, PartialEq)]
pub struct OperatorConfig {
    /// The metering sidecar.
    pub sidecar: SidecarConfig,
    /// Resources of the agent container when the Agent sets none.
    pub default_agent_resources: ResourceRequirements,
    /// Resources of the sidecar container.
    pub sidecar_resources: ResourceRequirements,
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    /// Whether, and how, agent images must be signed.
    pub images: ImageSignatures,
    /// The usage ledger.
    pub ledger: LedgerConfig,
    /// How soon a Capsule whose OCI signature was rejected for what the registry holds
    /// (unsigned, wrong key, replayed, not found) is looked up again: a signature pushed
    /// after the Capsule was applied is not an event the operator can watch.
    pub capsule_recheck: std::time::Duration,
    /// Registries (`host:port`) reached over plain HTTP: Capsule verification uses them, and
    /// so does the init container that fetches a Capsule into an agent pod
    /// (`--insecure-registries`).
    pub insecure_registries: Vec<String>,
    /// The Job controller.
    pub jobs: JobConfig,
    /// What an Agent's `credentials.vault` falls back to where it sets nothing.
    pub vault: VaultDefaults,
    /// The Qdrant server that Capsules with `spec.index: qdrant` are loaded into and the
    /// sidecars search (`--qdrant-url`); absent, such Capsules are not loaded.
    pub qdrant: Option<soma_capsule::qdrant::QdrantSettings>,
}

/// Vault settings the platform gives every Agent with `credentials.vault` (operator flags,
/// chart values `vault.*`); the Agent's own fields win.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VaultDefaults {
    /// Vault's address.
    pub address: Option<String>,
    /// A PEM CA bundle for Vault's TLS certificate (not secret): written into each Agent's
    /// sidecar ConfigMap as `vault-ca.pem` and named by the sidecar's `caCertPath`.
    pub ca_bundle: Option<String>,
    /// The Kubernetes auth method's mount (JWT auth keeps its own default, `jwt`).
    pub auth_mount: Option<String>,
    /// The role the sidecars log in as.
    pub role: Option<String>,
    /// The audience of the sidecars' projected service-account token.
    pub audience: Option<String>,
    /// The database secrets engine's mount for an Agent's `ledgerCredentials.vault`.
    pub ledger_mount: Option<String>,
    /// The engine's role for an Agent's `ledgerCredentials.vault`.
    pub ledger_role: Option<String>,
}

/// How Jobs run.
#[derive(Clone, Debug, PartialEq)]
pub struct JobConfig {
    /// The image with the `soma` CLI (and `pg_dump`/`psql`) that DR drills run.
    pub cli_image: String,
    /// Task Jobs that may run at once per namespace when they name no Kueue queue (0: no
    /// limit).
    pub concurrency: u32,
    /// Requests and limits of a drill pod.
    pub drill_resources: ResourceRequirements,
}

impl Default for JobConfig {
    fn default() -> Self {
        Self {
            cli_image: "ghcr.io/soma-dev/soma:0.1.0".to_owned(),
            concurrency: 10,
            drill_resources: resources("100m", "128Mi", "1", "1Gi"),
        }
    }
}

/// The operator's policy for agent images: off by default; when `required`, every Agent's
/// `spec.image` must carry a Cosign signature by one of `keys` or `keyless` identities.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSignatures {
    /// Whether Agents may only run signed images.
    pub required: bool,
    /// Accepted public keys, PEM.
    pub keys: Vec<String>,
    /// Accepted keyless identities: (OIDC issuer, certificate subject).
    pub keyless: Vec<(String, String)>,
    /// How long a verified tag is trusted to still point at the digest that was verified;
    /// after that the tag is resolved again (the signature check itself stays cached by
    /// digest).
    pub recheck: std::time::Duration,
}

impl Default for ImageSignatures {
    fn default() -> Self {
        Self {
            required: false,
            keys: Vec::new(),
            keyless: Vec::new(),
            recheck: std::time::Duration::from_secs(600),
        }
    }
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            sidecar: SidecarConfig::default(),
            default_agent_resources: resources("100m", "128Mi", "1", "512Mi"),
            sidecar_resources: resources("50m", "64Mi", "500m", "256Mi"),
            namespaces: Vec::new(),
            images: ImageSignatures::default(),
            capsule_recheck: std::time::Duration::from_secs(300),
            insecure_registries: Vec::new(),
            ledger: LedgerConfig::default(),
            jobs: JobConfig::default(),
            vault: VaultDefaults::default(),
            qdrant: None,
        }
    }
}

/// Requests and limits for cpu and memory.
pub fn resources(
    cpu_req: &str,
    mem_req: &str,
    cpu_lim: &str,
    mem_lim: &str,
) -> ResourceRequirements {
    let pair = |cpu: &str, mem: &str| {
        BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.to_owned())),
            ("memory".to_owned(), Quantity(mem.to_owned())),
        ])
    };
    ResourceRequirements {
        requests: Some(pair(cpu_req, mem_req)),
        limits: Some(pair(cpu_lim, mem_lim)),
        ..ResourceRequirements::default()
    }
}
