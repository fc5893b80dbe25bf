//! Wires the Budget reconcile into kube-runtime's `Controller`: the Budgets it watches (a spec
//! change), Budgets whose parent chain passed through a changed Budget (its definition and
//! grant affect them), and refresh requests on the chain index's bus (an Agent started or
//! stopped charging a Budget; the ledger reports new spend, at most once per refresh interval).

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use kube::ResourceExt;
use kube::runtime::controller::{self, Controller};
use kube::runtime::reflector::{self, ObjectRef, reflector};
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, watcher};
use soma_crds::Budget;
use tokio::sync::broadcast::error::RecvError;
use tracing::{debug, warn};

use super::def::key_of;
use super::reconcile::reconcile;
use crate::context::{Context, api, budget_watch};
use crate::reconciler::error_policy;

/// Runs the Budget controller for one namespace (or all) until `shutdown`.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let (budgets, writer) = reflector::store();
    let trigger = reflector(
        writer,
        watcher(
            api::<Budget>(&client, ns),
            watcher::Config::default().any_semantic(),
        ),
    )
    .default_backoff()
    .inspect({
        let metrics = ctx.metrics.clone();
        move |event| {
            if let Ok(watcher::Event::Delete(b)) = event {
                metrics.forget_budget(&b.namespace().unwrap_or_default(), &b.name_any());
            }
        }
    })
    .applied_objects()
    .predicate_filter(predicates::generation, PredicateConfig::default());
    let all = budgets.clone();
    let scope = namespace.clone();
    let refreshes = futures::stream::unfold(ctx.index.subscribe(), move |mut rx| {
        let all = all.clone();
        let scope = scope.clone();
        async move {
            loop {
                let batch = match rx.recv().await {
                    Ok(batch) => batch,
                    // Refresh requests were dropped: refresh everything.
                    Err(RecvError::Lagged(_)) => None,
                    Err(RecvError::Closed) => return None,
                };
                let refs: Vec<ObjectRef<Budget>> = match batch {
                    Some(keys) => keys
                        .iter()
                        .filter(|k| scope.as_ref().is_none_or(|s| *s == k.namespace))
                        .map(|k| ObjectRef::new(&k.name).within(&k.namespace))
                        .collect(),
                    None => all
                        .state()
                        .iter()
                        .map(|b| ObjectRef::from_obj(&**b))
                        .collect(),
                };
                if !refs.is_empty() {
                    return Some((futures::stream::iter(refs), rx));
                }
            }
        }
    })
    .flatten();
    let index = ctx.index.clone();
    Controller::for_stream(trigger, budgets)
        .with_config(controller::Config::default().concurrency(8))
        // A Budget's children (in any watched namespace) depend on its definition and grant.
        .watches_stream(
            budget_watch(&client, &ctx.config.namespaces)
                .default_backoff()
                .touched_objects(),
            move |parent: Budget| {
                index
                    .budgets_touching(&key_of(&parent))
                    .into_iter()
                    .map(|k| ObjectRef::new(&k.name).within(&k.namespace))
                    .collect::<Vec<_>>()
            },
        )
        .reconcile_on(refreshes)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(budget = %object, "reconciled"),
                Err(controller::Error::ReconcilerFailed(e, object)) => {
                    debug!(budget = %object, error = %e, "reconcile failed")
                }
                Err(e) => warn!(error = %e, "controller error"),
            }
        })
        .await;
}
