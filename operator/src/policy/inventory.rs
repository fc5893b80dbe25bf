//! Feeds `data.inventory` (Gatekeeper's layout) from watches of Namespaces, Budgets and
//! Agents, debounced: a burst of changes costs one rebuild. Namespaces are watched only when
//! the operator watches every namespace (listing them needs cluster-wide RBAC).
//!
//! The first inventory is built as soon as every watch has listed; the webhook starts serving,
//! and the leader reconciling, only after it (bounded), so a policy that reads the inventory
//! never judges an empty one.
//!
//! An inventory change does not trigger reconciles (every Agent's status write changes the
//! inventory; re-checking all Agents on each would be quadratic): decisions that read the
//! inventory are re-checked at the object's next reconcile.

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt, stream::BoxStream};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::Serialize;
use serde_json::Value;
use soma_crds::{Agent, Budget};
use tracing::warn;

use super::loader::Policies;

/// Time a change waits for more changes before the inventory is rebuilt.
pub const DEBOUNCE: Duration = Duration::from_secs(1);

/// An object as the inventory holds it: without `managedFields`.
fn entry<K: Serialize>(object: &K) -> Option<Value> {
    let mut v = serde_json::to_value(object).ok()?;
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    Some(v)
}

/// A cache of `api` and a stream that yields on every change (`true` when a list completes).
fn watch<K>(api: Api<K>) -> (Store<K>, BoxStream<'static, bool>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let events = reflector(
        writer,
        watcher(api, watcher::Config::default().any_semantic()),
    )
    .default_backoff()
    .map(|e| match e {
        Ok(watcher::Event::InitDone) => true,
        Ok(_) => false,
        Err(e) => {
            warn!(error = %e, "inventory watch failed; retrying");
            false
        }
    })
    .boxed();
    (reader, events)
}

/// Runs until `shutdown`. `namespaces` empty means every namespace.
pub async fn run(
    client: Client,
    policies: Arc<Policies>,
    namespaces: Vec<String>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let mut streams = Vec::new();
    let mut ns_store = None;
    if scopes == [None] {
        let (s, e) = watch(Api::<Namespace>::all(client.clone()));
        ns_store = Some(s);
        streams.push(e);
    }
    let mut budgets = Vec::new();
    let mut agents = Vec::new();
    for scope in &scopes {
        let (b, e) = watch(match scope {
            Some(ns) => Api::<Budget>::namespaced(client.clone(), ns),
            None => Api::<Budget>::all(client.clone()),
        });
        budgets.push(b);
        streams.push(e);
        let (a, e) = watch(match scope {
            Some(ns) => Api::<Agent>::namespaced(client.clone(), ns),
            None => Api::<Agent>::all(client.clone()),
        });
        agents.push(a);
        streams.push(e);
    }
    let lists = streams.len();
    let mut listed = 0;
    let mut changes = futures::stream::select_all(streams);
    tokio::pin!(shutdown);
    loop {
        let done = tokio::select! {
            () = &mut shutdown => return,
            next = changes.next() => match next { Some(d) => d, None => return },
        };
        if listed < lists {
            // The first inventory is built as soon as every cache is listed, without waiting:
            // the webhook waits for it before it serves.
            listed += usize::from(done);
            if listed < lists {
                continue;
            }
        } else {
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(DEBOUNCE) => {}
            }
        }
        // Take in whatever arrived meanwhile, so the caches are current.
        while let Some(Some(_)) = changes.next().now_or_never() {}
        let mut objects: Vec<Value> = Vec::new();
        if let Some(s) = &ns_store {
            objects.extend(s.state().iter().filter_map(|o| entry(&**o)));
        }
        for s in &budgets {
            objects.extend(s.state().iter().filter_map(|o| entry(&**o)));
        }
        for s in &agents {
            objects.extend(s.state().iter().filter_map(|o| entry(&**o)));
        }
        tracing::debug!(objects = objects.len(), "updating the policy inventory");
        let inventory = soma_policy::inventory::from_objects(objects.iter());
        let p = policies.clone();
        match tokio::task::spawn_blocking(move || p.set_inventory(inventory)).await {
            Ok(Ok(())) => policies.mark_inventory_synced(),
            Ok(Err(e)) => warn!(error = %e, "updating the policy inventory failed"),
            Err(e) => warn!(error = %e, "updating the policy inventory panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_keep_kind_and_version_and_drop_managed_fields() {
        let budget: Budget = serde_json::from_value(serde_json::json!({
            "apiVersion": "soma.dev/v1alpha1", "kind": "Budget",
            "metadata": {"name": "team", "namespace": "a",
                         "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"limits": {"tokens": 1000}, "period": {"calendar": "day"}}
        }))
        .expect("budget");
        let e = entry(&budget).expect("serialises");
        assert!(e["metadata"].get("managedFields").is_none());
        let inventory = soma_policy::inventory::from_objects([&e]);
        assert_eq!(
            inventory["namespace"]["a"]["soma.dev/v1alpha1"]["Budget"]["team"]["spec"]["limits"]["tokens"],
            1000
        );
    }
}
