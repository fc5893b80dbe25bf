//! Revocations reach a running Job's pods the way they reach an Agent's
//! (`crate::workload::revoked`): the Capsules its pods hold are read from the sidecar
//! ConfigMap they were started with, looked up, and a revoked one is written into that
//! ConfigMap's `revokedCapsules`: the sidecar refuses recall from it (410) and withdraws its
//! folder from the agent container. The run itself is not stopped or restarted. Unlike an
//! Agent's, a Job's ConfigMap is never applied again after the run starts, so a lifted
//! revocation is written here too (the entry removed once the Capsule is usable again).
//!
//! ```text
//!  Job running ─► live ConfigMap sjob-<job>-sidecar, controlled by this Job ─► its capsules
//!    ─► capsule_refs ─► standings ─► workload::revoked::write under soma.dev/job (if changed)
//! ```

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Client, Resource, ResourceExt};
use soma_crds::Job;
use soma_crds::common::LocalRef;

use super::children::{FIELD_MANAGER, labels, workload_name};
use crate::capsule::refs::capsule_refs;
use crate::config::OperatorConfig;
use crate::error::Result;
use crate::workload::revoked::{running_config, write};
use crate::workload::sidecar_config_name;

/// Writes the standings of the Capsules a running Job's pods hold into their sidecar
/// ConfigMap; returns the names revoked there now. Nothing is written when the ConfigMap does
/// not exist, is not this Job's, lists no Capsule, or already says the same.
pub async fn publish(
    client: &Client,
    job: &Job,
    namespace: &str,
    config: &OperatorConfig,
) -> Result<Vec<String>> {
    let name = sidecar_config_name(&workload_name(&job.name_any()));
    let Some(settings) = running_config(client, namespace, &name, job.uid().as_deref()).await?
    else {
        return Ok(Vec::new());
    };
    let held: Vec<LocalRef> = settings
        .capsules
        .iter()
        .map(|c| LocalRef {
            name: c.name.clone(),
        })
        .collect();
    if held.is_empty() {
        return Ok(Vec::new());
    }
    let standings: Vec<_> = capsule_refs(client, namespace, &held)
        .await?
        .into_iter()
        .map(|(n, r)| (n, r.standing()))
        .collect();
    // The metadata of the Job's full apply (`task_children`), so the apply keeps its fields.
    let meta = ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels(job, "soma-job")),
        owner_references: job.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    };
    write(client, meta, settings, &standings, config, FIELD_MANAGER).await
}
