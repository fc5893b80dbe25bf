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
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Client, Resource, ResourceExt};
use soma_crds::Agent;
use soma_metering::chain::ChainProblem;
use soma_metering::{BudgetDef, BudgetKey};
use tracing::{Span, field, info, instrument, warn};

use super::apply::apply_children;
use super::brownout::contract_brown_out;
use super::children::{Resolved, children, pin_agent_image};
use super::credentials::uses_vault;
use super::image::{pin, verify_cached};
use super::scaling::{autoscaler_config, autoscaler_owns_replicas, foreign_replicas_managers};
use super::status::{
    DeploymentState, ImageCheck, MissingRef, Observed, Stall, agent_status, ready_condition,
};
use crate::budget::def::resolve_chain;
use crate::budget::index::Walked;
use crate::capsule::delivery::Delivery;
use crate::capsule::refs::{CapsuleRef, capsule_refs};
use crate::capsule::revocation::Standing;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::reconciler;
use crate::workload::vault::{LEDGER_CREDENTIALS_UNUSABLE, ledger_credentials};

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "agent";

/// Safety-net requeue after a successful reconcile; watches drive everything else.
const RESYNC: Duration = Duration::from_secs(3600);

/// Replicas Soma wants until the autoscaler drives them: the Agent's minimum, at least one
/// (an Agent that may scale to zero starts with one; the autoscaler takes it to zero once it
/// has been idle), at most its maximum. Once the
/// autoscaler co-owns the Deployment's `spec.replicas` ([`super::scaling`]), the reconcile
/// stops applying the field and reports the Deployment's count instead.
pub fn desired_replicas(agent: &Agent) -> i32 {
    let s = &agent.spec.scaling;
    s.min_replicas.max(1).min(s.max_replicas.max(1))
}

/// What the Agent's references resolved to.
#[derive(Debug, Default)]
struct Refs {
    /// References that do not exist.
    missing: Vec<MissingRef>,
    /// The Agent's Budget and its parents, for the sidecar.
    budgets: Vec<BudgetDef>,
    /// A chain the sidecar would refuse (a loop, too deep, a parent that does not grant the
    /// child's namespace), or a Capsule that is not Ready.
    stall: Option<Stall>,
    /// The share of its Budget used, from the Budget's status.
    budget_used: Option<String>,
    /// The verified Capsules to deliver into the pods.
    capsules: Vec<Delivery>,
    /// What running pods holding each listed Capsule must be told (revoked or not).
    standings: Vec<(String, Standing)>,
}

/// Resolves the Agent's Budget chain (the one resolver, over Budgets read from the API) and
/// checks its Capsules exist and are Ready.
async fn resolve_refs(ctx: &Context, agent: &Agent, namespace: &str) -> Result<Refs> {
    let client = &ctx.client;
    let mut refs = Refs::default();
    let me = format!("{namespace}/{}", agent.name_any());
    match &agent.spec.budget_ref {
        None => ctx.index.record_agent(&me, None),
        Some(b) => {
            let start = BudgetKey::new(namespace, b.name.clone());
            let chain = resolve_chain(client, &start, "spec.budgetRef").await?;
            ctx.index.record_agent(
                &me,
                Some(Walked {
                    chain: chain
                        .resolution
                        .budgets
                        .iter()
                        .map(BudgetDef::key)
                        .collect(),
                    missing: chain.resolution.stopped_at().cloned(),
                }),
            );
            refs.budget_used = chain
                .first()
                .and_then(|b| b.status.as_ref())
                .and_then(|s| s.used_display.clone());
            match &chain.resolution.problem {
                None => {}
                Some(ChainProblem::Missing { key, field }) => refs.missing.push(MissingRef {
                    kind: "Budget",
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    field: field.clone(),
                }),
                Some(problem) => {
                    refs.stall = Some(Stall {
                        reason: problem.reason().to_owned(),
                        message: format!(
                            "{problem}. The agent's pods are not started or changed until the chain is valid."
                        ),
                    });
                }
            }
            refs.budgets = chain.resolution.budgets;
        }
    }
    for (name, state) in capsule_refs(client, namespace, &agent.spec.capsules).await? {
        match state {
            CapsuleRef::Ready(delivery) => {
                refs.capsules.extend(delivery);
                refs.standings.push((name, Standing::Usable));
            }
            CapsuleRef::Missing => refs.missing.push(MissingRef {
                kind: "Capsule",
                namespace: namespace.to_owned(),
                name,
                field: "spec.capsules".to_owned(),
            }),
            CapsuleRef::NotReady(reason, message, standing) => {
                refs.standings.push((name.clone(), standing));
                if refs.stall.is_none() {
                    // A Capsule that is not verified (or revoked, or denied) must not reach
                    // an agent: the Agent waits, like for a missing reference.
                    refs.stall = Some(Stall {
                        reason: "CapsuleNotReady".to_owned(),
                        message: format!(
                            "Capsule {name:?} is not Ready ({reason}: {message}); the agent's pods are not started or changed until it is"
                        ),
                    });
                }
            }
        }
    }
    if refs.stall.is_none()
        && let Err(message) = ledger_credentials(&agent.spec, &ctx.config)
    {
        // The sidecar would refuse its configuration (or have no ledger user): the pods are
        // not started with it.
        refs.stall = Some(Stall {
            reason: LEDGER_CREDENTIALS_UNUSABLE.to_owned(),
            message: format!(
                "{message}. The agent's pods are not started or changed until it is fixed."
            ),
        });
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
    let key = reconciler::key(&*agent);
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
                autoscaled: autoscaler_config(&agent.spec).is_some(),
                vault_credentials: uses_vault(&agent),
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
    write_status(&agent, &ctx, &observed).await?;
    // Held back by its image's signature (a registry that did not answer is retried, not
    // rejected): `soma_signature_rejected`, which the signature alert watches.
    let rejected = observed
        .image
        .rejection()
        .filter(|r| !r.transient)
        .map(|r| r.reason.as_str());
    ctx.metrics
        .signature_state("image", &namespace, &agent.name_any(), rejected);
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
    let mut refs = resolve_refs(ctx, agent, namespace).await?;
    let policy = ctx
        .policy
        .check(agent)
        .await
        .map_err(|source| Error::Serialize {
            what: "the Agent for policy evaluation",
            source,
        })?;
    let autoscaled = autoscaler_config(&agent.spec).is_some();
    // The autoscaler's count, once it co-owns spec.replicas (applying the field then would
    // fight it; dropping it earlier would let the apply remove it: back to one replica). When
    // another manager (kubectl scale, an HPA) owns it, its count stays too: the scaling loop
    // reports the conflict instead of either side fighting over it.
    let scaled_replicas = if autoscaled {
        let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
        let name = agent.name_any();
        api.get_opt(&name)
            .await
            .map_err(|source| Error::Read {
                what: format!("Deployment {namespace}/{name}"),
                source,
            })?
            .filter(|d| autoscaler_owns_replicas(d) || !foreign_replicas_managers(d).is_empty())
            .and_then(|d| d.spec.and_then(|s| s.replicas))
    } else {
        None
    };
    let replicas = scaled_replicas.unwrap_or_else(|| desired_replicas(agent));
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
        // The scaling loop's brown-out decision, for the sidecars that follow their file.
        let decided = agent
            .status
            .as_ref()
            .and_then(|s| s.scaling.as_ref())
            .filter(|_| autoscaled);
        let resolved = Resolved {
            replicas,
            budgets: refs.budgets,
            capsules: refs.capsules,
            brown_out: decided
                .and_then(|s| s.brown_out.as_ref())
                .map(contract_brown_out),
            brown_out_revision: decided.and_then(|s| s.brown_out_revision).unwrap_or(0),
        };
        let mut desired =
            children(agent, &resolved, &ctx.config).map_err(|source| Error::Serialize {
                what: "children",
                source,
            })?;
        if let Some(image) = &pinned_image {
            pin_agent_image(&mut desired.deployment, image);
        }
        if scaled_replicas.is_some()
            && let Some(spec) = desired.deployment.spec.as_mut()
        {
            spec.replicas = None;
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
        // it has, and is told which of its Capsules are revoked (a live part of its
        // configuration: the pods are not rolled).
        let revoked =
            super::revoked::publish(&ctx.client, agent, &ctx.config, &refs.standings).await?;
        if let Some(stall) = refs
            .stall
            .as_mut()
            .filter(|s| s.reason == "CapsuleNotReady")
            && !revoked.is_empty()
        {
            stall.message.push_str(&format!(
                ". Running pods are told to stop using {revoked:?}: their sidecar refuses recall from it and withdraws its folder from the agent container"
            ));
        }
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
        budget_used: refs.budget_used,
        budget_cluster_wide: agent
            .spec
            .budget_ref
            .as_ref()
            .map(|_| ctx.config.ledger.url.is_some()),
        autoscaled,
        vault_credentials: uses_vault(agent),
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
async fn write_status(agent: &Agent, ctx: &Context, observed: &Observed) -> Result<()> {
    let now = Time(ctx.clock.now());
    let Some(written) =
        reconciler::write_status(ctx, agent, |old| agent_status(old, observed, &now)).await?
    else {
        return Ok(());
    };
    if let Some(ready) = reconciler::ready_reason_changed::<Agent>(&written) {
        let policy_blocks = observed.policy.as_ref().is_some_and(|p| p.blocks)
            || observed.image.rejection().is_some();
        if ready.status == "True" {
            reconciler::publish(
                ctx,
                agent,
                EventType::Normal,
                &ready.reason,
                &ready.message,
                "Ready",
            )
            .await;
        } else if observed.stall.is_some() || !observed.missing.is_empty() || policy_blocks {
            reconciler::publish(
                ctx,
                agent,
                EventType::Warning,
                &ready.reason,
                &ready.message,
                "Reconcile",
            )
            .await;
        }
    }
    info!(ready = ?ready_condition(&written.new).map(|c| (&c.status, &c.reason)), "status updated");
    Ok(())
}

/// The Agent controller's error policy (the shared one).
pub fn error_policy(agent: Arc<Agent>, error: &Error, ctx: Arc<Context>) -> Action {
    reconciler::error_policy(agent, error, ctx)
}
