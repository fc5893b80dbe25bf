//! Wires the Capsule reconcile into kube-runtime's `Controller`. Only a new generation (the
//! spec, e.g. `revoked`) triggers a reconcile, so the controller's own status writes do not
//! wake it; a policy reload reconciles every Capsule.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{self, Controller};
use kube::runtime::reflector::{self, reflector};
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, watcher};
use soma_crds::Capsule;
use tracing::{debug, warn};

use super::reconcile::{error_policy, reconcile};
use crate::context::Context;

/// Runs the Capsule controller for one namespace (or all, with `None`) until `shutdown`.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    policy_reloads: tokio::sync::watch::Receiver<u64>,
) {
    let api: Api<Capsule> = match namespace.as_deref() {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let (capsules, writer) = reflector::store();
    let trigger = reflector(
        writer,
        watcher(api, watcher::Config::default().any_semantic()),
    )
    .default_backoff()
    .applied_objects()
    .predicate_filter(predicates::generation, PredicateConfig::default());
    Controller::for_stream(trigger, capsules)
        .with_config(controller::Config::default().concurrency(4))
        .reconcile_all_on(futures::stream::unfold(
            policy_reloads,
            |mut rx| async move { rx.changed().await.ok().map(|()| ((), rx)) },
        ))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(capsule = %object, "reconciled"),
                Err(controller::Error::ReconcilerFailed(e, object)) => {
                    debug!(capsule = %object, error = %e, "reconcile failed")
                }
                Err(e) => warn!(error = %e, "capsule controller error"),
            }
        })
        .await;
}
