//! Revocations reach the running pods of an Agent held back by a Capsule, through the one
//! child that may still change then: the sidecar's ConfigMap, whose `revokedCapsules` is a
//! live part of the sidecar's configuration (left out of the pod template's hash, so the
//! pods are not rolled and nothing new starts). The sidecar follows its file (the kubelet
//! refreshes the ConfigMap volume within about a minute), refuses the Capsule in recall and
//! moves its folder out of the agent container's view. Works with or without a ledger (with
//! one, the ledger's notification is faster).
//!
//! ```text
//!  Agent not runnable ─► standings of its Capsules (same namespace: spec.capsules are local)
//!    ─► live ConfigMap <agent>-sidecar, controlled by this Agent ─► revoked_list (pure)
//!    ─► changed? apply it under soma.dev/agent, the rest of the configuration as it was
//! ```

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::{Client, ResourceExt};
use soma_contract::SidecarConfig;
use soma_crds::Agent;

use super::children::{FIELD_MANAGER, sidecar_config_map, sidecar_config_name};
use crate::capsule::revocation::{Standing, revoked_list};
use crate::config::OperatorConfig;
use crate::error::{Error, Result};

/// The key of the sidecar's configuration in its ConfigMap.
const CONFIG_KEY: &str = "config.yaml";

/// Writes the standings of the Agent's Capsules into its running pods' sidecar ConfigMap;
/// returns the names revoked there now. Only when one of them is revoked (nothing is read
/// otherwise: an entry of a Capsule since verified again goes when the Agent next runs, or
/// with the next revocation). Nothing is written when the ConfigMap does not exist (no pod
/// was ever started), is not this Agent's, or already says the same.
pub async fn publish(
    client: &Client,
    agent: &Agent,
    config: &OperatorConfig,
    standings: &[(String, Standing)],
) -> Result<Vec<String>> {
    if !standings
        .iter()
        .any(|(_, s)| matches!(s, Standing::Revoked(_)))
    {
        return Ok(Vec::new());
    }
    let namespace = agent.namespace().unwrap_or_default();
    let name = sidecar_config_name(&agent.name_any());
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let live = api.get_opt(&name).await.map_err(|source| Error::Read {
        what: format!("ConfigMap {namespace}/{name}"),
        source,
    })?;
    let Some(live) = live else {
        return Ok(Vec::new());
    };
    let ours = agent.uid().is_some_and(|uid| {
        live.owner_references()
            .iter()
            .any(|r| r.controller == Some(true) && r.uid == uid)
    });
    let text = live.data.as_ref().and_then(|d| d.get(CONFIG_KEY));
    let (true, Some(text)) = (ours, text) else {
        return Ok(Vec::new());
    };
    let mut settings: SidecarConfig =
        serde_json::from_str(text).map_err(|source| Error::Serialize {
            what: "the sidecar's configuration read back from its ConfigMap",
            source,
        })?;
    let next = revoked_list(&settings.revoked_capsules, standings);
    let names = next.iter().map(|r| r.name.clone()).collect();
    if next == settings.revoked_capsules {
        return Ok(names);
    }
    settings.revoked_capsules = next;
    let desired =
        sidecar_config_map(agent, &settings, config).map_err(|source| Error::Serialize {
            what: "the sidecar's configuration",
            source,
        })?;
    // Under the Agent's field manager, like every child (the applied-hash annotation is
    // dropped: the next full apply, once the Agent may run, writes the ConfigMap again).
    crate::apply::apply(client, &desired, FIELD_MANAGER).await?;
    tracing::info!(configmap = %name, revoked = ?settings.revoked_capsules.iter().map(|r| &r.name).collect::<Vec<_>>(), "Capsule revocations written to the running pods' sidecar configuration");
    Ok(names)
}
