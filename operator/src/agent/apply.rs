//! Brings the cluster in line with an Agent's desired children: apply what differs with
//! server-side apply under `soma.dev/agent` (the shared [`crate::apply`]), delete what is no
//! longer desired.

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::children::{Children, FIELD_MANAGER};
use crate::apply::{delete_by_name, ensure, ensure_from};
use crate::error::{Error, Result};

pub use crate::apply::APPLIED_HASH_ANNOTATION;

/// What applying changed.
#[derive(Debug, Default)]
pub struct Applied {
    /// The live Deployment after the apply.
    pub deployment: Option<k8s_openapi::api::apps::v1::Deployment>,
    /// Number of objects written or deleted.
    pub writes: usize,
}

/// Deletes the child `name` of kind `K` if it exists and is controlled by the owner `uid`.
async fn remove<K>(client: &Client, namespace: &str, name: &str, owner_uid: &str) -> Result<bool>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let live = api.get_opt(name).await.map_err(|source| Error::Read {
        what: format!("{} {namespace}/{name}", K::kind(&())),
        source,
    })?;
    let ours = live.is_some_and(|o| {
        o.owner_references()
            .iter()
            .any(|r| r.controller == Some(true) && r.uid == owner_uid)
    });
    if !ours {
        return Ok(false);
    }
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(source) => Err(Error::Delete {
            kind: <K as k8s_openapi::Resource>::KIND,
            name: name.to_owned(),
            source,
        }),
    }
}

/// Whether the Deployment's pods read Secret `secret` into their environment.
fn reads_secret(d: &k8s_openapi::api::apps::v1::Deployment, secret: &str) -> bool {
    let pod = d.spec.as_ref().and_then(|s| s.template.spec.as_ref());
    pod.into_iter()
        .flat_map(|p| {
            p.init_containers
                .iter()
                .flatten()
                .chain(p.containers.iter())
        })
        .flat_map(|c| c.env.iter().flatten())
        .filter_map(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
        .any(|r| r.name == secret)
}

/// Applies every desired child in dependency order (identity and configuration before the
/// pods that use them) and deletes the Service when the Agent no longer has a port.
pub async fn apply_children(
    client: &Client,
    children: &Children,
    owner_uid: &str,
) -> Result<Applied> {
    let mut writes = 0;
    let mut count = |wrote: bool| writes += usize::from(wrote);
    count(
        ensure(client, &children.service_account, FIELD_MANAGER)
            .await?
            .1,
    );
    let namespace = children
        .deployment
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = children.deployment.name_any();
    if let Some(secret) = &children.ledger_secret {
        count(ensure(client, secret, FIELD_MANAGER).await?.1);
    }
    count(
        ensure(client, &children.sidecar_config, FIELD_MANAGER)
            .await?
            .1,
    );
    count(
        ensure(client, &children.network_policy, FIELD_MANAGER)
            .await?
            .1,
    );
    let (before, deployment, wrote) =
        ensure_from(client, &children.deployment, FIELD_MANAGER).await?;
    count(wrote);
    // The ledger was turned off: the pods no longer read its Secret, which is removed. (Only
    // then: an operator without a ledger never reads Secrets.)
    let ledger_secret = super::children::ledger_secret_name(&name);
    if children.ledger_secret.is_none()
        && before
            .as_ref()
            .is_some_and(|d| reads_secret(d, &ledger_secret))
    {
        count(
            delete_by_name::<k8s_openapi::api::core::v1::Secret>(
                client,
                &namespace,
                &ledger_secret,
            )
            .await?,
        );
    }
    match &children.service {
        Some(service) => count(ensure(client, service, FIELD_MANAGER).await?.1),
        None => {
            count(
                remove::<k8s_openapi::api::core::v1::Service>(client, &namespace, &name, owner_uid)
                    .await?,
            );
        }
    }
    Ok(Applied {
        deployment: Some(deployment),
        writes,
    })
}
