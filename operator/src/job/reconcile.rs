//! The Job reconcile. It reads like its definition:
//! finished? (TTL) → started? (observe the run) → resolve what would run (Agent or template,
//! Budget chain, Capsules, policies, image; a drill's Secrets, ledger and stream) → Budget
//! gate → a slot (or Kueue) → build the children (pure) → apply them → compute the status
//! (pure) → write it only if it changed, with an Event per phase → requeue on purpose.
//!
//! A Job is started at most once: its batch/v1 Job is created and never applied again (Kueue
//! unsuspends it, Kubernetes' Job controller retries it), so nothing here fights them.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::batch::v1::{CronJob, Job as BatchJob};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use soma_contract::drill::DrillReport as Measured;
use soma_crds::agent::{Agent, AgentSpec};
use soma_crds::common::LocalRef;
use soma_crds::common::condition_types::{COMPLETE, FAILED};
use soma_crds::job::{DrDrill, Job, KUEUE_QUEUE_LABEL, RESULT_LIMIT};
use soma_metering::chain::ChainProblem;
use soma_metering::{BudgetDef, BudgetKey};
use tracing::{Span, field, info, instrument, warn};

use super::children::{
    DRILL_CONTAINER, DrillChildren, DrillRun, DrillSettings, FIELD_MANAGER, JOB_LABEL,
    POD_JOB_NAME_LABEL, Task, drill_children, run_identity, task_children,
};
use super::queue::{Contender, may_start};
use super::status::{
    Block, JobObserved, Outcome, Run, Schedule, Wait, bounded, finished, job_status, phase,
};
use crate::agent::image::{IMAGE_NOT_VERIFIED, pin, verify_cached};
use crate::apply::{apply, ensure};
use crate::budget::def::{Chain, resolve_chain};
use crate::budget::index::Walked;
use crate::capsule::refs::{CapsuleRef, capsule_refs};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::policy::check::PolicyCheck;
use crate::reconciler;
use crate::workload::AGENT_CONTAINER;
use crate::workload::vault::{LEDGER_CREDENTIALS_UNUSABLE, ledger_credentials};

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "job";

/// How often a running task's usage is read again from the ledger.
const USAGE_REFRESH: Duration = Duration::from_secs(30);
/// How often a drill waiting for a Secret looks again (Secrets are not watched: the operator
/// reads only the ones it is told about).
const SECRET_RECHECK: Duration = Duration::from_secs(60);
/// How often a Job held back by a rolling-period Budget looks again (it has no reset time;
/// the Budget's status change wakes it sooner).
const ROLLING_RECHECK: Duration = Duration::from_secs(60);

/// What to do after a reconcile that did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// Wait for a change (a watch wakes it).
    Change,
    /// Look again after this long.
    After(Duration),
    /// A transient refusal (policy evaluation, registry): retry with backoff.
    Retry,
}

/// What converging found, and when to look again.
struct Converged {
    obs: JobObserved,
    next: Next,
}

impl Converged {
    fn blocked(mut obs: JobObserved, reason: &str, message: String) -> Converged {
        obs.block = Some(Block {
            reason: reason.to_owned(),
            message,
        });
        Converged {
            obs,
            next: Next::Change,
        }
    }
}

/// Whether `job`'s last status says it waits for a slot (it is a contender for the next).
pub fn waits_for_slot(job: &Job) -> bool {
    job.spec.queue_name.is_none()
        && job.spec.dr_drill.is_none()
        && job.status.as_ref().is_some_and(|s| {
            s.phase.as_deref() == Some(phase::WAITING)
                && reconciler::ready::<Job>(Some(s)).is_some_and(|c| c.reason == "ConcurrencyLimit")
        })
}

/// Reconciles one Job.
#[instrument(skip(job, ctx), fields(namespace = field::Empty, job = %job.name_any(), phase = field::Empty))]
pub async fn reconcile(job: Arc<Job>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let namespace = job
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    Span::current().record("namespace", namespace.as_str());
    if job.meta().deletion_timestamp.is_some() {
        // Children carry the Job as controller owner: the garbage collector removes them.
        return Ok(Action::await_change());
    }
    let now = ctx.clock.now();
    let key = reconciler::key(&*job);
    if let Some(done_at) = finished(job.status.as_ref()) {
        ctx.metrics
            .job(&namespace, &job.name_any(), job.status.as_ref());
        ctx.succeeded(&key);
        return expire(&job, &ctx, &namespace, done_at, now).await;
    }
    let converged = match converge(&job, &ctx, &namespace, now).await {
        Ok(c) => c,
        Err(e) if !e.is_transient() => {
            ctx.metrics.reconcile_failed(CONTROLLER, e.label());
            Converged::blocked(base(&job), e.label(), e.to_string())
        }
        Err(e) => return Err(e),
    };
    let status = write_status(&job, &ctx, &converged.obs, now).await?;
    Span::current().record("phase", status.phase.as_deref().unwrap_or_default());
    ctx.metrics.job(&namespace, &job.name_any(), Some(&status));
    if converged.next == Next::Retry {
        return Ok(Action::requeue(ctx.backoff(&key)));
    }
    ctx.succeeded(&key);
    if let Some(done_at) = finished(Some(&status)) {
        let job = Job {
            status: Some(status.clone()),
            ..(*job).clone()
        };
        return expire(&job, &ctx, &namespace, done_at, now).await;
    }
    Ok(match converged.next {
        Next::Change | Next::Retry => Action::await_change(),
        Next::After(d) => Action::requeue(d),
    })
}

/// The observation every branch starts from.
fn base(job: &Job) -> JobObserved {
    JobObserved {
        generation: job.metadata.generation,
        retries: job.spec.retries,
        ..JobObserved::default()
    }
}

async fn converge(job: &Job, ctx: &Context, namespace: &str, now: Timestamp) -> Result<Converged> {
    match &job.spec.dr_drill {
        Some(drill) => converge_drill(job, drill, ctx, namespace).await,
        None => converge_task(job, ctx, namespace, now).await,
    }
}

/// Reads `name` of kind `K` in `namespace`, if it exists.
async fn read<K>(client: &Client, namespace: &str, name: &str) -> Result<Option<K>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|source| Error::Read {
            what: format!("{} {namespace}/{name}", K::kind(&())),
            source,
        })
}

/// Whether `child` is controlled by `job`.
fn controlled_by<K: Resource>(child: &K, job: &Job) -> bool {
    let uid = job.uid();
    child
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true) && Some(&r.uid) == uid.as_ref())
}

fn name_taken(kind: &str, namespace: &str, name: &str) -> String {
    format!(
        "a {kind} named {name:?} already exists in namespace {namespace:?} and is not this Job's; delete it or give the Job another name"
    )
}

/// What a batch/v1 Job reports.
fn run_of(batch: &BatchJob) -> Run {
    let spec = batch.spec.as_ref();
    let status = batch.status.clone().unwrap_or_default();
    let condition = |type_: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == type_ && c.status == "True")
            .cloned()
    };
    let outcome = match (condition("Complete"), condition("Failed")) {
        (Some(_), _) => Some(Outcome::Succeeded),
        (None, Some(f)) => Some(Outcome::Failed {
            reason: f.reason.unwrap_or_else(|| "Failed".to_owned()),
            message: f.message.unwrap_or_default(),
        }),
        (None, None) => None,
    };
    let ended_at = condition("Complete")
        .or_else(|| condition("Failed"))
        .and_then(|c| c.last_transition_time.map(|t| t.0.to_string()));
    Run {
        suspended: spec.and_then(|s| s.suspend).unwrap_or(false) && outcome.is_none(),
        active: status.active.unwrap_or(0),
        succeeded: status.succeeded.unwrap_or(0),
        failed: status.failed.unwrap_or(0),
        start_time: status.start_time.map(|t| t.0.to_string()),
        completion_time: status.completion_time.map(|t| t.0.to_string()).or(ended_at),
        outcome,
        queue: batch.labels().get(KUEUE_QUEUE_LABEL).cloned(),
    }
}

/// How the latest pod of batch/v1 Job `batch` ended, for `container`: its termination
/// message and, when it failed, its exit.
async fn termination(
    client: &Client,
    namespace: &str,
    batch: &str,
    container: &str,
) -> Result<(Option<String>, Option<String>)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(&format!("{POD_JOB_NAME_LABEL}={batch}")))
        .await
        .map_err(|source| Error::Read {
            what: format!("the pods of batch/v1 Job {namespace}/{batch}"),
            source,
        })?;
    let latest = list.items.into_iter().max_by(|a, b| {
        let t = |p: &Pod| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        t(a).cmp(&t(b))
            .then_with(|| a.name_any().cmp(&b.name_any()))
    });
    let terminated = latest
        .and_then(|p| p.status)
        .and_then(|s| s.container_statuses)
        .and_then(|cs| cs.into_iter().find(|c| c.name == container))
        .and_then(|c| c.state)
        .and_then(|s| s.terminated);
    Ok(match terminated {
        None => (None, None),
        Some(t) => {
            let exit = (t.exit_code != 0).then(|| match &t.reason {
                Some(r) => format!("exit code {} ({r})", t.exit_code),
                None => format!("exit code {}", t.exit_code),
            });
            (t.message.filter(|m| !m.trim().is_empty()), exit)
        }
    })
}

/// What the run used, from the ledger; `None` without one (or when it cannot be read: the
/// status keeps going, the figures come at the next look).
async fn usage(
    ctx: &Context,
    job: &Job,
    namespace: &str,
    currency: &str,
) -> Option<(soma_ledger::spend::RunSpend, String)> {
    let ledger = ctx.ledger.as_ref()?;
    let since = job
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(0, |t| t.0.as_millisecond());
    let pool = match ledger.pool().await {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %e, "the ledger is unavailable; the Job's usage is read later");
            return None;
        }
    };
    match soma_ledger::spend::run_spend(pool, namespace, &run_identity(&job.name_any()), since)
        .await
    {
        Ok(s) => Some((s, currency.to_owned())),
        Err(e) => {
            warn!(error = %e, "reading the Job's usage failed; it is read later");
            None
        }
    }
}

/// The currency a Job's Budget counts in (from its Budget, when it has one).
async fn currency(ctx: &Context, job: &Job, namespace: &str) -> String {
    let name = job.spec.budget_ref.as_ref().map(|b| b.name.clone());
    let name = match name {
        Some(n) => Some(n),
        None => match &job.spec.agent_ref {
            Some(r) => read::<Agent>(&ctx.client, namespace, &r.name)
                .await
                .ok()
                .flatten()
                .and_then(|a| a.spec.budget_ref.map(|b| b.name)),
            None => job
                .spec
                .template
                .as_ref()
                .and_then(|t| t.budget_ref.as_ref().map(|b| b.name.clone())),
        },
    };
    match name {
        Some(n) => read::<soma_crds::Budget>(&ctx.client, namespace, &n)
            .await
            .ok()
            .flatten()
            .map_or_else(|| "USD".to_owned(), |b| b.spec.currency),
        None => "USD".to_owned(),
    }
}

async fn converge_task(
    job: &Job,
    ctx: &Context,
    namespace: &str,
    now: Timestamp,
) -> Result<Converged> {
    let name = job.name_any();
    let mut obs = base(job);
    if let Some(batch) = read::<BatchJob>(&ctx.client, namespace, &name).await? {
        if !controlled_by(&batch, job) {
            let message = name_taken("batch/v1 Job", namespace, &name);
            return Ok(Converged::blocked(obs, "NameTaken", message));
        }
        ctx.jobs.record_chain(namespace, &name, None);
        let run = run_of(&batch);
        if ctx.ledger.is_some() {
            let currency = currency(ctx, job, namespace).await;
            obs.usage = usage(ctx, job, namespace, &currency).await;
        }
        if run.outcome.is_none() {
            // A running Job's pods are told which of their Capsules are revoked (live: the
            // run goes on, recall refuses the Capsule and its folder is withdrawn).
            let revoked = super::revoked::publish(&ctx.client, job, namespace, &ctx.config).await?;
            if !revoked.is_empty() {
                info!(revoked = ?revoked, "the running pods are told to stop using revoked Capsules");
            }
        }
        let next = if run.outcome.is_some() {
            let (result, exit) =
                termination(&ctx.client, namespace, &name, AGENT_CONTAINER).await?;
            obs.result = result.map(|r| bounded(&r, RESULT_LIMIT));
            obs.last_exit = exit;
            Next::Change
        } else if !run.suspended && ctx.ledger.is_some() {
            Next::After(USAGE_REFRESH)
        } else {
            Next::Change
        };
        obs.run = Some(run);
        return Ok(Converged { obs, next });
    }

    let resolved = match resolve_task(job, ctx, namespace).await? {
        Resolution::Runnable(r) => r,
        Resolution::Blocked(block, policy) => {
            obs.policy = policy;
            return Ok(Converged::blocked(obs, &block.reason, block.message));
        }
        Resolution::Retrying(block, policy) => {
            obs.policy = policy;
            obs.retrying = Some(block);
            return Ok(Converged {
                obs,
                next: Next::Retry,
            });
        }
    };
    obs.policy = Some(resolved.policy.clone());
    if let Some((wait, until)) = exhausted(&resolved.chain, now) {
        obs.wait = Some(wait);
        let next = match until {
            // A moment after the reset, so the new period has begun.
            Some(t) => Next::After(
                Duration::try_from(t.duration_since(now)).unwrap_or_default()
                    + Duration::from_millis(500),
            ),
            None => Next::After(ROLLING_RECHECK),
        };
        return Ok(Converged { obs, next });
    }
    // A slot: Kueue's, or the operator's per-namespace limit, decided under the namespace's
    // lock so two reconciles never both take the last one.
    let limit = ctx.config.jobs.concurrency as usize;
    let _slots = if job.spec.queue_name.is_none() && limit > 0 {
        let guard = ctx.jobs.slots(namespace).await;
        let running = running_tasks(&ctx.client, namespace, &name).await?;
        let mut contenders = ctx.jobs.contenders(namespace);
        if !contenders.iter().any(|c| c.name == name) {
            contenders.push(Contender {
                name: name.clone(),
                priority: job.spec.priority,
                created: super::created(job),
            });
        }
        if let Err(no) = may_start(&name, &contenders, running, limit) {
            obs.wait = Some(Wait {
                reason: "ConcurrencyLimit",
                message: format!(
                    "{} of {} task Jobs run in namespace {namespace:?} (the operator's --job-concurrency) and {} waiting Job(s) go first; it starts when a slot is free (name a Kueue queue in spec.queueName to queue it there instead)",
                    no.running, no.limit, no.ahead
                ),
            });
            return Ok(Converged {
                obs,
                next: Next::Change,
            });
        }
        Some(guard)
    } else {
        None
    };
    let task = Task {
        spec: &resolved.spec,
        budget_ref: resolved.budget_ref.as_ref(),
        budgets: resolved.chain.resolution.budgets.clone(),
        pinned_image: resolved.pinned_image.clone(),
        capsules: resolved.capsules.clone(),
    };
    let children = task_children(job, &task, &ctx.config).map_err(|source| Error::Serialize {
        what: "the Job's children",
        source,
    })?;
    let client = &ctx.client;
    let mut writes = usize::from(
        ensure(client, &children.service_account, FIELD_MANAGER)
            .await?
            .1,
    );
    if let Some(secret) = &children.ledger_secret {
        writes += usize::from(ensure(client, secret, FIELD_MANAGER).await?.1);
    }
    writes += usize::from(
        ensure(client, &children.sidecar_config, FIELD_MANAGER)
            .await?
            .1,
    );
    writes += usize::from(
        ensure(client, &children.network_policy, FIELD_MANAGER)
            .await?
            .1,
    );
    let created = apply(client, &children.batch_job, FIELD_MANAGER).await?;
    for _ in 0..=writes {
        ctx.metrics.child_written(CONTROLLER);
    }
    ctx.jobs.record_chain(namespace, &name, None);
    info!(queue = ?job.spec.queue_name, "started the run");
    obs.run = Some(run_of(&created));
    Ok(Converged {
        obs,
        next: Next::Change,
    })
}

/// Task Jobs of `namespace` other than `me` that run (or are about to) outside Kueue.
async fn running_tasks(client: &Client, namespace: &str, me: &str) -> Result<usize> {
    let api: Api<BatchJob> = Api::namespaced(client.clone(), namespace);
    let list = api
        .list(&ListParams::default().labels(&format!(
            "app.kubernetes.io/managed-by=soma-operator,app.kubernetes.io/name=soma-job,{JOB_LABEL}"
        )))
        .await
        .map_err(|source| Error::Read {
            what: format!("the batch/v1 Jobs of namespace {namespace}"),
            source,
        })?;
    Ok(list
        .items
        .iter()
        .filter(|b| b.name_any() != me && !b.labels().contains_key(KUEUE_QUEUE_LABEL))
        .filter(|b| run_of(b).outcome.is_none())
        .count())
}

/// A task Job that can run.
struct Runnable {
    spec: AgentSpec,
    budget_ref: Option<LocalRef>,
    chain: Chain,
    policy: PolicyCheck,
    pinned_image: Option<String>,
    capsules: Vec<crate::capsule::delivery::Delivery>,
}

enum Resolution {
    Runnable(Box<Runnable>),
    /// Only a change by a person helps.
    Blocked(Block, Option<PolicyCheck>),
    /// Worth another try (a policy evaluation or a registry that did not answer).
    Retrying(Block, Option<PolicyCheck>),
}

fn block(reason: &str, message: String) -> Block {
    Block {
        reason: reason.to_owned(),
        message,
    }
}

/// What a task Job would run and under which rules: the Agent it names (or its template),
/// the Budget chain (the one resolver), the Capsules, the policies (re-checked on what would
/// run, as for an Agent), and the image signature when required.
async fn resolve_task(job: &Job, ctx: &Context, namespace: &str) -> Result<Resolution> {
    let client = &ctx.client;
    let name = job.name_any();
    let (spec, subject, agent_field) = match (&job.spec.agent_ref, &job.spec.template) {
        (Some(r), _) => match read::<Agent>(client, namespace, &r.name).await? {
            None => {
                return Ok(Resolution::Blocked(
                    block(
                        "AgentNotFound",
                        format!(
                            "Agent {:?} does not exist in namespace {namespace:?}; create it or correct spec.agentRef. The Job does not start until it exists.",
                            r.name
                        ),
                    ),
                    None,
                ));
            }
            Some(agent) => (
                agent.spec.clone(),
                agent,
                format!("spec.budgetRef of Agent {:?}", r.name),
            ),
        },
        (None, Some(template)) => {
            // The template is checked as the Agent it would be.
            let mut agent = Agent::new(&name, template.clone());
            agent.metadata.namespace = Some(namespace.to_owned());
            (
                template.clone(),
                agent,
                "spec.template.budgetRef".to_owned(),
            )
        }
        (None, None) => {
            return Ok(Resolution::Blocked(
                block(
                    "InvalidSpec",
                    "the Job has neither agentRef nor template nor drDrill; the CRD's rules refuse that: apply the current CRD".to_owned(),
                ),
                None,
            ));
        }
    };
    if let Err(message) = ledger_credentials(&spec, &ctx.config) {
        return Ok(Resolution::Blocked(
            block(
                LEDGER_CREDENTIALS_UNUSABLE,
                format!("{message}. The Job does not start until it is fixed."),
            ),
            None,
        ));
    }
    let (budget_ref, field) = match (&job.spec.budget_ref, &spec.budget_ref) {
        (Some(b), _) => (Some(b.clone()), "spec.budgetRef".to_owned()),
        (None, Some(b)) => (Some(b.clone()), agent_field),
        (None, None) => (None, String::new()),
    };
    let chain = match &budget_ref {
        None => {
            ctx.jobs.record_chain(namespace, &name, None);
            Chain::default()
        }
        Some(b) => {
            let chain =
                resolve_chain(client, &BudgetKey::new(namespace, b.name.clone()), &field).await?;
            ctx.jobs.record_chain(
                namespace,
                &name,
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
            match &chain.resolution.problem {
                None => {}
                Some(ChainProblem::Missing { key, field }) => {
                    return Ok(Resolution::Blocked(
                        block(
                            "BudgetNotFound",
                            format!(
                                "Budget {:?} does not exist in namespace {:?}; create it or correct {field}. The Job does not start until it exists.",
                                key.name, key.namespace
                            ),
                        ),
                        None,
                    ));
                }
                Some(problem) => {
                    return Ok(Resolution::Blocked(
                        block(
                            problem.reason(),
                            format!("{problem}. The Job does not start until the chain is valid."),
                        ),
                        None,
                    ));
                }
            }
            chain
        }
    };
    let mut capsules = Vec::new();
    for (capsule, state) in capsule_refs(client, namespace, &spec.capsules).await? {
        let field = if job.spec.agent_ref.is_some() {
            "the Agent's spec.capsules"
        } else {
            "spec.template.capsules"
        };
        match state {
            CapsuleRef::Ready(delivery) => capsules.extend(delivery),
            CapsuleRef::Missing => {
                return Ok(Resolution::Blocked(
                    block(
                        "CapsuleNotFound",
                        format!(
                            "Capsule {capsule:?} does not exist in namespace {namespace:?}; create it or correct {field}. The Job does not start until it exists."
                        ),
                    ),
                    None,
                ));
            }
            CapsuleRef::NotReady(reason, message, _) => {
                return Ok(Resolution::Blocked(
                    block(
                        "CapsuleNotReady",
                        format!(
                            "Capsule {capsule:?} is not Ready ({reason}: {message}); the Job does not start until it is"
                        ),
                    ),
                    None,
                ));
            }
        }
    }
    // What would run is re-checked against the current policies, as the Agent controller
    // re-checks an Agent: the Agent (or the template as the Agent it would be), charged to the
    // Budget the run is charged to. The Job object itself was checked at admission; a policy
    // reading the inventory (an Agent's Budget) would race the inventory's refresh here.
    let mut subject = subject;
    subject.spec.budget_ref.clone_from(&budget_ref);
    let policy = ctx
        .policy
        .check(&subject)
        .await
        .map_err(|source| Error::Serialize {
            what: "the Job's agent for policy evaluation",
            source,
        })?;
    if policy.blocks {
        let message = format!(
            "{}. The Job does not start until the policies allow it.",
            policy.condition.message
        );
        return Ok(if policy.is_error() {
            Resolution::Retrying(block("PolicyError", message), Some(policy))
        } else {
            Resolution::Blocked(block("PolicyDenied", message), Some(policy))
        });
    }
    let mut pinned_image = None;
    if ctx.config.images.required {
        match verify_cached(
            ctx.images.as_ref(),
            &ctx.verified_images,
            &spec.image,
            ctx.config.images.recheck,
        )
        .await
        {
            Ok(v) => pinned_image = Some(pin(&spec.image, &v.digest)),
            Err(r) => {
                let b = block(IMAGE_NOT_VERIFIED, r.message.clone());
                return Ok(if r.transient {
                    Resolution::Retrying(b, Some(policy))
                } else {
                    Resolution::Blocked(b, Some(policy))
                });
            }
        }
    }
    Ok(Resolution::Runnable(Box::new(Runnable {
        spec,
        budget_ref,
        chain,
        policy,
        pinned_image,
        capsules,
    })))
}

/// The first Budget of the chain whose status says it is exhausted in a period that has not
/// ended by `now`, and when that period ends (`None`: a rolling period).
fn exhausted(chain: &Chain, now: Timestamp) -> Option<(Wait, Option<Timestamp>)> {
    for def in &chain.resolution.budgets {
        let Some(status) = chain
            .objects
            .get(&def.key())
            .and_then(|b| b.status.as_ref())
        else {
            continue;
        };
        let Some(condition) = status
            .conditions
            .iter()
            .find(|c| c.type_ == crate::budget::status::EXHAUSTED && c.status == "True")
        else {
            continue;
        };
        let end = status
            .period_end
            .as_deref()
            .and_then(|e| e.parse::<Timestamp>().ok());
        if end.is_some_and(|end| end <= now) {
            // That period is over: the cap has reset, whatever the status still says.
            continue;
        }
        let when = match status.period_end.as_deref() {
            Some(end) => format!("when its period resets at {end}"),
            None => "when enough of its rolling window's spend has aged out".to_owned(),
        };
        let message = format!(
            "Budget {} is exhausted ({}); the Job starts {when}",
            def.key(),
            condition.message
        );
        return Some((
            Wait {
                reason: "BudgetExhausted",
                message,
            },
            end,
        ));
    }
    None
}

async fn converge_drill(
    job: &Job,
    drill: &DrDrill,
    ctx: &Context,
    namespace: &str,
) -> Result<Converged> {
    let name = job.name_any();
    let client = &ctx.client;
    let mut obs = base(job);
    if let Some(schedule) = &job.spec.schedule {
        if let Some(cron) = read::<CronJob>(client, namespace, &name).await? {
            if !controlled_by(&cron, job) {
                let message = name_taken("batch/v1 CronJob", namespace, &name);
                return Ok(Converged::blocked(obs, "NameTaken", message));
            }
            let status = cron.status.clone().unwrap_or_default();
            obs.schedule = Some(Schedule {
                schedule: schedule.clone(),
                last_schedule_time: status.last_schedule_time.map(|t| t.0.to_string()),
                active: status.active.map_or(0, |a| a.len()),
            });
            obs.drill = last_report(client, namespace, &cron).await?;
            return Ok(Converged {
                obs,
                next: Next::Change,
            });
        }
    } else if let Some(batch) = read::<BatchJob>(client, namespace, &name).await? {
        if !controlled_by(&batch, job) {
            let message = name_taken("batch/v1 Job", namespace, &name);
            return Ok(Converged::blocked(obs, "NameTaken", message));
        }
        let run = run_of(&batch);
        if run.outcome.is_some() {
            let (message, exit) = termination(client, namespace, &name, DRILL_CONTAINER).await?;
            read_report(&mut obs, message, exit);
        }
        obs.run = Some(run);
        return Ok(Converged {
            obs,
            next: Next::Change,
        });
    }

    // Not started: what the drill needs.
    let Some(nats_url) = ctx.config.sidecar.nats_url.clone() else {
        return Ok(Converged::blocked(
            obs,
            "NoStream",
            "the operator has no --nats-url: a drill reconciles the restored ledger against the NATS JetStream copy of every usage record; set the chart's sidecar.natsUrl".to_owned(),
        ));
    };
    if drill.ledger_secret_ref.is_none() && ctx.config.ledger.url.is_none() {
        return Ok(Converged::blocked(
            obs,
            "NoLedger",
            "the operator has no --ledger-url to drill; name the ledger in spec.drDrill.ledgerSecretRef".to_owned(),
        ));
    }
    let secrets = [
        Some((&drill.scratch_secret_ref, "spec.drDrill.scratchSecretRef")),
        drill
            .ledger_secret_ref
            .as_ref()
            .map(|r| (r, "spec.drDrill.ledgerSecretRef")),
    ];
    for (r, field) in secrets.into_iter().flatten() {
        match read::<Secret>(client, namespace, &r.name).await? {
            None => {
                let mut c = Converged::blocked(
                    obs,
                    "SecretNotFound",
                    format!(
                        "Secret {:?} ({field}) does not exist in namespace {namespace:?}; create it or correct {field}. The drill does not start until it exists.",
                        r.name
                    ),
                );
                c.next = Next::After(SECRET_RECHECK);
                return Ok(c);
            }
            Some(s) if !s.data.as_ref().is_some_and(|d| d.contains_key(&r.key)) => {
                let mut c = Converged::blocked(
                    obs,
                    "SecretKeyNotFound",
                    format!(
                        "Secret {:?} has no key {:?} ({field}.key); add it or correct {field}. The drill does not start until it exists.",
                        r.name, r.key
                    ),
                );
                c.next = Next::After(SECRET_RECHECK);
                return Ok(c);
            }
            Some(_) => {}
        }
    }
    let seal_public_key = match &ctx.ledger {
        Some(l) => l.seal.lock().await.as_ref().map(|k| k.public()),
        None => None,
    };
    let settings = DrillSettings {
        operator_ledger_url: ctx
            .config
            .ledger
            .url
            .as_ref()
            .map(|u| u.expose().to_owned()),
        nats_url,
        seal_public_key,
    };
    let DrillChildren {
        ledger_secret,
        network_policy,
        run,
    } = drill_children(job, drill, &settings, &ctx.config);
    let mut writes = 0usize;
    if let Some(secret) = &ledger_secret {
        writes += usize::from(ensure(client, secret, FIELD_MANAGER).await?.1);
    }
    writes += usize::from(ensure(client, &network_policy, FIELD_MANAGER).await?.1);
    match run {
        DrillRun::Once(batch) => {
            let created = apply(client, batch.as_ref(), FIELD_MANAGER).await?;
            obs.run = Some(run_of(&created));
        }
        DrillRun::Scheduled(cron) => {
            let (created, _) = ensure(client, cron.as_ref(), FIELD_MANAGER).await?;
            obs.schedule = Some(Schedule {
                schedule: created.spec.map(|s| s.schedule).unwrap_or_default(),
                ..Schedule::default()
            });
        }
    }
    for _ in 0..=writes {
        ctx.metrics.child_written(CONTROLLER);
    }
    info!(scheduled = job.spec.schedule.is_some(), "started the drill");
    Ok(Converged {
        obs,
        next: Next::Change,
    })
}

/// Reads a drill pod's termination message: the report, or (a drill that could not report)
/// the end of its log as the result.
fn read_report(obs: &mut JobObserved, message: Option<String>, exit: Option<String>) {
    match message
        .as_deref()
        .map(|m| serde_json::from_str::<Measured>(m.trim()))
    {
        Some(Ok(report)) => obs.drill = Some(report),
        Some(Err(_)) => obs.result = message.map(|m| bounded(&m, RESULT_LIMIT)),
        None => {}
    }
    obs.last_exit = exit;
}

/// The report of the latest finished run of a scheduled drill.
async fn last_report(client: &Client, namespace: &str, cron: &CronJob) -> Result<Option<Measured>> {
    let api: Api<BatchJob> = Api::namespaced(client.clone(), namespace);
    let runs = api
        .list(&ListParams::default().labels(&format!("{JOB_LABEL}={}", cron.name_any())))
        .await
        .map_err(|source| Error::Read {
            what: format!("the runs of CronJob {namespace}/{}", cron.name_any()),
            source,
        })?;
    let uid = cron.uid();
    let latest = runs
        .items
        .into_iter()
        .filter(|b| {
            b.owner_references()
                .iter()
                .any(|r| Some(&r.uid) == uid.as_ref())
        })
        .filter(|b| run_of(b).outcome.is_some())
        .max_by_key(|b| {
            (
                b.metadata.creation_timestamp.as_ref().map(|t| t.0),
                b.name_any(),
            )
        });
    let Some(latest) = latest else {
        return Ok(None);
    };
    let (message, _) = termination(client, namespace, &latest.name_any(), DRILL_CONTAINER).await?;
    Ok(message.and_then(|m| serde_json::from_str::<Measured>(m.trim()).ok()))
}

/// Deletes a finished Job once its `ttlSecondsAfterFinished` has passed (its children go with
/// it), or requeues for that moment.
async fn expire(
    job: &Job,
    ctx: &Context,
    namespace: &str,
    done_at: Option<&str>,
    now: Timestamp,
) -> Result<Action> {
    let Some(ttl) = job.spec.ttl_seconds_after_finished else {
        return Ok(Action::await_change());
    };
    let done = done_at
        .and_then(|t| t.parse::<Timestamp>().ok())
        .or_else(|| {
            job.status.as_ref().and_then(|s| {
                s.conditions
                    .iter()
                    .find(|c| (c.type_ == COMPLETE || c.type_ == FAILED) && c.status == "True")
                    .map(|c| c.last_transition_time.0)
            })
        })
        .unwrap_or(now);
    let due = done
        .checked_add(jiff::SignedDuration::from_secs(ttl.max(0)))
        .unwrap_or(done);
    if now >= due {
        let api: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
        match api
            .delete(&job.name_any(), &DeleteParams::background())
            .await
        {
            Ok(_) => info!(
                ttl,
                "deleted the finished Job: its ttlSecondsAfterFinished passed"
            ),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                return Err(Error::Delete {
                    kind: "Job",
                    name: job.name_any(),
                    source,
                });
            }
        }
        ctx.metrics.forget_job(namespace, &job.name_any());
        return Ok(Action::await_change());
    }
    let wait = Duration::try_from(due.duration_since(now)).unwrap_or_default();
    Ok(Action::requeue(wait + Duration::from_millis(100)))
}

/// Writes the status if it changed, with an Event when the phase (or a scheduled drill's last
/// result) changes; returns the status now in force.
async fn write_status(
    job: &Job,
    ctx: &Context,
    obs: &JobObserved,
    now: Timestamp,
) -> Result<soma_crds::JobStatus> {
    let time = Time(now);
    let Some(written) =
        reconciler::write_status(ctx, job, |old| job_status(old, obs, &time)).await?
    else {
        return Ok(job.status.clone().unwrap_or_default());
    };
    let new = &written.new;
    let old_phase = written.old.as_ref().and_then(|s| s.phase.clone());
    let ready = reconciler::ready::<Job>(Some(new));
    let old_ready = reconciler::ready::<Job>(written.old.as_ref());
    let moved = old_phase != new.phase || ready.map(|c| &c.reason) != old_ready.map(|c| &c.reason);
    if moved && let Some(ready) = ready {
        let warning = matches!(new.phase.as_deref(), Some(phase::FAILED | phase::PENDING))
            || ready.reason == "BudgetExhausted";
        let type_ = if warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        let note = match new.phase.as_deref() {
            Some(phase::SUCCEEDED | phase::FAILED) => new
                .conditions
                .iter()
                .find(|c| (c.type_ == COMPLETE || c.type_ == FAILED) && c.status == "True")
                .map_or_else(|| ready.message.clone(), |c| c.message.clone()),
            _ => ready.message.clone(),
        };
        reconciler::publish(ctx, job, type_, &ready.reason, &note, "Run").await;
        if matches!(new.phase.as_deref(), Some(phase::SUCCEEDED | phase::FAILED)) {
            ctx.metrics
                .job_finished(&job.namespace().unwrap_or_default(), new.phase.as_deref());
        }
    }
    // A drill's result, each time a run reports (a scheduled drill's phase stays the same).
    let old_drill = written.old.as_ref().and_then(|s| s.drill.as_ref());
    if let Some(d) = &new.drill
        && old_drill.map(|o| &o.snapshot_time) != Some(&d.snapshot_time)
    {
        let (type_, reason) = if d.outcome == "Passed" {
            (EventType::Normal, "DrillPassed")
        } else {
            (EventType::Warning, "DrillFailed")
        };
        let note = new
            .conditions
            .iter()
            .find(|c| c.type_ == super::status::DRILL_PASSED)
            .map_or_else(String::new, |c| c.message.clone());
        reconciler::publish(ctx, job, type_, reason, &note, "Drill").await;
    }
    info!(phase = ?new.phase, "status updated");
    Ok(written.new)
}

/// The Job controller's error policy (the shared one).
pub fn error_policy(job: Arc<Job>, error: &Error, ctx: Arc<Context>) -> Action {
    reconciler::error_policy(job, error, ctx)
}
