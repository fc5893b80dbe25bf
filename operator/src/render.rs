//! `soma-operator render`: the children the operator would apply for the Agents in a
//! manifest, as YAML, built by the same pure builders the controller uses (no cluster).
//! Users review the output in GitOps pull requests and diff it between versions.

use serde::Deserialize;
use soma_crds::Agent;

use crate::agent::children::children;
use crate::agent::reconcile::desired_replicas;
use crate::config::OperatorConfig;

/// Why a manifest could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The input is not YAML.
    #[error("document {index}: not valid YAML: {source}")]
    Yaml {
        /// 1-based document number.
        index: usize,
        /// Parser error.
        #[source]
        source: serde_yaml::Error,
    },
    /// A document of kind Agent does not match the Agent schema.
    #[error("document {index} (Agent {name:?}): {source}")]
    Agent {
        /// 1-based document number.
        index: usize,
        /// The Agent's name, if readable.
        name: String,
        /// Deserialisation error.
        #[source]
        source: serde_json::Error,
    },
    /// The input holds no Agent.
    #[error("no Agent (apiVersion soma.dev/v1alpha1, kind Agent) found in the input")]
    NoAgent,
    /// Serialising a child failed.
    #[error("serialising the output failed: {0}")]
    Output(String),
}

/// Renders every Agent in `manifest` (multi-document YAML; other kinds are skipped) into the
/// YAML stream of its children.
pub fn render(manifest: &str, config: &OperatorConfig) -> Result<String, RenderError> {
    let mut out = String::new();
    let mut found = false;
    for (i, doc) in serde_yaml::Deserializer::from_str(manifest).enumerate() {
        let index = i + 1;
        let value = serde_json::Value::deserialize(doc)
            .map_err(|source| RenderError::Yaml { index, source })?;
        if value.is_null() || value["kind"] != "Agent" || value["apiVersion"] != "soma.dev/v1alpha1"
        {
            continue;
        }
        let name = value["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let mut agent: Agent =
            serde_json::from_value(value).map_err(|source| RenderError::Agent {
                index,
                name: name.clone(),
                source,
            })?;
        if agent.metadata.namespace.is_none() {
            agent.metadata.namespace = Some("default".to_owned());
        }
        found = true;
        let c = children(&agent, desired_replicas(&agent), config)
            .map_err(|e| RenderError::Output(e.to_string()))?;
        out.push_str(&format!(
            "# Children of Agent {}/{} (ownerReferences are added in the cluster, where the Agent has a uid)\n",
            agent.metadata.namespace.as_deref().unwrap_or_default(),
            name
        ));
        let mut docs: Vec<String> = Vec::new();
        let mut push = |v: Result<String, serde_yaml::Error>| -> Result<(), RenderError> {
            docs.push(v.map_err(|e| RenderError::Output(e.to_string()))?);
            Ok(())
        };
        push(yaml("v1", "ServiceAccount", &c.service_account))?;
        push(yaml("v1", "ConfigMap", &c.sidecar_config))?;
        push(yaml(
            "networking.k8s.io/v1",
            "NetworkPolicy",
            &c.network_policy,
        ))?;
        push(yaml("apps/v1", "Deployment", &c.deployment))?;
        if let Some(service) = &c.service {
            push(yaml("v1", "Service", service))?;
        }
        for d in docs {
            out.push_str("---\n");
            out.push_str(&d);
        }
    }
    if found {
        Ok(out)
    } else {
        Err(RenderError::NoAgent)
    }
}

/// One object as YAML with its `apiVersion` and `kind` first.
fn yaml<T: serde::Serialize>(
    api_version: &str,
    kind: &str,
    object: &T,
) -> Result<String, serde_yaml::Error> {
    let mut map = serde_yaml::Mapping::new();
    map.insert("apiVersion".into(), api_version.into());
    map.insert("kind".into(), kind.into());
    if let serde_yaml::Value::Mapping(fields) = serde_yaml::to_value(object)? {
        for (k, v) in fields {
            if k.as_str() != Some("apiVersion") && k.as_str() != Some("kind") {
                map.insert(k, v);
            }
        }
    }
    serde_yaml::to_string(&map)
}
