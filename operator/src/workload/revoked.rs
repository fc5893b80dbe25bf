//! Revocations written into a running workload's sidecar ConfigMap: the one child that may
//! still change while an Agent is held back or a Job runs. Its `revokedCapsules` is a live
//! part of the sidecar's configuration (left out of the pod template's hash, so the pods are
//! not rolled and nothing new starts); the sidecar follows its file (the kubelet refreshes the
//! ConfigMap volume within about a minute), refuses the Capsule in recall and moves its folder
//! out of the agent container's view. Used by the Agent ([`crate::agent::revoked`]) and the
//! Job ([`crate::job::revoked`]) controllers alike.
//!
//! ```text
//!  running_config: live ConfigMap <workload>-sidecar, controlled by the owner ─► SidecarConfig
//!  write: standings ─► revoked_list (pure) ─► changed? apply it under the controller's
//!         field manager, the rest of the configuration as it was
//! ```

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::Api;
use soma_contract::SidecarConfig;

use super::sidecar_config_map_with;
use crate::capsule::revocation::{Standing, revoked_list};
use crate::config::OperatorConfig;
use crate::error::{Error, Result};

/// The key of the sidecar's configuration in its ConfigMap.
const CONFIG_KEY: &str = "config.yaml";

/// Whether any of `standings` is a revocation.
pub fn any_revoked(standings: &[(String, Standing)]) -> bool {
    standings
        .iter()
        .any(|(_, s)| matches!(s, Standing::Revoked(_)))
}

/// The configuration the running pods were given: ConfigMap `name`'s, when it exists and is
/// controlled by `owner_uid` (nothing is read into another's ConfigMap).
pub async fn running_config(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    owner_uid: Option<&str>,
) -> Result<Option<SidecarConfig>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let live = api.get_opt(name).await.map_err(|source| Error::Read {
        what: format!("ConfigMap {namespace}/{name}"),
        source,
    })?;
    let Some(live) = live else {
        return Ok(None);
    };
    let ours = owner_uid.is_some_and(|uid| {
        live.owner_references()
            .iter()
            .any(|r| r.controller == Some(true) && r.uid == uid)
    });
    let text = live.data.as_ref().and_then(|d| d.get(CONFIG_KEY));
    let (true, Some(text)) = (ours, text) else {
        return Ok(None);
    };
    let settings = serde_json::from_str(text).map_err(|source| Error::Serialize {
        what: "the sidecar's configuration read back from its ConfigMap",
        source,
    })?;
    Ok(Some(settings))
}

/// Writes the standings into `settings.revokedCapsules` and applies the ConfigMap (`meta`:
/// the same name, namespace, labels and owner as the controller's full apply) under
/// `field_manager`, unless it already says the same; returns the names revoked there now.
pub async fn write(
    client: &kube::Client,
    meta: ObjectMeta,
    mut settings: SidecarConfig,
    standings: &[(String, Standing)],
    config: &OperatorConfig,
    field_manager: &str,
) -> Result<Vec<String>> {
    let next = revoked_list(&settings.revoked_capsules, standings);
    let names = next.iter().map(|r| r.name.clone()).collect();
    if next == settings.revoked_capsules {
        return Ok(names);
    }
    settings.revoked_capsules = next;
    let desired =
        sidecar_config_map_with(meta, &settings, config).map_err(|source| Error::Serialize {
            what: "the sidecar's configuration",
            source,
        })?;
    // The applied-hash annotation is dropped: the next full apply writes the ConfigMap again.
    crate::apply::apply(client, &desired, field_manager).await?;
    tracing::info!(configmap = %desired.name_any(), revoked = ?settings.revoked_capsules.iter().map(|r| &r.name).collect::<Vec<_>>(), "Capsule revocations written to the running pods' sidecar configuration");
    Ok(names)
}
