//! Builds an Agent's children: pure functions from the Agent (and the operator's
//! configuration) to the objects the controller applies. Nothing here calls the API. The
//! pod, the sidecar's configuration, the ServiceAccount, the ledger Secret and the
//! NetworkPolicy come from the shared workload builder ([`crate::workload`]), which the Job
//! controller uses too; what is the Agent's own is the Deployment and the Service.
//!
//! ```text
//!             ┌──────────────── Pod (Deployment <agent>) ─────────────────┐
//!  Service ──▶│ agent container ──http://127.0.0.1:4000──▶ soma-proxy     │──▶ provider
//!  <agent>    │  (no provider key)                         (native sidecar,│   (key injected
//!             │                                             holds the key) │    by the sidecar)
//!             └────────────────────────────────────────────────────────────┘
//!  NetworkPolicy <agent>: egress only DNS, the provider and the allow-list.
//!  ConfigMap <agent>-sidecar: the sidecar's configuration.  ServiceAccount <agent>.
//! ```

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, Secret, Service, ServiceAccount, ServicePort, ServiceSpec,
};
#[cfg(test)]
use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use soma_contract::SidecarConfig;
use soma_crds::agent::Agent;
// The table tests (`tests.rs`) see what this module sees.
#[cfg(test)]
use soma_crds::agent::{EgressRule, PROVIDER_KEY_ENV_NAMES, Provider};

use crate::capsule::delivery;
use crate::config::OperatorConfig;
use crate::workload::{self, Workload, child_meta, hash_config};
pub use crate::workload::{
    AGENT_CONTAINER, CONFIG_HASH_ANNOTATION, NON_ROOT_ID, PROVIDER_KEY_DIR, SIDECAR_CONFIG_DIR,
    SIDECAR_NAME, SIDECAR_STATE_DIR, ledger_secret_name, sidecar_config_name, upstream_port,
    upstream_url,
};

/// Field manager for everything the Agent controller applies.
pub const FIELD_MANAGER: &str = "soma.dev/agent";
/// Label naming the Agent a child belongs to; used to find children.
pub const AGENT_LABEL: &str = "soma.dev/agent";

/// Every child of one Agent, as the controller applies them.
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    /// The pod identity; its token is not mounted unless the Agent asks.
    pub service_account: ServiceAccount,
    /// The ledger's URL for the sidecar; only when the operator has a ledger.
    pub ledger_secret: Option<Secret>,
    /// The sidecar's configuration.
    pub sidecar_config: ConfigMap,
    /// The agent pods.
    pub deployment: Deployment,
    /// Exposes the agent's port; only when the Agent has one.
    pub service: Option<Service>,
    /// Default-deny egress except DNS, the provider and the allow-list.
    pub network_policy: NetworkPolicy,
}

/// What the reconcile resolved for an Agent before building its children.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolved {
    /// Pods the Deployment should run.
    pub replicas: i32,
    /// The Agent's Budget followed by its `parentRef` chain, as the sidecar enforces them.
    pub budgets: Vec<soma_metering::BudgetDef>,
    /// The verified Capsules to deliver into the pods (`crate::capsule::delivery`).
    pub capsules: Vec<crate::capsule::delivery::Delivery>,
    /// The brown-out the scaling loop decided, and its revision (a live part of the sidecar's
    /// configuration: a change does not roll the pods).
    pub brown_out: Option<soma_contract::load::BrownOut>,
    /// The revision of that decision (0: none made).
    pub brown_out_revision: i64,
}

/// The Agent as a workload: its children are named after it and owned by it, and its sidecar
/// records usage under its name.
pub fn workload(agent: &Agent) -> Workload<'_> {
    Workload {
        spec: &agent.spec,
        namespace: agent.namespace().unwrap_or_default(),
        name: agent.name_any(),
        identity: agent.name_any(),
        budget_ref: agent.spec.budget_ref.as_ref(),
        labels: labels(agent),
        selector: selector_labels(agent),
        owner: agent.controller_owner_ref(&()),
    }
}

/// Builds every child of `agent`.
pub fn children(
    agent: &Agent,
    resolved: &Resolved,
    config: &OperatorConfig,
) -> Result<Children, serde_json::Error> {
    let w = workload(agent);
    let mut settings = workload::sidecar_config(&w, &resolved.budgets, config);
    delivery::sidecar_capsules(&mut settings, &resolved.capsules, config);
    settings.brown_out.clone_from(&resolved.brown_out);
    settings.brown_out_revision = resolved.brown_out_revision;
    let config_hash = hash_config(&settings)?;
    let mut deployment = deployment(agent, resolved.replicas, &config_hash, config);
    if let Some(spec) = deployment.spec.as_mut() {
        delivery::deliver(&mut spec.template, &resolved.capsules, config);
    }
    let mut network_policy = workload::network_policy(&w, config);
    delivery::capsule_egress(&mut network_policy, &resolved.capsules, config);
    Ok(Children {
        service_account: workload::service_account(&w),
        ledger_secret: workload::ledger_secret(&w, config),
        deployment,
        service: service(agent, config),
        network_policy,
        sidecar_config: workload::sidecar_config_map(&w, &settings, config)?,
    })
}

/// Makes the agent container run `image` (the verified `repo@digest`), so a tag moved after
/// verification cannot swap in other content.
pub fn pin_agent_image(deployment: &mut Deployment, image: &str) {
    if let Some(template) = deployment.spec.as_mut().map(|s| &mut s.template) {
        workload::pin_image(template, image);
    }
}

/// Labels on every child and on the pods.
pub fn labels(agent: &Agent) -> BTreeMap<String, String> {
    let name = agent.name_any();
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "soma-agent".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), name.clone()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "soma-operator".to_owned(),
        ),
        (AGENT_LABEL.to_owned(), name),
    ])
}

/// The labels that select an Agent's pods (stable across versions: selectors are immutable).
fn selector_labels(agent: &Agent) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "soma-agent".to_owned()),
        (AGENT_LABEL.to_owned(), agent.name_any()),
    ])
}

/// The ServiceAccount the pods run as.
pub fn service_account(agent: &Agent) -> ServiceAccount {
    workload::service_account(&workload(agent))
}

/// The sidecar's configuration (the contract type the `soma-proxy` binary reads).
pub fn sidecar_config(
    agent: &Agent,
    resolved: &Resolved,
    config: &OperatorConfig,
) -> SidecarConfig {
    let mut settings = workload::sidecar_config(&workload(agent), &resolved.budgets, config);
    delivery::sidecar_capsules(&mut settings, &resolved.capsules, config);
    settings
}

/// The ConfigMap holding the sidecar's configuration as JSON (valid YAML too).
pub fn sidecar_config_map(
    agent: &Agent,
    settings: &SidecarConfig,
    config: &OperatorConfig,
) -> Result<ConfigMap, serde_json::Error> {
    workload::sidecar_config_map(&workload(agent), settings, config)
}

/// The Secret giving the sidecar the ledger's URL, when the operator has a ledger.
pub fn ledger_secret(agent: &Agent, config: &OperatorConfig) -> Option<Secret> {
    workload::ledger_secret(&workload(agent), config)
}

/// The Deployment running the agent and its sidecar under the sandbox defaults.
pub fn deployment(
    agent: &Agent,
    replicas: i32,
    config_hash: &str,
    config: &OperatorConfig,
) -> Deployment {
    let w = workload(agent);
    Deployment {
        metadata: child_meta(&w, agent.name_any()),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(agent)),
                match_expressions: None,
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            template: workload::pod_template(&w, config_hash, config),
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// The Service exposing the agent's port and the sidecar's metrics, when the agent has a port.
pub fn service(agent: &Agent, config: &OperatorConfig) -> Option<Service> {
    let port = agent.spec.port?;
    Some(Service {
        metadata: child_meta(&workload(agent), agent.name_any()),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(agent)),
            ports: Some(vec![
                ServicePort {
                    name: Some("http".to_owned()),
                    port: 80,
                    target_port: Some(IntOrString::Int(port)),
                    protocol: Some("TCP".to_owned()),
                    ..ServicePort::default()
                },
                ServicePort {
                    name: Some("proxy-metrics".to_owned()),
                    port: i32::from(config.sidecar.admin_port),
                    target_port: Some(IntOrString::String("proxy-admin".to_owned())),
                    protocol: Some("TCP".to_owned()),
                    ..ServicePort::default()
                },
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// Default-deny egress for the Agent's pods except DNS, the model provider, the Agent's
/// allow-list and the operator's platform namespaces (see [`workload::network_policy`]).
pub fn network_policy(agent: &Agent, config: &OperatorConfig) -> NetworkPolicy {
    workload::network_policy(&workload(agent), config)
}

#[cfg(test)]
mod tests;
