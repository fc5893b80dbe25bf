//! Server-side apply of owned children, shared by every controller: a child is left alone
//! when its live object carries the hash of exactly this desired object (so a field removed
//! from the desired object is noticed) and still holds every desired field (so an edit by
//! someone else is undone); otherwise it is applied under the controller's field manager,
//! forcing conflicts, because Soma alone owns its children. A reconcile that finds nothing to
//! change makes no write at all.

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Result};

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

/// Applies one child under `manager` unless it is already as desired; returns the live
/// object and whether it wrote.
pub async fn ensure<K>(client: &Client, desired: &K, manager: &str) -> Result<(K, bool)>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let (_, live, wrote) = ensure_from(client, desired, manager).await?;
    Ok((live, wrote))
}

/// [`ensure`], also returning the object as it was before (if it existed).
pub async fn ensure_from<K>(
    client: &Client,
    desired: &K,
    manager: &str,
) -> Result<(Option<K>, K, bool)>
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
    let applied = apply(client, &desired, manager).await?;
    Ok((live, applied, true))
}

/// Writes `desired` by server-side apply under `manager`, taking conflicting fields back
/// (force): Soma alone owns its children.
pub async fn apply<K>(client: &Client, desired: &K, manager: &str) -> Result<K>
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
    let params = PatchParams::apply(manager).force();
    api.patch(&name, &params, &Patch::Apply(desired))
        .await
        .map_err(|source| Error::Apply {
            kind: <K as k8s_openapi::Resource>::KIND,
            name: name.clone(),
            source,
        })
}

/// Deletes `name` of kind `K` (gone already is fine); returns whether it deleted.
pub async fn delete_by_name<K>(client: &Client, namespace: &str, name: &str) -> Result<bool>
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
