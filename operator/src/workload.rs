//! Builds what runs an [`AgentSpec`]: the pod (agent container, native metering sidecar,
//! sandbox, volumes), the sidecar's configuration and its ConfigMap, the ledger Secret, the
//! ServiceAccount and the NetworkPolicy. One builder, used by the Agent controller (its
//! Deployment's pod template) and by the Job controller (its batch/v1 Job's pod template), so
//! a task runs under exactly the sandbox, key custody and egress rules of an Agent. Pure:
//! nothing here calls the API.
//!
//! ```text
//!   Agent ──┐                       ┌─▶ pod template (agent + soma-proxy, sandboxed)
//!           ├─▶ Workload (spec, ────┼─▶ SidecarConfig ─▶ ConfigMap <name>-sidecar
//!   Job ────┘   names, identity)    ├─▶ Secret <name>-ledger, ServiceAccount <name>
//!                                   └─▶ NetworkPolicy <name> (default-deny egress)
//! ```

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, Secret, SecretKeySelector, SecretVolumeSource,
    SecurityContext, ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest, Sha256};
use soma_contract::{
    AgentIdentity, AuthorityConfig, Credentials, PostgresAuthority, ProviderConfig, ProviderKind,
    SidecarConfig,
};
use soma_crds::agent::{AgentSpec, EgressRule, PROVIDER_KEY_ENV_NAMES, Provider};
use soma_crds::common::LocalRef;
use soma_metering::{BudgetDef, BudgetKey};

use crate::config::{LEDGER_SECRET_KEY, OperatorConfig};

pub mod revoked;
pub mod vault;
pub use vault::{VAULT_CA_KEY, vault_credentials};

/// Annotation on the pod template carrying a hash of the sidecar configuration, so a
/// configuration change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "soma.dev/sidecar-config-hash";
/// Name of the sidecar container.
pub const SIDECAR_NAME: &str = "soma-proxy";
/// Name of the agent container.
pub const AGENT_CONTAINER: &str = "agent";
/// Where the sidecar reads its configuration.
pub const SIDECAR_CONFIG_DIR: &str = "/etc/soma/proxy";
/// The sidecar's writable state (its usage outbox); mounted into the sidecar only.
pub const SIDECAR_STATE_DIR: &str = "/var/lib/soma";
/// Where the sidecar reads the provider key from a Secret; mounted into the sidecar only.
pub const PROVIDER_KEY_DIR: &str = "/var/run/secrets/soma/provider";
/// UID and GID the pod runs as when the image does not say otherwise.
pub const NON_ROOT_ID: i64 = 65532;

/// Private and link-local ranges excluded when a destination is only known by host name, so
/// that "the public provider API" does not also open the cluster network or the cloud
/// metadata endpoint.
const NON_PUBLIC_RANGES: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
];

/// Who a workload is: what its children are named and labelled, who owns them, and the
/// identity its sidecar records usage under.
#[derive(Clone, Debug)]
pub struct Workload<'a> {
    /// What runs.
    pub spec: &'a AgentSpec,
    /// The namespace of the owner and of every child.
    pub namespace: String,
    /// Name of the ServiceAccount and NetworkPolicy, and the prefix of `<name>-sidecar` and
    /// `<name>-ledger`.
    pub name: String,
    /// The agent name the sidecar records usage under (`agent` in the ledger, the NATS
    /// subject, the `soma.agent` trace attribute).
    pub identity: String,
    /// The Budget the calls are charged to.
    pub budget_ref: Option<&'a LocalRef>,
    /// Labels on every child and on the pods.
    pub labels: BTreeMap<String, String>,
    /// The labels that select the pods.
    pub selector: BTreeMap<String, String>,
    /// The controller owner of every child (absent without a uid, as in `render`).
    pub owner: Option<OwnerReference>,
}

/// Name of the sidecar ConfigMap of workload `name`.
pub fn sidecar_config_name(name: &str) -> String {
    format!("{name}-sidecar")
}

/// Name of the Secret carrying the ledger's URL to workload `name`'s sidecar.
pub fn ledger_secret_name(name: &str) -> String {
    format!("{name}-ledger")
}

/// Metadata for a child named `name`: namespace, labels, and the owner as controller.
pub fn child_meta(w: &Workload<'_>, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: (!w.namespace.is_empty()).then(|| w.namespace.clone()),
        labels: Some(w.labels.clone()),
        owner_references: w.owner.clone().map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// The ServiceAccount the pods run as; its token is not mounted unless the spec asks.
pub fn service_account(w: &Workload<'_>) -> ServiceAccount {
    ServiceAccount {
        metadata: child_meta(w, w.name.clone()),
        automount_service_account_token: Some(w.spec.sandbox.automount_service_account_token),
        ..ServiceAccount::default()
    }
}

/// The provider's base URL: the spec's endpoint, or the provider's public API.
pub fn upstream_url(spec: &AgentSpec) -> String {
    match (&spec.model.endpoint, spec.model.provider) {
        (Some(endpoint), _) => endpoint.trim_end_matches('/').to_owned(),
        (None, Provider::Anthropic) => "https://api.anthropic.com".to_owned(),
        (None, Provider::Openai | Provider::OpenaiCompatible) => {
            "https://api.openai.com".to_owned()
        }
    }
}

/// The sidecar's environment variable carrying the ledger URL.
const DATABASE_URL_ENV: &str = "SOMA_DATABASE_URL";

/// The sidecar's configuration (the contract type the `soma-proxy` binary reads), charging
/// `budgets` (the workload's Budget followed by its `parentRef` chain).
pub fn sidecar_config(
    w: &Workload<'_>,
    budgets: &[BudgetDef],
    config: &OperatorConfig,
) -> SidecarConfig {
    let spec = w.spec;
    let credentials = match &spec.credentials {
        Some(c) => match (&c.secret_ref, &c.vault) {
            (Some(s), _) => Credentials::File(format!("{PROVIDER_KEY_DIR}/{}", s.key).into()),
            (None, Some(v)) => Credentials::Vault(Box::new(vault_credentials(v, &config.vault))),
            (None, None) => Credentials::None,
        },
        None => Credentials::None,
    };
    let kind = match spec.model.provider {
        Provider::Openai => ProviderKind::Openai,
        Provider::Anthropic => ProviderKind::Anthropic,
        Provider::OpenaiCompatible => ProviderKind::OpenaiCompatible,
    };
    let mut c = SidecarConfig::new(
        AgentIdentity {
            namespace: w.namespace.clone(),
            name: w.identity.clone(),
        },
        ProviderConfig {
            kind,
            upstream: upstream_url(spec),
            model: spec.model.name.clone(),
        },
        credentials,
        "SOMA_POD_UID",
    );
    c.listen = format!("127.0.0.1:{}", config.sidecar.port);
    c.admin_listen = format!("0.0.0.0:{}", config.sidecar.admin_port);
    c.budget = w
        .budget_ref
        .map(|b| BudgetKey::new(w.namespace.clone(), b.name.clone()).to_string());
    c.tools.clone_from(&spec.tools);
    c.capsules = spec
        .capsules
        .iter()
        .map(|c| soma_contract::recall::SidecarCapsule::from(c.name.as_str()))
        .collect();
    c.budgets = budgets.to_vec();
    c.outbox_path = format!("{SIDECAR_STATE_DIR}/outbox.db").into();
    c.prices.clone_from(&config.sidecar.prices);
    if config.ledger.url.is_some() {
        c.authority = AuthorityConfig::Postgres(PostgresAuthority::default());
        c.database_url_env = Some(DATABASE_URL_ENV.to_owned());
    }
    // Unusable ledger credentials stop the workload before it starts (the reconciles check
    // `vault::ledger_credentials` first); here they are left out.
    c.ledger_credentials = vault::ledger_credentials(spec, config).ok().flatten();
    c.nats_url.clone_from(&config.sidecar.nats_url);
    c
}

/// The ConfigMap holding the sidecar's configuration as JSON (valid YAML too).
pub fn sidecar_config_map(
    w: &Workload<'_>,
    settings: &SidecarConfig,
    config: &OperatorConfig,
) -> Result<ConfigMap, serde_json::Error> {
    sidecar_config_map_with(
        child_meta(w, sidecar_config_name(&w.name)),
        settings,
        config,
    )
}

/// [`sidecar_config_map`] with its metadata given.
pub fn sidecar_config_map_with(
    metadata: ObjectMeta,
    settings: &SidecarConfig,
    config: &OperatorConfig,
) -> Result<ConfigMap, serde_json::Error> {
    let body = serde_json::to_string_pretty(settings)?;
    let mut data = BTreeMap::from([("config.yaml".to_owned(), body)]);
    // The platform's CA bundle for Vault, beside the configuration that names it.
    if let (Some(pem), Credentials::Vault(_)) = (&config.vault.ca_bundle, &settings.credentials) {
        data.insert(VAULT_CA_KEY.to_owned(), pem.clone());
    }
    Ok(ConfigMap {
        metadata,
        data: Some(data),
        ..ConfigMap::default()
    })
}

/// The Secret giving the sidecar the ledger's URL, when the operator has a ledger. The URL may
/// hold a password, so it travels in a Secret read into the sidecar's environment only.
/// With ledger credentials from Vault the URL carries no user or password: the sidecar logs
/// in as the user Vault leases it.
pub fn ledger_secret(w: &Workload<'_>, config: &OperatorConfig) -> Option<Secret> {
    let url = config.ledger.url.as_ref()?.expose();
    let url = match vault::ledger_credentials(w.spec, config) {
        Ok(Some(_)) => vault::without_login(url),
        _ => url.to_owned(),
    };
    Some(url_secret(w, ledger_secret_name(&w.name), &url))
}

/// A Secret `name` of the workload holding `url` under the ledger key.
pub fn url_secret(w: &Workload<'_>, name: String, url: &str) -> Secret {
    Secret {
        metadata: child_meta(w, name),
        // `data`, not `stringData`: the API server keeps only `data`, and the applied object
        // must match the live one for the reconcile to leave it alone.
        data: Some(BTreeMap::from([(
            LEDGER_SECRET_KEY.to_owned(),
            k8s_openapi::ByteString(url.as_bytes().to_vec()),
        )])),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    }
}

/// A short content hash of the configuration without its live parts: a change to the Budget
/// definitions reaches running sidecars without a restart (`soma-proxy`'s live loop); any
/// other change rolls the pods.
pub fn hash_config(settings: &SidecarConfig) -> Result<String, serde_json::Error> {
    let body = serde_json::to_vec(&settings.without_live_part())?;
    Ok(hex::encode(&Sha256::digest(&body)[..8]))
}

/// The strict container security context every Soma container runs with.
pub fn container_security() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

/// The pod security context every Soma pod runs with: non-root, RuntimeDefault seccomp.
pub fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(NON_ROOT_ID),
        run_as_group: Some(NON_ROOT_ID),
        fs_group: Some(NON_ROOT_ID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}

/// A literal environment variable.
pub fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// A variable read from key `key` of Secret `secret`.
pub fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_owned(),
                key: key.to_owned(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// The pod's UID from the downward API: the per-pod credential the agent presents to the
/// sidecar. It is unique per pod and is never a provider key.
fn pod_uid_env(name: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.uid".to_owned(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// Variables Soma sets on the agent container; a user's variable of the same name is dropped.
pub const SOMA_AGENT_ENV: &[&str] = &[
    "SOMA_PROXY_URL",
    "OPENAI_BASE_URL",
    "OPENAI_API_BASE",
    "ANTHROPIC_BASE_URL",
    "SOMA_MODEL",
    "SOMA_PROXY_TOKEN",
];

/// Environment of the agent container: the user's literal variables, then the variables that
/// point OpenAI- and Anthropic-style SDKs at the sidecar, and the per-pod credential
/// (`SOMA_PROXY_TOKEN`) the agent presents to it as its API key.
///
/// Provider key names are dropped even if the CRD's CEL rule was bypassed (an older CRD, a
/// direct write): no provider key ever reaches the agent container.
fn agent_env(spec: &AgentSpec, config: &OperatorConfig) -> Vec<EnvVar> {
    let proxy = format!("http://127.0.0.1:{}", config.sidecar.port);
    let reserved =
        |name: &str| SOMA_AGENT_ENV.contains(&name) || PROVIDER_KEY_ENV_NAMES.contains(&name);
    let mut vars: Vec<EnvVar> = spec
        .env
        .iter()
        .filter(|e| !reserved(&e.name))
        .map(|e| env(&e.name, e.value.clone()))
        .collect();
    vars.extend([
        env("SOMA_PROXY_URL", proxy.clone()),
        env("OPENAI_BASE_URL", format!("{proxy}/v1")),
        env("OPENAI_API_BASE", format!("{proxy}/v1")),
        env("ANTHROPIC_BASE_URL", proxy),
        env("SOMA_MODEL", spec.model.name.clone()),
        pod_uid_env("SOMA_PROXY_TOKEN"),
    ]);
    vars
}

/// A volume mount.
pub fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

/// The sidecar's environment: the per-pod client token, with a ledger Secret its URL, and with
/// an OTLP endpoint the standard OpenTelemetry variables.
fn sidecar_env(w: &Workload<'_>, config: &OperatorConfig) -> Vec<EnvVar> {
    let mut vars = vec![pod_uid_env("SOMA_POD_UID")];
    if config.ledger.url.is_some() {
        vars.push(secret_env(
            DATABASE_URL_ENV,
            &ledger_secret_name(&w.name),
            LEDGER_SECRET_KEY,
        ));
    }
    vars.extend(sidecar_otel_env(w, config));
    vars
}

/// `OTEL_*` for the sidecar when the operator has an OTLP endpoint for sidecars: the endpoint
/// (and protocol), the service name, and resource attributes naming the namespace, the pod
/// (`$(SOMA_POD_NAME)`, expanded by the kubelet from the variable before it) and the agent.
fn sidecar_otel_env(w: &Workload<'_>, config: &OperatorConfig) -> Vec<EnvVar> {
    let Some(endpoint) = &config.sidecar.otlp_endpoint else {
        return Vec::new();
    };
    let mut vars = vec![
        EnvVar {
            name: "SOMA_POD_NAME".to_owned(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".to_owned(),
                    api_version: None,
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
        env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
    ];
    if let Some(protocol) = &config.sidecar.otlp_protocol {
        vars.push(env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.clone()));
    }
    vars.extend([
        env("OTEL_SERVICE_NAME", SIDECAR_NAME.to_owned()),
        // Kubernetes names need no percent-encoding: no `,`, `=` or spaces.
        env(
            "OTEL_RESOURCE_ATTRIBUTES",
            format!(
                "k8s.namespace.name={},k8s.pod.name=$(SOMA_POD_NAME),soma.agent={}",
                w.namespace, w.identity
            ),
        ),
    ]);
    vars
}

/// The metering sidecar: a native sidecar (an init container that keeps running), so it is
/// up before the agent starts and stops after it (for a Job: once the agent container has
/// exited, so the Job completes; the sidecar delivers its outbox as it stops).
fn sidecar_container(w: &Workload<'_>, config: &OperatorConfig) -> Container {
    let mut mounts = vec![
        mount("sidecar-config", SIDECAR_CONFIG_DIR, true),
        mount("sidecar-state", SIDECAR_STATE_DIR, false),
    ];
    if w.spec
        .credentials
        .as_ref()
        .is_some_and(|c| c.secret_ref.is_some())
    {
        mounts.push(mount("provider-key", PROVIDER_KEY_DIR, true));
    }
    mounts.extend(vault::mounts(w.spec, config));
    let health = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("proxy-admin".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(5),
        failure_threshold: Some(3),
        ..Probe::default()
    };
    Container {
        name: SIDECAR_NAME.to_owned(),
        image: Some(config.sidecar.image.clone()),
        args: Some(vec![
            "--config".to_owned(),
            format!("{SIDECAR_CONFIG_DIR}/config.yaml"),
        ]),
        restart_policy: Some("Always".to_owned()),
        env: Some(sidecar_env(w, config)),
        ports: Some(vec![ContainerPort {
            name: Some("proxy-admin".to_owned()),
            container_port: i32::from(config.sidecar.admin_port),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        startup_probe: Some(Probe {
            failure_threshold: Some(30),
            period_seconds: Some(1),
            ..health("/healthz")
        }),
        // Ready only with a provider key the provider has not refused (Vault readable): the
        // pod then stays out of the Service, and the Agent's Ready condition says so.
        readiness_probe: Some(health("/readyz")),
        resources: Some(config.sidecar_resources.clone()),
        security_context: Some(container_security()),
        volume_mounts: Some(mounts),
        ..Container::default()
    }
}

fn agent_container(spec: &AgentSpec, config: &OperatorConfig) -> Container {
    let non_empty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
    Container {
        name: AGENT_CONTAINER.to_owned(),
        image: Some(spec.image.clone()),
        command: non_empty(&spec.command),
        args: non_empty(&spec.args),
        env: Some(agent_env(spec, config)),
        ports: spec.port.map(|p| {
            vec![ContainerPort {
                name: Some("http".to_owned()),
                container_port: p,
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            }]
        }),
        resources: Some(
            spec.sandbox
                .resources
                .clone()
                .unwrap_or_else(|| config.default_agent_resources.clone()),
        ),
        security_context: Some(container_security()),
        volume_mounts: Some(vec![mount("tmp", "/tmp", false)]),
        ..Container::default()
    }
}

fn volumes(w: &Workload<'_>, config: &OperatorConfig) -> Vec<Volume> {
    let mut volumes = vec![
        Volume {
            name: "tmp".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        // The sidecar's outbox: an emptyDir outlives container restarts (a killed sidecar
        // finds its undelivered usage), not the pod.
        Volume {
            name: "sidecar-state".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        Volume {
            name: "sidecar-config".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: sidecar_config_name(&w.name),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    if let Some(secret) = w
        .spec
        .credentials
        .as_ref()
        .and_then(|c| c.secret_ref.as_ref())
    {
        volumes.push(Volume {
            name: "provider-key".to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.name.clone()),
                default_mode: Some(0o400),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    volumes.extend(vault::volumes(w.spec, config));
    volumes
}

/// The pod's annotations: the sidecar configuration's hash, and with
/// `--sidecar-scrape-annotations` the `prometheus.io/*` ones naming the sidecar's metrics.
fn pod_annotations(config_hash: &str, config: &OperatorConfig) -> BTreeMap<String, String> {
    let mut annotations =
        BTreeMap::from([(CONFIG_HASH_ANNOTATION.to_owned(), config_hash.to_owned())]);
    if config.sidecar.scrape_annotations {
        annotations.extend([
            ("prometheus.io/scrape".to_owned(), "true".to_owned()),
            (
                "prometheus.io/port".to_owned(),
                config.sidecar.admin_port.to_string(),
            ),
            ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
        ]);
    }
    annotations
}

/// The pod running the agent and its sidecar under the sandbox defaults, labelled with the
/// workload's labels and the sidecar configuration's hash.
pub fn pod_template(
    w: &Workload<'_>,
    config_hash: &str,
    config: &OperatorConfig,
) -> PodTemplateSpec {
    let spec = w.spec;
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(w.labels.clone()),
            annotations: Some(pod_annotations(config_hash, config)),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(w.name.clone()),
            automount_service_account_token: Some(spec.sandbox.automount_service_account_token),
            enable_service_links: Some(false),
            runtime_class_name: spec.sandbox.runtime_class_name.clone(),
            security_context: Some(pod_security()),
            init_containers: Some(vec![sidecar_container(w, config)]),
            containers: vec![agent_container(spec, config)],
            volumes: Some(volumes(w, config)),
            ..PodSpec::default()
        }),
    }
}

/// A TCP port of a NetworkPolicy rule.
pub fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".to_owned()),
        end_port: None,
    }
}

fn public_internet() -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr: "0.0.0.0/0".to_owned(),
            except: Some(NON_PUBLIC_RANGES.iter().map(|r| (*r).to_owned()).collect()),
        }),
        ..NetworkPolicyPeer::default()
    }
}

/// Port of the provider's endpoint: explicit in the URL, else by scheme.
pub fn upstream_port(url: &str) -> i32 {
    let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
    let authority = rest.split('/').next().unwrap_or_default();
    let explicit = authority
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<i32>().ok());
    explicit.unwrap_or(if scheme == "http" { 80 } else { 443 })
}

fn egress_allow_rule(rule: &EgressRule) -> NetworkPolicyEgressRule {
    let ports: Vec<i32> = if rule.ports.is_empty() {
        vec![443]
    } else {
        rule.ports.iter().map(|p| i32::from(*p)).collect()
    };
    let peer = match &rule.cidr {
        Some(cidr) => NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: cidr.clone(),
                except: None,
            }),
            ..NetworkPolicyPeer::default()
        },
        None => public_internet(),
    };
    NetworkPolicyEgressRule {
        to: Some(vec![peer]),
        ports: Some(ports.into_iter().map(tcp).collect()),
    }
}

/// DNS, on UDP and TCP port 53, to any address.
pub fn dns_egress() -> NetworkPolicyEgressRule {
    NetworkPolicyEgressRule {
        to: None,
        ports: Some(vec![
            NetworkPolicyPort {
                port: Some(IntOrString::Int(53)),
                protocol: Some("UDP".to_owned()),
                end_port: None,
            },
            tcp(53),
        ]),
    }
}

/// Every port of the platform namespaces the operator is given (`--sidecar-egress-namespaces`).
pub fn platform_egress(config: &OperatorConfig) -> Option<NetworkPolicyEgressRule> {
    if config.sidecar.egress_namespaces.is_empty() {
        return None;
    }
    Some(NetworkPolicyEgressRule {
        to: Some(vec![NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "kubernetes.io/metadata.name".to_owned(),
                    operator: "In".to_owned(),
                    values: Some(config.sidecar.egress_namespaces.clone()),
                }]),
            }),
            ..NetworkPolicyPeer::default()
        }]),
        ports: None,
    })
}

/// Default-deny egress for the workload's pods except DNS, the model provider, the spec's
/// allow-list and the operator's `egress_namespaces` (the ledger, NATS and collector the
/// sidecar reports to); ingress only to the agent's port and the sidecar's metrics port (from
/// the operator's `metrics_namespaces` when it names them).
///
/// NetworkPolicy is L3/L4, so a destination known only by host name (the public provider API,
/// a `host` rule) is opened on its ports to public addresses, never to the cluster's private
/// ranges or the metadata endpoint. A custom provider endpoint may live in the cluster, so its
/// port is opened to any address.
pub fn network_policy(w: &Workload<'_>, config: &OperatorConfig) -> NetworkPolicy {
    let spec = w.spec;
    let upstream = upstream_url(spec);
    let provider_peer = if spec.model.endpoint.is_some() {
        NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: "0.0.0.0/0".to_owned(),
                except: None,
            }),
            ..NetworkPolicyPeer::default()
        }
    } else {
        public_internet()
    };
    let provider = NetworkPolicyEgressRule {
        to: Some(vec![provider_peer]),
        ports: Some(vec![tcp(upstream_port(&upstream))]),
    };
    let mut egress = vec![dns_egress(), provider];
    egress.extend(spec.sandbox.egress.iter().map(egress_allow_rule));
    egress.extend(platform_egress(config));

    // The agent's port is open to any pod (it is the agent's service); the sidecar's metrics
    // port only to the metrics namespaces when the operator names them.
    let metrics_from = (!config.sidecar.metrics_namespaces.is_empty()).then(|| {
        vec![NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "kubernetes.io/metadata.name".to_owned(),
                    operator: "In".to_owned(),
                    values: Some(config.sidecar.metrics_namespaces.clone()),
                }]),
            }),
            ..NetworkPolicyPeer::default()
        }]
    });
    let metrics_port = tcp(i32::from(config.sidecar.admin_port));
    let ingress = match (spec.port, metrics_from) {
        (Some(port), None) => vec![NetworkPolicyIngressRule {
            from: None,
            ports: Some(vec![tcp(port), metrics_port]),
        }],
        (None, None) => vec![NetworkPolicyIngressRule {
            from: None,
            ports: Some(vec![metrics_port]),
        }],
        (port, Some(from)) => port
            .map(|p| NetworkPolicyIngressRule {
                from: None,
                ports: Some(vec![tcp(p)]),
            })
            .into_iter()
            .chain([NetworkPolicyIngressRule {
                from: Some(from),
                ports: Some(vec![metrics_port]),
            }])
            .collect(),
    };
    NetworkPolicy {
        metadata: child_meta(w, w.name.clone()),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(w.selector.clone()),
                match_expressions: None,
            }),
            policy_types: Some(vec!["Ingress".to_owned(), "Egress".to_owned()]),
            egress: Some(egress),
            ingress: Some(ingress),
        }),
    }
}

/// Makes the agent container of `template` run `image` (the verified `repo@digest`), so a tag
/// moved after verification cannot swap in other content.
pub fn pin_image(template: &mut PodTemplateSpec, image: &str) {
    let containers = template.spec.as_mut().map(|p| p.containers.iter_mut());
    for c in containers
        .into_iter()
        .flatten()
        .filter(|c| c.name == AGENT_CONTAINER)
    {
        c.image = Some(image.to_owned());
    }
}
