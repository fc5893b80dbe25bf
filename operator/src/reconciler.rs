//! What every controller does the same way, in one place: write a status only when it
//! changed (decided on the live object), publish an Event when the `Ready` reason changes,
//! and the error policy (transient errors retry with per-object backoff, permanent ones wait
//! for a change). A controller adds only what is its own: its observation and its pure status
//! function.

use std::fmt::Debug;
use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, Patch, PatchParams};
use kube::core::object::HasStatus;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use soma_crds::common::condition_types::READY;
use tracing::warn;

use crate::context::Context;
use crate::error::{Error, Result};

/// A Soma resource a controller writes the status of.
pub trait Reported:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + DeserializeOwned
    + Serialize
    + Send
    + Sync
    + 'static
{
    /// Its status.
    type Status: PartialEq + Serialize + Clone + Debug + Send + Sync;
    /// The controller's name in metrics, logs and backoff keys.
    const CONTROLLER: &'static str;
    /// Its field manager (`soma.dev/<controller>`).
    const FIELD_MANAGER: &'static str;
    /// The object's status, if written.
    fn status_of(&self) -> Option<&Self::Status>;
    /// The conditions of a status.
    fn conditions(status: &Self::Status) -> &[Condition];
}

/// Implements [`Reported`] for a Soma resource whose status has `conditions`.
macro_rules! reported {
    ($kind:ty, $status:ty, $controller:literal) => {
        impl Reported for $kind {
            type Status = $status;
            const CONTROLLER: &'static str = $controller;
            const FIELD_MANAGER: &'static str = concat!("soma.dev/", $controller);
            fn status_of(&self) -> Option<&$status> {
                HasStatus::status(self)
            }
            fn conditions(status: &$status) -> &[Condition] {
                &status.conditions
            }
        }
    };
}

reported!(soma_crds::Agent, soma_crds::AgentStatus, "agent");
reported!(soma_crds::Capsule, soma_crds::CapsuleStatus, "capsule");
reported!(soma_crds::Budget, soma_crds::BudgetStatus, "budget");
reported!(soma_crds::Job, soma_crds::JobStatus, "job");

/// A status that was written: the live one it replaced, and the new one.
#[derive(Debug)]
pub struct Written<S> {
    /// The status before the write.
    pub old: Option<S>,
    /// The status written.
    pub new: S,
}

/// Writes the status `compute` gives for the object's current one, unless it equals it. The
/// cached object may predate this controller's last status write: the decision is made again
/// on the live object, so a stale cache neither writes the same status twice nor restarts a
/// condition's `lastTransitionTime`.
pub async fn write_status<K>(
    ctx: &Context,
    obj: &K,
    compute: impl Fn(Option<&K::Status>) -> K::Status,
) -> Result<Option<Written<K::Status>>>
where
    K: Reported,
{
    if obj.status_of() == Some(&compute(obj.status_of())) {
        return Ok(None);
    }
    let namespace = obj
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = obj.name_any();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let live = api.get(&name).await.map_err(|source| Error::Read {
        what: format!("{} {namespace}/{name}", K::kind(&())),
        source,
    })?;
    let new = compute(live.status_of());
    if live.status_of() == Some(&new) {
        return Ok(None);
    }
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": name},
        "status": new,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(K::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::Status { source })?;
    ctx.metrics.status_written(K::CONTROLLER);
    Ok(Some(Written {
        old: live.status_of().cloned(),
        new,
    }))
}

/// The `Ready` condition of a status.
pub fn ready<K>(status: Option<&K::Status>) -> Option<&Condition>
where
    K: Reported,
{
    status.and_then(|s| K::conditions(s).iter().find(|c| c.type_ == READY))
}

/// Whether the `Ready` reason changed with this write: the moment to tell the user why.
pub fn ready_reason_changed<K>(written: &Written<K::Status>) -> Option<&Condition>
where
    K: Reported,
{
    let old = ready::<K>(written.old.as_ref()).map(|c| c.reason.as_str());
    ready::<K>(Some(&written.new)).filter(|c| Some(c.reason.as_str()) != old)
}

/// Publishes an Event on `obj`. An Event is a courtesy: failing to publish one is logged and
/// does not fail the reconcile.
pub async fn publish<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    type_: EventType,
    reason: &str,
    note: &str,
    action: &str,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        warn!(error = %e, "publishing an Event failed");
    }
}

/// The backoff key of an object.
pub fn key<K: Reported>(obj: &K) -> String {
    format!(
        "{}:{}/{}",
        K::CONTROLLER,
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

/// Transient failures are retried with exponential backoff per object; permanent ones
/// (written as `Stalled` by the reconcile where possible) wait for a change.
pub fn error_policy<K>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action
where
    K: Reported,
{
    ctx.metrics.reconcile_failed(K::CONTROLLER, error.label());
    let name = format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
    if !error.is_transient() {
        warn!(controller = K::CONTROLLER, object = %name, error = %error, "permanent failure; waiting for a change");
        return Action::await_change();
    }
    let delay = ctx.backoff(&key(&*obj));
    warn!(controller = K::CONTROLLER, object = %name, error = %error, retry_in = ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}
