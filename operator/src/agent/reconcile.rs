//! The Agent reconcile. It reads like its definition:
//! resolve references → build children (pure) → apply what differs → compute status (pure)
//! → write status only if it changed → requeue on purpose.
//!
//! Permanent failures (a missing reference, an object the API server rejects) become a
//! `Stalled` condition and an Event, and the controller waits for a change; transient ones
//! go to [`error_policy`], which retries with exponential backoff.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Client, Resource, ResourceExt};
use soma_crds::{Agent, Budget, Capsule};
use tracing::{Span, field, info, instrument, warn};

use super::apply::apply_children;
use super::children::{BudgetDefinition, FIELD_MANAGER, Resolved, children, pin_agent_image};
use super::image::{pin, verify_cached};
use super::status::{
    DeploymentState, ImageCheck, MissingRef, Observed, Stall, agent_status, ready_condition,
};
use crate::context::Context;
use crate::error::{Error, Result};

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "agent";

/// Safety-net requeue after a successful reconcile; watches drive everything else.
const RESYNC: Duration = Duration::from_secs(3600);

/// Replicas Soma wants until the autoscaler drives them: the Agent's minimum, at least one
/// (scale to zero needs the autoscaler's traffic signal), at most its maximum.
pub fn desired_replicas(agent: &Agent) -> i32 {
    let s = &agent.spec.scaling;
    s.min_replicas.max(1).min(s.max_replicas.max(1))
}

/// Budgets followed through `parentRef` before Soma calls the chain a loop or too deep.
const MAX_BUDGET_CHAIN: usize = 8;

/// What the Agent's references resolved to.
#[derive(Debug, Default)]
struct Refs {
    /// References that do not exist.
    missing: Vec<MissingRef>,
    /// The Agent's Budget and its parents, for the sidecar.
    budgets: Vec<BudgetDefinition>,
    /// A chain the sidecar would refuse (a loop, or deeper than it follows).
    stall: Option<Stall>,
}

/// Reads the Agent's Budget with its `parentRef` chain, and checks its Capsules exist.
async fn resolve_refs(client: &Client, agent: &Agent, namespace: &str) -> Result<Refs> {
    let mut refs = Refs::default();
    let budgets: Api<Budget> = Api::namespaced(client.clone(), namespace);
    let mut next = agent
        .spec
        .budget_ref
        .as_ref()
        .map(|b| (b.name.clone(), "spec.budgetRef".to_owned()));
    while let Some((name, field)) = next.take() {
        if refs.budgets.iter().any(|b| b.name == name) || refs.budgets.len() >= MAX_BUDGET_CHAIN {
            let chain: Vec<&str> = refs.budgets.iter().map(|b| b.name.as_str()).collect();
            refs.stall = Some(Stall {
                reason: "BudgetChainInvalid".to_owned(),
                message: format!(
                    "the Budget parent chain {} -> {name} loops or is deeper than {MAX_BUDGET_CHAIN}; correct a Budget's spec.parentRef",
                    chain.join(" -> ")
                ),
            });
            break;
        }
        let found = budgets.get_opt(&name).await.map_err(|source| Error::Read {
            what: format!("Budget {namespace}/{name}"),
            source,
        })?;
        match found {
            Some(budget) => {
                next = budget
                    .spec
                    .parent_ref
                    .as_ref()
                    .map(|p| (p.name.clone(), format!("spec.parentRef of Budget {name:?}")));
                refs.budgets.push(BudgetDefinition {
                    name,
                    spec: budget.spec,
                });
            }
            None => refs.missing.push(MissingRef {
                kind: "Budget",
                name,
                field,
            }),
        }
    }
    let capsules: Api<Capsule> = Api::namespaced(client.clone(), namespace);
    for capsule in &agent.spec.capsules {
        let found = capsules
            .get_opt(&capsule.name)
            .await
            .map_err(|source| Error::Read {
                what: format!("Capsule {namespace}/{}", capsule.name),
                source,
            })?;
        match found {
            None => refs.missing.push(MissingRef {
                kind: "Capsule",
                name: capsule.name.clone(),
                field: "spec.capsules".to_owned(),
            }),
            Some(found) => {
                if let (Err((reason, message)), None) = (
                    crate::capsule::status::readiness(found.status.as_ref()),
                    &refs.stall,
                ) {
                    // A Capsule that is not verified (or revoked, or denied) must not reach
                    // an agent: the Agent waits, like for a missing reference.
                    refs.stall = Some(Stall {
                        reason: "CapsuleNotReady".to_owned(),
                        message: format!(
                            "Capsule {:?} is not Ready ({reason}: {message}); the agent's pods are not started or changed until it is",
                            capsule.name
                        ),
                    });
                }
            }
        }
    }
    Ok(refs)
}

fn deployment_state(d: &Deployment) -> DeploymentState {
    let status = d.status.clone().unwrap_or_default();
    DeploymentState {
        generation: d.metadata.generation.unwrap_or_default(),
        observed_generation: status.observed_generation.unwrap_or_default(),
        replicas: status.replicas.unwrap_or_default(),
        updated: status.updated_replicas.unwrap_or_default(),
        ready: status.ready_replicas.unwrap_or_default(),
    }
}

/// Reconciles one Agent.
#[instrument(skip(agent, ctx), fields(namespace = field::Empty, agent = %agent.name_any(), writes = field::Empty))]
pub async fn reconcile(agent: Arc<Agent>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let namespace = agent
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    Span::current().record("namespace", namespace.as_str());
    if agent.meta().deletion_timestamp.is_some() {
        // Children carry the Agent as controller owner: Kubernetes' garbage collector removes
        // them. Nothing outside Kubernetes to clean up, hence no finalizer.
        return Ok(Action::await_change());
    }
    let key = format!("{namespace}/{}", agent.name_any());
    let result = converge(&agent, &ctx, &namespace).await;
    let observed = match result {
        Ok(observed) => observed,
        Err(e) if !e.is_transient() => {
            ctx.metrics.reconcile_failed(CONTROLLER, e.label());
            let deployment = read_deployment(&ctx.client, &agent, &namespace)
                .await
                .unwrap_or(None);
            Observed {
                generation: agent.metadata.generation,
                namespace: namespace.clone(),
                stall: Some(Stall {
                    reason: e.label().to_owned(),
                    message: e.to_string(),
                }),
                deployment,
                desired_replicas: desired_replicas(&agent),
                ..Observed::default()
            }
        }
        Err(e) => return Err(e),
    };
    let policy_error = observed
        .policy
        .as_ref()
        .is_some_and(|p| p.blocks && p.is_error());
    let image_retry = observed.image.rejection().is_some_and(|r| r.transient);
    let stalled = !observed.missing.is_empty()
        || observed.image.rejection().is_some()
        || observed.stall.is_some()
        || observed.policy.as_ref().is_some_and(|p| p.blocks);
    write_status(&agent, &ctx, &namespace, &observed).await?;
    if policy_error || image_retry {
        // An evaluation that did not finish (deadline, overload) or a registry that did not
        // answer is worth another try.
        return Ok(Action::requeue(ctx.backoff(&key)));
    }
    ctx.succeeded(&key);
    // A denied Agent waits for a change to itself or to the policies (a reload re-checks
    // every Agent).
    Ok(if stalled {
        Action::await_change()
    } else if matches!(observed.image, ImageCheck::Verified { .. }) {
        // A verified tag is resolved again after the recheck interval, so a moved tag is
        // verified and rolled out (or refused) without waiting for the hourly resync.
        Action::requeue(RESYNC.min(ctx.config.images.recheck.max(Duration::from_secs(1))))
    } else {
        Action::requeue(RESYNC)
    })
}

/// Resolves references and applies the children; returns what the status is computed from.
async fn converge(agent: &Agent, ctx: &Context, namespace: &str) -> Result<Observed> {
    let refs = resolve_refs(&ctx.client, agent, namespace).await?;
    let policy = ctx
        .policy
        .check(agent)
        .await
        .map_err(|source| Error::Serialize {
            what: "the Agent for policy evaluation",
            source,
        })?;
    let replicas = desired_replicas(agent);
    let runnable = refs.missing.is_empty() && refs.stall.is_none() && !policy.blocks;
    // The registry is asked only about an Agent that could otherwise run.
    let image = if runnable && ctx.config.images.required {
        check_image(agent, ctx).await
    } else {
        ImageCheck::NotRequired
    };
    let deployment = if runnable && image.rejection().is_none() {
        let pinned_image = match &image {
            ImageCheck::Verified { verified, .. } => Some(pin(&agent.spec.image, &verified.digest)),
            _ => None,
        };
        let resolved = Resolved {
            replicas,
            budgets: refs.budgets,
        };
        let mut desired =
            children(agent, &resolved, &ctx.config).map_err(|source| Error::Serialize {
                what: "children",
                source,
            })?;
        if let Some(image) = &pinned_image {
            pin_agent_image(&mut desired.deployment, image);
        }
        let uid = agent.uid().ok_or(Error::MissingField("metadata.uid"))?;
        let applied = apply_children(&ctx.client, &desired, &uid).await?;
        for _ in 0..applied.writes {
            ctx.metrics.child_written(CONTROLLER);
        }
        Span::current().record("writes", applied.writes);
        applied.deployment.as_ref().map(deployment_state)
    } else {
        // Fail closed: nothing is started or changed while a reference is broken, a policy
        // denies the Agent or its image is not verified. Pods already running keep running (as Gatekeeper's audit reports
        // existing objects without removing them); their sidecar still enforces the Budget
        // it has.
        read_deployment(&ctx.client, agent, namespace).await?
    };
    Ok(Observed {
        generation: agent.metadata.generation,
        namespace: namespace.to_owned(),
        missing: refs.missing,
        stall: refs.stall,
        deployment,
        desired_replicas: replicas,
        policy: Some(policy),
        image,
    })
}

/// Verifies `spec.image` (cached by reference for the recheck interval).
async fn check_image(agent: &Agent, ctx: &Context) -> ImageCheck {
    let reference = agent.spec.image.clone();
    match verify_cached(
        ctx.images.as_ref(),
        &ctx.verified_images,
        &reference,
        ctx.config.images.recheck,
    )
    .await
    {
        Ok(verified) => ImageCheck::Verified {
            reference,
            verified,
        },
        Err(rejection) => {
            warn!(image = %reference, reason = %rejection.reason, transient = rejection.transient, "agent image not verified");
            ImageCheck::Rejected(rejection)
        }
    }
}

async fn read_deployment(
    client: &Client,
    agent: &Agent,
    namespace: &str,
) -> Result<Option<DeploymentState>> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let name = agent.name_any();
    let live = api.get_opt(&name).await.map_err(|source| Error::Read {
        what: format!("Deployment {namespace}/{name}"),
        source,
    })?;
    Ok(live.as_ref().map(deployment_state))
}

/// Writes the status if it changed, and publishes an Event when the Ready condition's reason
/// changes, so users see why in `kubectl describe` without Events repeating every reconcile.
async fn write_status(
    agent: &Agent,
    ctx: &Context,
    namespace: &str,
    observed: &Observed,
) -> Result<()> {
    let now = Time(Timestamp::now());
    if agent.status.as_ref() == Some(&agent_status(agent.status.as_ref(), observed, &now)) {
        return Ok(());
    }
    // The cached Agent may predate this controller's last status write. Decide on the live
    // status, so a stale cache neither writes the same status again nor restarts a
    // condition's lastTransitionTime.
    let api: Api<Agent> = Api::namespaced(ctx.client.clone(), namespace);
    let name = agent.name_any();
    let live = api.get(&name).await.map_err(|source| Error::Read {
        what: format!("Agent {namespace}/{name}"),
        source,
    })?;
    let new = agent_status(live.status.as_ref(), observed, &now);
    if live.status.as_ref() == Some(&new) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": "soma.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": agent.name_any()},
        "status": new,
    });
    api.patch_status(
        &agent.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::Status { source })?;
    ctx.metrics.status_written(CONTROLLER);

    let old_reason = live
        .status
        .as_ref()
        .and_then(ready_condition)
        .map(|c| c.reason.clone());
    if let Some(ready) = ready_condition(&new)
        && old_reason.as_deref() != Some(ready.reason.as_str())
    {
        let (type_, action) = if ready.status == "True" {
            (EventType::Normal, "Ready")
        } else {
            (EventType::Warning, "Reconcile")
        };
        let policy_blocks = observed.policy.as_ref().is_some_and(|p| p.blocks)
            || observed.image.rejection().is_some();
        if type_ == EventType::Normal
            || observed.stall.is_some()
            || !observed.missing.is_empty()
            || policy_blocks
        {
            let event = Event {
                type_,
                reason: ready.reason.clone(),
                note: Some(ready.message.chars().take(1000).collect()),
                action: action.into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&event, &agent.object_ref(&())).await {
                // An Event is a courtesy; failing to publish one must not fail the reconcile.
                warn!(error = %e, "publishing an Event failed");
            }
        }
    }
    info!(ready = ?ready_condition(&new).map(|c| (&c.status, &c.reason)), "status updated");
    Ok(())
}

/// Transient failures are retried with exponential backoff per object; permanent ones
/// (already written as `Stalled` by [`reconcile`] where possible) wait for a change.
pub fn error_policy(agent: Arc<Agent>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(CONTROLLER, error.label());
    if !error.is_transient() {
        warn!(agent = %agent.name_any(), error = %error, "permanent failure; waiting for a change");
        return Action::await_change();
    }
    let key = format!(
        "{}/{}",
        agent.namespace().unwrap_or_default(),
        agent.name_any()
    );
    let delay = ctx.backoff(&key);
    warn!(agent = %agent.name_any(), error = %error, retry_in = ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}
