//! Wires the Agent reconcile into kube-runtime's `Controller`: the Agents it watches, the
//! children it owns (so a deleted or edited child is put back), and the Budgets and Capsules
//! it references (so an Agent waiting for one is reconciled the moment it appears).

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::ResourceExt;
use kube::runtime::controller::{self, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{PredicateConfig, WatchStreamExt, watcher};
use soma_crds::{Agent, Budget, Capsule};
use tracing::{debug, warn};

use super::reconcile::{error_policy, reconcile};
use crate::budget::def::key_of;
use crate::context::{Context, api, budget_watch};

/// What of a Budget an Agent depends on: its spec (generation) and the share used it shows.
fn budget_relevant(b: &Budget) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.metadata.generation.hash(&mut h);
    b.metadata.uid.hash(&mut h);
    b.status
        .as_ref()
        .and_then(|s| s.used_display.clone())
        .hash(&mut h);
    Some(h.finish())
}

/// What of an Agent its reconcile depends on: its spec (generation) and the scaling loop's
/// brown-out revision.
fn agent_relevant(a: &Agent) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    a.metadata.generation.hash(&mut h);
    a.status
        .as_ref()
        .and_then(|s| s.scaling.as_ref())
        .and_then(|s| s.brown_out_revision)
        .hash(&mut h);
    Some(h.finish())
}

/// Selects the objects the operator created, so the owned-object watches stay small.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=soma-operator";

/// Agents in `namespace` whose spec satisfies `refers`.
fn referring(
    store: &Store<Agent>,
    namespace: Option<String>,
    refers: impl Fn(&Agent) -> bool,
) -> Vec<ObjectRef<Agent>> {
    store
        .state()
        .into_iter()
        .filter(|a| a.namespace() == namespace && refers(a))
        .map(|a| ObjectRef::from_obj(&*a))
        .collect()
}

/// Runs the Agent controller for one namespace (or all, with `None`) until `shutdown`. Every
/// Agent is reconciled again when `policy_reloads` moves (policies change after admission).
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    policy_reloads: tokio::sync::watch::Receiver<u64>,
) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let owned = watcher::Config::default().labels(MANAGED_SELECTOR);
    // The Agent cache is fed every change, but only spec changes (a new generation) and a new
    // brown-out decision of the scaling loop (rendered into the sidecar's ConfigMap) trigger a
    // reconcile: the controller's own status writes would otherwise wake it once more each.
    // Children, Budgets and Capsules trigger reconciles through their own watches below.
    let (agents, writer) = reflector::store();
    let trigger = reflector(
        writer,
        watcher(
            api::<Agent>(&client, ns),
            watcher::Config::default().any_semantic(),
        ),
    )
    .default_backoff()
    .inspect({
        // A deleted Agent charges nothing any more and its image holds nothing back (no
        // reconcile runs for it).
        let index = ctx.index.clone();
        let metrics = ctx.metrics.clone();
        move |event| {
            if let Ok(watcher::Event::Delete(a)) = event {
                let namespace = a.namespace().unwrap_or_default();
                index.record_agent(&format!("{namespace}/{}", a.name_any()), None);
                metrics.signature_state("image", &namespace, &a.name_any(), None);
            }
        }
    })
    .applied_objects()
    .predicate_filter(agent_relevant, PredicateConfig::default());
    let controller = Controller::for_stream(trigger, agents.clone());
    // A Budget's change (or appearance) wakes every Agent whose chain passed through it or
    // stopped at it, as the last reconciles recorded (a parent that appears wakes the Agent
    // that waited for it). Its spec, and the share used that Agents show, trigger; other
    // status changes do not.
    let budget_changes = budget_watch(&client, &ctx.config.namespaces)
        .default_backoff()
        .touched_objects()
        .predicate_filter(budget_relevant, PredicateConfig::default());
    let index = ctx.index.clone();
    let by_capsule = agents.clone();
    controller
        .with_config(controller::Config::default().concurrency(16))
        .owns(api::<Deployment>(&client, ns), owned.clone())
        .owns(api::<Service>(&client, ns), owned.clone())
        .owns(api::<ConfigMap>(&client, ns), owned.clone())
        .owns(api::<ServiceAccount>(&client, ns), owned.clone())
        .owns(api::<NetworkPolicy>(&client, ns), owned)
        .watches_stream(budget_changes, move |budget: Budget| {
            index
                .agents_touching(&key_of(&budget))
                .into_iter()
                .filter_map(|a| {
                    let (ns, name) = a.split_once('/')?;
                    Some(ObjectRef::new(name).within(ns))
                })
                .collect::<Vec<_>>()
        })
        .watches(
            api::<Capsule>(&client, ns),
            watcher::Config::default(),
            move |capsule| {
                let name = capsule.name_any();
                referring(&by_capsule, capsule.namespace(), |a| {
                    a.spec.capsules.iter().any(|c| c.name == name)
                })
            },
        )
        .reconcile_all_on(futures::stream::unfold(
            policy_reloads,
            |mut rx| async move { rx.changed().await.ok().map(|()| ((), rx)) },
        ))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(agent = %object, "reconciled"),
                Err(controller::Error::ReconcilerFailed(e, object)) => {
                    debug!(agent = %object, error = %e, "reconcile failed")
                }
                Err(e) => warn!(error = %e, "controller error"),
            }
        })
        .await;
}
