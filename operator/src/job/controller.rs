//! Wires the Job reconcile into kube-runtime's `Controller`: the Jobs it watches (a new Job,
//! or a spec change, which the CRD refuses), the batch/v1 Jobs and CronJobs it runs them as
//! (a run that starts, retries or ends; a freed slot wakes the Jobs waiting for one), and what
//! a Job that has not started waits for: its Agent, its Budgets (a Budget that resets or is
//! fixed), its Capsules, and the policies. A Capsule that changes also wakes the task Jobs
//! still running, whose pods must be told when it is revoked.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::{CronJob, Job as BatchJob};
use kube::ResourceExt;
use kube::runtime::controller::{self, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, watcher};
use soma_crds::{Agent, Budget, Capsule, Job};
use tracing::{debug, warn};

use super::children::JOB_LABEL;
use super::reconcile::{error_policy, reconcile, waits_for_slot};
use super::status::finished;
use crate::agent::controller::MANAGED_SELECTOR;
use crate::budget::def::key_of;
use crate::context::{Context, api, budget_watch};

/// Jobs of `namespace` that have not finished and satisfy `also`.
fn unfinished(
    store: &Store<Job>,
    namespace: Option<String>,
    also: impl Fn(&Job) -> bool,
) -> Vec<ObjectRef<Job>> {
    store
        .state()
        .into_iter()
        .filter(|j| j.namespace() == namespace && finished(j.status.as_ref()).is_none())
        .filter(|j| also(j))
        .map(|j| ObjectRef::from_obj(&*j))
        .collect()
}

/// Jobs of `namespace` that have not started yet and satisfy `also`.
fn unstarted(
    store: &Store<Job>,
    namespace: Option<String>,
    also: impl Fn(&Job) -> bool,
) -> Vec<ObjectRef<Job>> {
    unfinished(store, namespace, |j| {
        j.status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_none_or(|p| matches!(p, "Pending" | "Waiting"))
            && also(j)
    })
}

/// Runs the Job controller for one namespace (or all, with `None`) until `shutdown`. Every
/// Job that has not started is reconciled again when `policy_reloads` moves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    policy_reloads: tokio::sync::watch::Receiver<u64>,
) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let owned = watcher::Config::default().labels(&format!("{MANAGED_SELECTOR},{JOB_LABEL}"));
    let (jobs, writer) = reflector::store();
    ctx.jobs.add_store(jobs.clone());
    let trigger = reflector(
        writer,
        watcher(
            api::<Job>(&client, ns),
            watcher::Config::default().any_semantic(),
        ),
    )
    .default_backoff()
    .inspect({
        let ctx = ctx.clone();
        move |event| {
            if let Ok(watcher::Event::Delete(j)) = event {
                let namespace = j.namespace().unwrap_or_default();
                ctx.metrics.forget_job(&namespace, &j.name_any());
                ctx.jobs.record_chain(&namespace, &j.name_any(), None);
            }
        }
    })
    .applied_objects()
    .predicate_filter(predicates::generation, PredicateConfig::default());
    let controller = Controller::for_stream(trigger, jobs.clone());
    let by_run = jobs.clone();
    let by_agent = jobs.clone();
    let by_capsule = jobs.clone();
    let state = ctx.jobs.clone();
    controller
        .with_config(controller::Config::default().concurrency(8))
        // A run that changes wakes its Job; one that ends (or goes) frees a slot, which wakes
        // the Jobs of its namespace waiting for one. CronJob runs are labelled with the Job's
        // name too, so a scheduled drill sees each run.
        .watches(api::<BatchJob>(&client, ns), owned.clone(), move |batch| {
            let mut refs: Vec<ObjectRef<Job>> = batch
                .labels()
                .get(JOB_LABEL)
                .map(|owner| ObjectRef::new(owner).within(&batch.namespace().unwrap_or_default()))
                .into_iter()
                .collect();
            refs.extend(unstarted(&by_run, batch.namespace(), waits_for_slot));
            refs
        })
        .owns(api::<CronJob>(&client, ns), owned)
        // A Budget that resets (its status) or changes wakes the Jobs whose chain it is in.
        .watches_stream(
            budget_watch(&client, &ctx.config.namespaces)
                .default_backoff()
                .touched_objects(),
            move |budget: Budget| {
                state
                    .touching(&key_of(&budget))
                    .into_iter()
                    .map(|(ns, name)| ObjectRef::new(&name).within(&ns))
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            api::<Agent>(&client, ns),
            watcher::Config::default(),
            move |agent| {
                let name = agent.name_any();
                unstarted(&by_agent, agent.namespace(), |j| {
                    j.spec.agent_ref.as_ref().is_some_and(|r| r.name == name)
                })
            },
        )
        .watches(
            api::<Capsule>(&client, ns),
            watcher::Config::default(),
            // Unstarted ones wait for it; running ones are told when it is revoked.
            move |capsule| {
                unfinished(&by_capsule, capsule.namespace(), |j| {
                    j.spec.dr_drill.is_none()
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
                Ok((object, _)) => debug!(job = %object, "reconciled"),
                Err(controller::Error::ReconcilerFailed(e, object)) => {
                    debug!(job = %object, error = %e, "reconcile failed")
                }
                Err(e) => warn!(error = %e, "controller error"),
            }
        })
        .await;
}
