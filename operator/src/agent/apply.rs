//! Brings the cluster in line with the desired children: apply what differs with
//! server-side apply, delete what is no longer desired. A child is left alone when its live
//! object carries the hash of exactly this desired object (so a field removed from the
//! desired object is noticed) and still holds every desired field (so an edit by someone else
//! is undone): a reconcile that finds nothing to change makes no write at all.

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::children::{Children, FIELD_MANAGER};
use crate::error::{Error, Result};

/// What applying changed.
#[derive(Debug, Default)]
pub struct Applied {
    /// The live Deployment after the apply.
    pub deployment: Option<k8s_openapi::api::apps::v1::Deployment>,
    /// Number of objects written or deleted.
    pub writes: usize,
}

/// Annotation on every child: hash of the desired object last applied.
pub const APPLIED_HASH_ANNOTATION: &str = "soma.dev/applied-hash";

/// A short hash of an object's JSON (keys are sorted, so equal objects hash equally).
fn spec_hash<K: Serialize>(object: &K) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = serde_json::to_vec(object).map_err(|source| Error::Serialize {
        what: "child",
        source,
    })?;
    Ok(hex::encode(&Sha256::digest(&bytes)[..8]))
}

/// Whether every field set in `desired` is present with the same value in `live`. Fields the
/// API server adds (defaults, status, managedFields) are ignored; lists must match item by item.
pub fn contains(live: &Value, desired: &Value) -> bool {
    match (live, desired) {
        (Value::Object(l), Value::Object(d)) => d
            .iter()
            .all(|(k, dv)| l.get(k).is_some_and(|lv| contains(lv, dv))),
        (Value::Array(l), Value::Array(d)) => {
            l.len() == d.len() && l.iter().zip(d).all(|(lv, dv)| contains(lv, dv))
        }
        _ => live == desired,
    }
}

/// Applies one child unless it is already as desired; returns the live object and whether
/// it wrote.
async fn ensure<K>(client: &Client, desired: &K) -> Result<(K, bool)>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let (_, live, wrote) = ensure_from(client, desired).await?;
    Ok((live, wrote))
}

/// [`ensure`], also returning the object as it was before (if it existed).
async fn ensure_from<K>(client: &Client, desired: &K) -> Result<(Option<K>, K, bool)>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let name = desired.name_any();
    let namespace = desired
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<K> = Api::namespaced(client.clone(), &namespace);
    let kind = K::kind(&()).into_owned();
    let live = api.get_opt(&name).await.map_err(|source| Error::Read {
        what: format!("{kind} {namespace}/{name}"),
        source,
    })?;
    let mut desired = desired.clone();
    let hash = spec_hash(&desired)?;
    desired
        .annotations_mut()
        .insert(APPLIED_HASH_ANNOTATION.to_owned(), hash.clone());
    let want = serde_json::to_value(&desired).map_err(|source| Error::Serialize {
        what: "child",
        source,
    })?;
    if let Some(live) = live.clone() {
        let have = serde_json::to_value(&live).map_err(|source| Error::Serialize {
            what: "child",
            source,
        })?;
        if live.annotations().get(APPLIED_HASH_ANNOTATION) == Some(&hash) && contains(&have, &want)
        {
            return Ok((Some(live.clone()), live, false));
        }
    }
    // Soma alone owns its children, so it takes conflicting fields back (force).
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let applied = api
        .patch(&name, &params, &Patch::Apply(&desired))
        .await
        .map_err(|source| Error::Apply {
            kind: <K as k8s_openapi::Resource>::KIND,
            name: name.clone(),
            source,
        })?;
    Ok((live, applied, true))
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

/// Deletes `name` of kind `K` (gone already is fine).
async fn delete_by_name<K>(client: &Client, namespace: &str, name: &str) -> Result<bool>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
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

/// Applies every desired child in dependency order (identity and configuration before the
/// pods that use them) and deletes the Service when the Agent no longer has a port.
pub async fn apply_children(
    client: &Client,
    children: &Children,
    owner_uid: &str,
) -> Result<Applied> {
    let mut writes = 0;
    let mut count = |wrote: bool| writes += usize::from(wrote);
    count(ensure(client, &children.service_account).await?.1);
    let namespace = children
        .deployment
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = children.deployment.name_any();
    if let Some(secret) = &children.ledger_secret {
        count(ensure(client, secret).await?.1);
    }
    count(ensure(client, &children.sidecar_config).await?.1);
    count(ensure(client, &children.network_policy).await?.1);
    let (before, deployment, wrote) = ensure_from(client, &children.deployment).await?;
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
        Some(service) => count(ensure(client, service).await?.1),
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

#[cfg(test)]
mod tests {
    use super::contains;
    use serde_json::json;

    #[test]
    fn contains_ignores_server_added_fields_but_not_changes() {
        let live = json!({"metadata": {"name": "a", "uid": "u", "labels": {"x": "1", "y": "2"}}, "spec": {"replicas": 2, "ports": [{"port": 80, "protocol": "TCP"}]}, "status": {}});
        assert!(contains(
            &live,
            &json!({"metadata": {"name": "a", "labels": {"x": "1"}}, "spec": {"ports": [{"port": 80}]}})
        ));
        assert!(
            !contains(&live, &json!({"spec": {"replicas": 3}})),
            "changed value"
        );
        assert!(
            !contains(
                &live,
                &json!({"spec": {"ports": [{"port": 80}, {"port": 81}]}})
            ),
            "added list item"
        );
        assert!(
            !contains(&live, &json!({"spec": {"ports": []}})),
            "removed list item"
        );
        assert!(
            !contains(&live, &json!({"spec": {"paused": true}})),
            "missing field"
        );
    }
}
