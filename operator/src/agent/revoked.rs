//! Revocations reach the running pods of an Agent held back by a Capsule, through the
//! sidecar's ConfigMap (`crate::workload::revoked`, shared with the Job controller). Works
//! with or without a ledger (with one, the ledger's notification is faster).
//!
//! ```text
//!  Agent not runnable ─► standings of its Capsules (same namespace: spec.capsules are local)
//!    ─► any revoked? ─► live ConfigMap <agent>-sidecar, controlled by this Agent
//!    ─► workload::revoked::write under soma.dev/agent
//! ```

use kube::{Client, ResourceExt};
use soma_crds::Agent;

use super::children::{FIELD_MANAGER, workload};
use crate::capsule::revocation::Standing;
use crate::config::OperatorConfig;
use crate::error::Result;
use crate::workload::revoked::{any_revoked, running_config, write};
use crate::workload::{child_meta, sidecar_config_name};

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
    if !any_revoked(standings) {
        return Ok(Vec::new());
    }
    let w = workload(agent);
    let name = sidecar_config_name(&w.name);
    let Some(settings) =
        running_config(client, &w.namespace, &name, agent.uid().as_deref()).await?
    else {
        return Ok(Vec::new());
    };
    write(
        client,
        child_meta(&w, name),
        settings,
        standings,
        config,
        FIELD_MANAGER,
    )
    .await
}
