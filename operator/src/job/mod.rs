//! The Job controller: runs each `jobs.soma.dev` Job once as a `batch/v1` Job it owns (a task
//! on an Agent's definition or a template, or a DR drill), or on a schedule as a CronJob (a
//! periodic drill), and reports what happened.
//!
//! ```text
//!  watch Jobs ───────┐
//!  watch batch Jobs ─┤                 ┌─ finished? ─▶ TTL: delete when due
//!  watch CronJobs ───┼─▶ reconcile ────┼─ started?  ─▶ observe: attempts, outcome, result (pod
//!  watch Budgets ────┤                 │               termination message), usage (ledger);
//!                    │                 │               revoked Capsules into the sidecar's ConfigMap
//!  watch Agents ─────┤                 └─ not yet   ─▶ resolve (Agent, Budget chain, Capsules,
//!  watch Capsules ───┘                                 policies, image) ─▶ Budget gate ─▶ slot
//!                                                      (or Kueue) ─▶ children (pure) ─▶ apply
//!                     ─▶ status (pure) ─▶ patch only if changed + an Event per phase ─▶ requeue
//! ```
//!
//! - [`children`]: pure builders of the batch/v1 Job or CronJob and what its pod needs;
//! - [`queue`]: pure: who may start when no Kueue queue is named;
//! - [`status`]: pure: the status from what the reconcile observed;
//! - [`revoked`]: a running Job's revoked Capsules written into its sidecar's ConfigMap (the
//!   Agent's way, `crate::workload::revoked`);
//! - [`reconcile`]: the reconcile;
//! - [`controller`]: the kube-runtime `Controller` and its watches.

pub mod children;
pub mod controller;
pub mod queue;
pub mod reconcile;
pub mod revoked;
pub mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::ResourceExt;
use kube::runtime::reflector::Store;
use soma_crds::Job;
use soma_metering::BudgetKey;

use crate::budget::index::Walked;
use queue::Contender;

/// What the Job reconciles share beyond the [`crate::context::Context`]: the controllers'
/// caches of Jobs (to rank the Jobs waiting for a slot), a lock per namespace (so two
/// reconciles never both take the last slot), and which Budgets each waiting Job's chain
/// passed through (so a Budget's change wakes the Jobs it holds back).
#[derive(Debug, Default)]
pub struct JobState {
    stores: Mutex<Vec<Store<Job>>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    chains: Mutex<HashMap<(String, String), Walked>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl JobState {
    /// Adds a controller's cache of Jobs.
    pub fn add_store(&self, store: Store<Job>) {
        lock(&self.stores).push(store);
    }

    /// Every cached Job of `namespace`.
    pub fn jobs_in(&self, namespace: &str) -> Vec<Arc<Job>> {
        lock(&self.stores)
            .iter()
            .flat_map(Store::state)
            .filter(|j| j.namespace().as_deref() == Some(namespace))
            .collect()
    }

    /// The Jobs of `namespace` waiting for a slot, as their last status says.
    pub fn contenders(&self, namespace: &str) -> Vec<Contender> {
        self.jobs_in(namespace)
            .iter()
            .filter(|j| reconcile::waits_for_slot(j))
            .map(|j| Contender {
                name: j.name_any(),
                priority: j.spec.priority,
                created: created(j),
            })
            .collect()
    }

    /// The lock of `namespace`'s slots.
    pub async fn slots(&self, namespace: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = lock(&self.locks)
            .entry(namespace.to_owned())
            .or_default()
            .clone();
        m.lock_owned().await
    }

    /// Records which Budgets the chain of Job `namespace/name` passed through (`None`: it
    /// waits for none any more).
    pub fn record_chain(&self, namespace: &str, name: &str, walked: Option<Walked>) {
        let key = (namespace.to_owned(), name.to_owned());
        let mut chains = lock(&self.chains);
        match walked {
            Some(w) => chains.insert(key, w),
            None => chains.remove(&key),
        };
    }

    /// The Jobs whose chain passed through (or stopped at) `budget`.
    pub fn touching(&self, budget: &BudgetKey) -> Vec<(String, String)> {
        lock(&self.chains)
            .iter()
            .filter(|(_, w)| w.chain.contains(budget) || w.missing.as_ref() == Some(budget))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// A Job's creation time as RFC 3339 text (empty when unknown: ranks first).
pub fn created(job: &Job) -> String {
    job.metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default()
}
