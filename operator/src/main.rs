//! `soma-operator`: `run` reconciles Agents, Budgets, Capsules and Jobs in a cluster; `render`
//! prints the children an Agent or Job manifest would get, without a cluster.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use soma_operator::agent::image::accepted_keys;
use soma_operator::config::{
    ImageSignatures, JobConfig, LedgerConfig, OperatorConfig, Redacted, SidecarConfig,
    VaultDefaults, read_price_table,
};
use soma_operator::context::Clock;
use soma_operator::policy::{DEFAULT_SELECTOR, PolicyOptions};
use soma_operator::runtime::{RunOptions, run};
use soma_operator::webhook::WebhookOptions;
use soma_signatures::TrustConfig;

/// mimalloc rather than the system allocator: a policy decision allocates a few thousand
/// times (regorus' values, register windows and rule metadata), and glibc's malloc and free
/// were about 15 % of a decision's instructions (docs/benchmarks.md, "Policy").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "soma-operator",
    version,
    about = "Runs AI agents as governed Kubernetes workloads"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile Agents, Budgets, Capsules and Jobs in the cluster the kubeconfig (or
    /// in-cluster config) points at.
    Run(Box<RunArgs>),
    /// Print, as YAML, every child object the operator would apply for the Agents and Jobs in a
    /// manifest.
    Render(Box<RenderArgs>),
}

#[derive(Args)]
struct SidecarArgs {
    /// Image of the metering sidecar (soma-proxy).
    #[arg(
        long,
        env = "SOMA_SIDECAR_IMAGE",
        default_value = "ghcr.io/soma-dev/soma-proxy:0.1.0"
    )]
    sidecar_image: String,
    /// Port the sidecar's proxy listens on (127.0.0.1 only).
    #[arg(long, env = "SOMA_SIDECAR_PORT", default_value_t = 4000)]
    sidecar_port: u16,
    /// Port of the sidecar's /healthz and /metrics.
    #[arg(long, env = "SOMA_SIDECAR_ADMIN_PORT", default_value_t = 9090)]
    sidecar_admin_port: u16,
    /// Price table handed to every sidecar (YAML or JSON: model → inputPerMTok,
    /// outputPerMTok, cachedInputPerMTok, cacheWritePerMTok, cacheWrite1hPerMTok in micro-units
    /// per million tokens, webSearchPerUse and webFetchPerUse in micro-units per use).
    #[arg(long, env = "SOMA_PRICES_FILE")]
    prices_file: Option<PathBuf>,
    /// The usage ledger's PostgreSQL URL. Set: every sidecar gets it (a Secret `<agent>-ledger`
    /// in the Agent's namespace), delivers usage there and shares Budgets with the Agent's
    /// other replicas; the operator reports spend in Budget status and seals the audit chain.
    /// The chart sets it from its PostgreSQL's Secret (or `ledger.existingSecret`).
    #[arg(long, env = "SOMA_LEDGER_URL", hide_env_values = true)]
    ledger_url: Option<String>,
    /// NATS URL the sidecars publish settled usage to (JetStream).
    #[arg(long, env = "SOMA_NATS_URL")]
    nats_url: Option<String>,
    /// OTLP endpoint the sidecars export their GenAI spans to (an OpenTelemetry collector,
    /// e.g. http://otel-collector.observability:4318); unset, sidecars export nothing.
    #[arg(long, env = "SOMA_SIDECAR_OTLP_ENDPOINT")]
    sidecar_otlp_endpoint: Option<String>,
    /// OTLP protocol of `--sidecar-otlp-endpoint`.
    #[arg(long, env = "SOMA_SIDECAR_OTLP_PROTOCOL", value_parser = ["http/protobuf", "grpc"])]
    sidecar_otlp_protocol: Option<String>,
    /// Namespaces the Agents' pods may reach on any port (where the ledger's PostgreSQL, NATS
    /// and the OpenTelemetry collector run), opened in every Agent's NetworkPolicy.
    #[arg(long, env = "SOMA_SIDECAR_EGRESS_NAMESPACES", value_delimiter = ',')]
    sidecar_egress_namespaces: Vec<String>,
    /// Namespaces whose pods may scrape the sidecars' metrics port (where Prometheus runs);
    /// unset: any pod may. Opened in every Agent's NetworkPolicy.
    #[arg(long, env = "SOMA_SIDECAR_METRICS_NAMESPACES", value_delimiter = ',')]
    sidecar_metrics_namespaces: Vec<String>,
    /// Annotate Agent pods with prometheus.io/scrape, /port and /path (the sidecar's metrics),
    /// for a Prometheus that discovers pods by annotation.
    #[arg(long, env = "SOMA_SIDECAR_SCRAPE_ANNOTATIONS")]
    sidecar_scrape_annotations: bool,
    /// Vault's address for Agents whose `credentials.vault` sets none.
    #[arg(long, env = "SOMA_VAULT_ADDRESS")]
    vault_address: Option<String>,
    /// A PEM CA bundle for Vault's TLS certificate, handed to every sidecar that reads from
    /// Vault (in its ConfigMap: a CA is not secret).
    #[arg(long, env = "SOMA_VAULT_CA_FILE")]
    vault_ca_file: Option<PathBuf>,
    /// The Kubernetes auth method's mount for Agents that set no `authMount`.
    #[arg(long, env = "SOMA_VAULT_AUTH_MOUNT")]
    vault_auth_mount: Option<String>,
    /// The Vault role sidecars log in as when the Agent sets no `role`.
    #[arg(long, env = "SOMA_VAULT_ROLE")]
    vault_role: Option<String>,
    /// The audience of the sidecars' projected token for Vault when the Agent sets no
    /// `audience` (default `vault`).
    #[arg(long, env = "SOMA_VAULT_AUDIENCE")]
    vault_audience: Option<String>,
    /// The database secrets engine's mount for Agents whose `ledgerCredentials.vault` sets no
    /// `mount` (default `database`).
    #[arg(long, env = "SOMA_VAULT_LEDGER_MOUNT")]
    vault_ledger_mount: Option<String>,
    /// The database secrets engine's role for Agents whose `ledgerCredentials.vault` sets no
    /// `role`.
    #[arg(long, env = "SOMA_VAULT_LEDGER_ROLE")]
    vault_ledger_role: Option<String>,
    /// Image with the `soma` CLI, pg_dump and psql, which DR drill Jobs run (`soma dr drill`).
    #[arg(
        long,
        env = "SOMA_CLI_IMAGE",
        default_value = "ghcr.io/soma-dev/soma:0.1.0"
    )]
    cli_image: String,
    /// Task Jobs that may run at once per namespace when they name no Kueue queue
    /// (`spec.queueName`); the others wait in `spec.priority` order. 0: no limit.
    #[arg(long, env = "SOMA_JOB_CONCURRENCY", default_value_t = 10)]
    job_concurrency: u32,
    /// The Qdrant server (gRPC, e.g. `http://qdrant.soma-system:6334`) that Capsules with
    /// `spec.index: qdrant` are loaded into and the sidecars search. Untested outside the
    /// real-cluster suite (docs/capsules.md).
    #[arg(long, env = "SOMA_QDRANT_URL")]
    qdrant_url: Option<String>,
}

impl SidecarArgs {
    fn config(&self, namespaces: Vec<String>) -> anyhow::Result<OperatorConfig> {
        let prices = match &self.prices_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the price table {}", path.display()))?;
                Some(
                    read_price_table(&text)
                        .with_context(|| format!("parsing the price table {}", path.display()))?,
                )
            }
            None => None,
        };
        let nonempty = |v: &Option<String>| v.as_ref().filter(|s| !s.trim().is_empty()).cloned();
        let vault_ca = match &self.vault_ca_file {
            Some(path) => {
                let pem = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the Vault CA bundle {}", path.display()))?;
                anyhow::ensure!(
                    pem.contains("-----BEGIN CERTIFICATE-----"),
                    "the Vault CA bundle {} holds no PEM certificate",
                    path.display()
                );
                Some(pem)
            }
            None => None,
        };
        if let Some(a) = nonempty(&self.vault_address) {
            anyhow::ensure!(
                a.starts_with("https://") || a.starts_with("http://"),
                "--vault-address must be an http(s) URL, not {a:?}"
            );
        }
        let qdrant = nonempty(&self.qdrant_url)
            .map(|url| soma_capsule::qdrant::QdrantSettings::new(&url))
            .transpose()
            .map_err(|e| anyhow::anyhow!("--qdrant-url: {e}"))?;
        Ok(OperatorConfig {
            qdrant,
            vault: VaultDefaults {
                address: nonempty(&self.vault_address),
                ca_bundle: vault_ca,
                auth_mount: nonempty(&self.vault_auth_mount),
                role: nonempty(&self.vault_role),
                audience: nonempty(&self.vault_audience),
                ledger_mount: nonempty(&self.vault_ledger_mount),
                ledger_role: nonempty(&self.vault_ledger_role),
            },
            sidecar: SidecarConfig {
                image: self.sidecar_image.clone(),
                port: self.sidecar_port,
                admin_port: self.sidecar_admin_port,
                prices,
                nats_url: nonempty(&self.nats_url),
                otlp_endpoint: nonempty(&self.sidecar_otlp_endpoint),
                otlp_protocol: nonempty(&self.sidecar_otlp_protocol),
                egress_namespaces: listed(&self.sidecar_egress_namespaces),
                metrics_namespaces: listed(&self.sidecar_metrics_namespaces),
                scrape_annotations: self.sidecar_scrape_annotations,
            },
            namespaces,
            ledger: LedgerConfig {
                url: nonempty(&self.ledger_url).map(Redacted::new),
                ..LedgerConfig::default()
            },
            jobs: JobConfig {
                cli_image: self.cli_image.clone(),
                concurrency: self.job_concurrency,
                ..JobConfig::default()
            },
            ..OperatorConfig::default()
        })
    }
}

#[derive(Args)]
struct LedgerArgs {
    /// Secret (in the operator's namespace) holding the Ed25519 key that signs ledger seals;
    /// created with a new key when absent. Its public key is published in a ConfigMap of the
    /// same name for `soma audit verify --seal-public-key`.
    #[arg(
        long,
        env = "SOMA_LEDGER_SEAL_KEY_SECRET",
        default_value = "soma-ledger-seal-key"
    )]
    ledger_seal_key_secret: String,
    /// Least seconds between two status refreshes of a Budget the sidecars keep charging.
    #[arg(long, env = "SOMA_BUDGET_REFRESH_SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    budget_refresh_seconds: u64,
    /// Tests only: a file holding milliseconds added to the operator's clock (read at every
    /// use), to cross Budget period boundaries (and Job TTLs) without waiting for them.
    #[arg(long, hide = true)]
    clock_offset_file: Option<PathBuf>,
}

#[derive(Args)]
struct SignatureArgs {
    /// Registries (`host:port`) reached over plain HTTP when verifying Capsule signatures,
    /// comma-separated (a registry inside the cluster without TLS).
    #[arg(long, env = "SOMA_INSECURE_REGISTRIES", value_delimiter = ',')]
    insecure_registries: Vec<String>,
    /// PEM files of CA certificates that keyless signing certificates must chain to
    /// (standing in for Fulcio offline), comma-separated.
    #[arg(long, env = "SOMA_KEYLESS_ROOTS", value_delimiter = ',')]
    keyless_roots: Vec<PathBuf>,
    /// Run Agents only from images with a Cosign signature by an accepted key
    /// (`--image-signature-keys`) or identity (`--image-keyless-identity`); the agent
    /// container is pinned to the verified digest.
    #[arg(long, env = "SOMA_REQUIRE_SIGNED_IMAGES")]
    require_signed_images: bool,
    /// PEM files of the public keys accepted for agent images, comma-separated (in the chart:
    /// a ConfigMap mounted as files).
    #[arg(long, env = "SOMA_IMAGE_SIGNATURE_KEYS", value_delimiter = ',')]
    image_signature_keys: Vec<PathBuf>,
    /// A keyless identity accepted for agent images, `issuer=<OIDC issuer>,subject=<identity>`
    /// (repeat the flag for more; needs `--keyless-roots`).
    #[arg(long)]
    image_keyless_identity: Vec<String>,
    /// Seconds a verified image tag is trusted before it is resolved again.
    #[arg(long, env = "SOMA_IMAGE_RECHECK_SECONDS", default_value_t = 600)]
    image_recheck_seconds: u64,
    /// Seconds after which a Capsule whose OCI signature was rejected for what the registry
    /// holds (unsigned, wrong key, replayed, not found) is looked up again, so a signature
    /// pushed after the Capsule was applied is seen.
    #[arg(long, env = "SOMA_CAPSULE_RECHECK_SECONDS", default_value_t = 300)]
    capsule_recheck_seconds: u64,
}

impl SignatureArgs {
    fn images(&self) -> anyhow::Result<ImageSignatures> {
        let mut keys = Vec::new();
        for path in self
            .image_signature_keys
            .iter()
            .filter(|p| !p.as_os_str().is_empty())
        {
            keys.push(
                std::fs::read_to_string(path).with_context(|| {
                    format!("reading the image signature key {}", path.display())
                })?,
            );
        }
        let keyless = self
            .image_keyless_identity
            .iter()
            .map(|text| parse_identity(text))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(ImageSignatures {
            required: self.require_signed_images,
            keys,
            keyless,
            recheck: std::time::Duration::from_secs(self.image_recheck_seconds),
        })
    }

    fn trust(&self) -> anyhow::Result<TrustConfig> {
        let mut roots = Vec::new();
        for path in self
            .keyless_roots
            .iter()
            .filter(|p| !p.as_os_str().is_empty())
        {
            roots.push(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the keyless root {}", path.display()))?,
            );
        }
        Ok(TrustConfig {
            insecure_registries: listed(&self.insecure_registries),
            keyless_roots: roots,
            ..TrustConfig::default()
        })
    }
}

#[derive(Args)]
struct RunArgs {
    /// Namespaces to watch, comma-separated; empty watches all (needs cluster-wide RBAC).
    #[arg(
        long,
        env = "SOMA_WATCH_NAMESPACES",
        value_delimiter = ',',
        default_value = ""
    )]
    namespaces: Vec<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "SOMA_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Reconcile without contending for the Lease (a single replica only).
    #[arg(long)]
    no_leader_election: bool,
    /// Name of the leader-election Lease.
    #[arg(long, env = "SOMA_LEASE_NAME", default_value = "soma-operator")]
    lease_name: String,
    /// Namespace of the Lease; defaults to the pod's namespace ($POD_NAMESPACE), else "default".
    #[arg(long, env = "SOMA_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Lease duration in seconds.
    #[arg(long, env = "SOMA_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// Seconds between two autoscaling steps of an Agent (each jittered by up to ±10 %): the
    /// leader reads the sidecars' load and sets the replicas of every Agent whose
    /// maxReplicas exceeds its minReplicas.
    #[arg(long, env = "SOMA_SCALING_INTERVAL_SECONDS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    scaling_interval_seconds: u64,
    /// Agents the scaling loop steps at once.
    #[arg(long, env = "SOMA_SCALING_CONCURRENCY", default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(1..=256))]
    scaling_concurrency: u64,
    /// Seconds between two rounds of the credentials check: the leader asks the sidecars of
    /// every Agent with `credentials.vault` for `/readyz` and sets its `CredentialsUnavailable`
    /// condition with Vault's reason.
    #[arg(long, env = "SOMA_CREDENTIALS_CHECK_INTERVAL_SECONDS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    credentials_check_interval_seconds: u64,
    #[command(flatten)]
    sidecar: SidecarArgs,
    #[command(flatten)]
    ledger: LedgerArgs,
    #[command(flatten)]
    policy: PolicyArgs,
    #[command(flatten)]
    webhook: WebhookArgs,
    #[command(flatten)]
    signatures: SignatureArgs,
}

#[derive(Args)]
struct PolicyArgs {
    /// Label selector of the ConfigMaps (in the operator's namespace) holding policies.
    #[arg(long, env = "SOMA_POLICY_CONFIGMAP_SELECTOR", default_value = DEFAULT_SELECTOR)]
    policy_configmap_selector: String,
    /// A directory of ConstraintTemplates and constraints (YAML or JSON), read at start-up.
    #[arg(long, env = "SOMA_POLICY_DIR")]
    policy_dir: Option<PathBuf>,
    /// When a policy cannot be evaluated (deadline, overload), allow instead of deny, and set
    /// the webhook's failurePolicy to Ignore. Policy violations always deny.
    #[arg(long, env = "SOMA_POLICY_FAIL_OPEN")]
    policy_fail_open: bool,
    /// Time one policy decision may take, in milliseconds (100 to 25000).
    #[arg(long, env = "SOMA_POLICY_DEADLINE_MS", default_value_t = 1500,
          value_parser = clap::value_parser!(u64).range(100..=25_000))]
    policy_deadline: u64,
}

#[derive(Args)]
struct WebhookArgs {
    /// Port of the admission webhook (HTTPS) on every replica; 0 disables the webhook.
    #[arg(long, env = "SOMA_WEBHOOK_PORT", default_value_t = 9443)]
    webhook_port: u16,
    /// Address the webhook binds.
    #[arg(long, env = "SOMA_WEBHOOK_BIND_ADDRESS", default_value = "0.0.0.0")]
    webhook_bind_address: IpAddr,
    /// The Service in front of the webhook (its DNS names go into the certificate).
    #[arg(
        long,
        env = "SOMA_WEBHOOK_SERVICE",
        default_value = "soma-operator-webhook"
    )]
    webhook_service: String,
    /// Name of the ValidatingWebhookConfiguration the operator manages.
    #[arg(
        long,
        env = "SOMA_WEBHOOK_CONFIGURATION",
        default_value = "soma-policy"
    )]
    webhook_configuration: String,
    /// Secret (in the operator's namespace) holding the serving certificate.
    #[arg(
        long,
        env = "SOMA_WEBHOOK_CERT_SECRET",
        default_value = "soma-operator-webhook-cert"
    )]
    webhook_cert_secret: String,
    /// The certificate Secret is issued by cert-manager: read and follow it, never generate.
    #[arg(long, env = "SOMA_WEBHOOK_CERT_MANAGER")]
    webhook_cert_manager: bool,
}

#[derive(Args)]
struct RenderArgs {
    /// Manifest holding Agents and Jobs, with the Budgets they charge (`-` for standard input).
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
    #[command(flatten)]
    sidecar: SidecarArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Render(args) => render(&args),
        Command::Run(args) => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("soma-operator: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run_operator(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(
                        error = format!("{e:#}"),
                        "soma-operator stopped with an error"
                    );
                    eprintln!("soma-operator: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn render(args: &RenderArgs) -> ExitCode {
    let input = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(&args.file)
    };
    let manifest = match input {
        Ok(m) => m,
        Err(e) => {
            eprintln!(
                "soma-operator render: cannot read {}: {e}",
                args.file.display()
            );
            return ExitCode::from(2);
        }
    };
    let config = match args.sidecar.config(Vec::new()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("soma-operator render: {e:#}");
            return ExitCode::from(2);
        }
    };
    match soma_operator::render::render(&manifest, &config) {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("soma-operator render: {}: {e}", args.file.display());
            ExitCode::from(2)
        }
    }
}

async fn run_operator(args: RunArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_signal();
    let _telemetry = soma_operator::telemetry::init("soma-operator")?;
    // Flags are checked before connecting, so a mistake is reported as itself.
    let images = args.signatures.images()?;
    let trust = args.signatures.trust()?;
    let capsule_recheck = Duration::from_secs(args.signatures.capsule_recheck_seconds.max(1));
    if images.required {
        accepted_keys(&trust, &images).map_err(anyhow::Error::msg)?;
    }
    let client = kube::Client::try_default().await?;
    let namespaces: Vec<String> = args
        .namespaces
        .into_iter()
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
        .collect();
    let lease_namespace = args
        .lease_namespace
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| "default".to_owned());
    let own_namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".to_owned());
    let deadline = Duration::from_millis(args.policy.policy_deadline);
    let policy = PolicyOptions {
        namespace: own_namespace.clone(),
        configmap_selector: args.policy.policy_configmap_selector,
        dir: args.policy.policy_dir,
        deadline,
        fail_open: args.policy.policy_fail_open,
    };
    let w = args.webhook;
    let webhook = (w.webhook_port != 0).then(|| {
        (
            WebhookOptions {
                port: w.webhook_port,
                service: w.webhook_service,
                namespace: own_namespace,
                configuration_name: w.webhook_configuration,
                cert_secret: w.webhook_cert_secret,
                cert_manager: w.webhook_cert_manager,
                watched: namespaces.clone(),
                fail_open: policy.fail_open,
                deadline,
                ..WebhookOptions::default()
            },
            w.webhook_bind_address,
        )
    });
    let identity = std::env::var("POD_NAME")
        .unwrap_or_else(|_| format!("soma-operator-{}", std::process::id()));
    let base = args.sidecar.config(namespaces)?;
    let options = RunOptions {
        config: OperatorConfig {
            images,
            capsule_recheck,
            insecure_registries: trust.insecure_registries.clone(),
            ledger: LedgerConfig {
                seal_key_secret: args.ledger.ledger_seal_key_secret,
                refresh: Duration::from_secs(args.ledger.budget_refresh_seconds),
                ..base.ledger.clone()
            },
            ..base
        },
        clock: args
            .ledger
            .clock_offset_file
            .map_or(Clock::System, Clock::OffsetFile),
        metrics_addr: args.metrics_addr,
        leader_election: !args.no_leader_election,
        lease_name: args.lease_name,
        lease_namespace,
        identity,
        lease_seconds: args.lease_seconds.max(2),
        policy,
        webhook,
        trust,
        autoscale: soma_operator::autoscale::Options {
            interval: Duration::from_secs(args.scaling_interval_seconds),
            concurrency: usize::try_from(args.scaling_concurrency).unwrap_or(8),
            ..soma_operator::autoscale::Options::default()
        },
        credentials_check: soma_operator::credentials_check::Options {
            interval: Duration::from_secs(args.credentials_check_interval_seconds),
            ..soma_operator::credentials_check::Options::default()
        },
    };
    run(client, options, shutdown).await
}

/// `issuer=<issuer>,subject=<subject>` (either order) as (issuer, subject).
/// A comma-separated flag's items, trimmed, empty ones dropped (`--x a,,b ,` is `[a, b]`).
fn listed(items: &[String]) -> Vec<String> {
    items
        .iter()
        .map(|i| i.trim().to_owned())
        .filter(|i| !i.is_empty())
        .collect()
}

fn parse_identity(text: &str) -> anyhow::Result<(String, String)> {
    let (mut issuer, mut subject) = (None, None);
    for part in text.split(',') {
        match part.trim().split_once('=') {
            Some(("issuer", v)) if !v.is_empty() => issuer = Some(v.to_owned()),
            Some(("subject", v)) if !v.is_empty() => subject = Some(v.to_owned()),
            _ => anyhow::bail!(
                "--image-keyless-identity {text:?}: expected issuer=<OIDC issuer>,subject=<identity>"
            ),
        }
    }
    match (issuer, subject) {
        (Some(i), Some(s)) => Ok((i, s)),
        _ => anyhow::bail!(
            "--image-keyless-identity {text:?}: expected issuer=<OIDC issuer>,subject=<identity>"
        ),
    }
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or Ctrl-C. The handlers are installed
/// when this is called, not when the future is first polled, so a SIGTERM during start-up
/// (policies compiling, waiting for a certificate) is a clean shutdown, not a kill.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let handlers = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::interrupt()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let (mut term, mut int) = handlers;
            let term = async {
                match term.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let int = async {
                match int.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            };
            tokio::select! {
                () = term => {}
                () = int => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown signal received");
    }
}

#[cfg(test)]
mod tests {
    use super::parse_identity;

    #[test]
    fn keyless_identities_need_an_issuer_and_a_subject() {
        assert_eq!(
            parse_identity("issuer=https://token.actions.githubusercontent.com,subject=me@x.dev")
                .expect("valid"),
            (
                "https://token.actions.githubusercontent.com".to_owned(),
                "me@x.dev".to_owned()
            )
        );
        assert_eq!(
            parse_identity("subject=s, issuer=i").expect("either order"),
            ("i".to_owned(), "s".to_owned())
        );
        for bad in [
            "issuer=i",
            "subject=s",
            "issuer=,subject=s",
            "owner=o,subject=s",
            "",
        ] {
            let err = parse_identity(bad).expect_err(bad).to_string();
            assert!(err.contains("expected issuer="), "{bad}: {err}");
        }
    }
}
