//! The scaling loop: on the leader only, every interval (jittered), for each Agent that
//! autoscales, read its ready pods' load from their sidecars, step its autoscaler, set the
//! Deployment's replicas under the field manager `soma-autoscaler`, and say why in status.
//!
//! ```text
//!  every interval ± 10 % ─► list Agents ─► (at most `concurrency` at once) per Agent:
//!     ready pods ─► GET http://<podIP>:<admin port>/load ─► LoadReport::since(previous) ─► merge
//!     ─► Autoscaler::step (resumed from status.scaling.state after a restart or failover;
//!        with minReplicas 0, the Soma Jobs that reference the Agent as queued work, and a
//!        quiet window when it has no ready pod: that is how it idles to zero and wakes)
//!     ─► SSA spec.replicas as soma-autoscaler (never forced: another owner is a conflict)
//!     ─► brown-out (when no count within maxReplicas meets the target): a new revision only
//!        when it changes ─► the ledger's soma_agent_live row + NOTIFY (its sidecars, within a
//!        second) ─► status.scaling.brownOut, whose revision makes the Agent reconcile render
//!        it into the sidecar's ConfigMap too (Agents without a ledger: the kubelet, ~1 min)
//!     ─► status.scaling + `Scaling` and `BrownOut` conditions (+ an Event when the Scaling
//!        reason changes, and when a brown-out engages or clears) ─► soma_autoscaler_* metrics
//! ```
//!
//! The pure parts (settings, ownership, status) are in [`crate::agent::scaling`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use soma_autoscaler::{Autoscaler, AutoscalerConfig, BudgetRate, LoadSignal, Snapshot};
use soma_contract::load::{LOAD_PATH, LoadReport, merge};
use soma_crds::{Agent, Job};
use soma_metering::BudgetKey;
use tracing::{debug, info, warn};

use crate::agent::brownout::{
    brown_out_of, brown_out_verdict, browned_out, contract_brown_out, next_brown_out,
};
use crate::agent::scaling::{
    AUTOSCALER_MANAGER, Step, autoscaler_config, autoscaler_owns_replicas, budget_rate,
    foreign_replicas_managers, reason_name, scaling_reason, scaling_status, scaling_verdict, wakes,
};
use crate::budget::def::resolve_chain;
use crate::context::{Context, list_watched};
use crate::error::{Error, Result};
use crate::pod_admin::{self, AgentPod, PodAdmin};
use crate::reconciler;

/// How the loop runs: every `interval` (each step jittered by up to ±10 %), `concurrency`
/// Agents at once, each sidecar's `GET /load` within `timeout`.
pub use crate::pod_admin::Polling as Options;

/// What the loop remembers of one Agent between steps.
struct Memory {
    config: AutoscalerConfig,
    scaler: Autoscaler,
    /// The last report of each pod (by UID).
    reports: HashMap<String, LoadReport>,
    /// When this loop last stepped the autoscaler (`None`: not since this leader started).
    last_step_s: Option<f64>,
}

/// The loop's state: an HTTP client for the sidecars and each Agent's memory.
pub struct Loop {
    ctx: Arc<Context>,
    options: Options,
    admin: PodAdmin,
    memory: Mutex<HashMap<String, Memory>>,
}

impl Loop {
    /// A loop with nothing remembered (a new leader): each Agent resumes from its status.
    pub fn new(ctx: Arc<Context>, options: Options) -> Self {
        Self {
            admin: PodAdmin::new(ctx.config.sidecar.admin_port, options.timeout),
            ctx,
            options,
            memory: Mutex::default(),
        }
    }

    /// Steps every autoscaled Agent every interval until `stop` resolves.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        info!(interval = ?self.options.interval, "autoscaling loop started");
        let mut tick: u64 = 0;
        loop {
            tick = tick.wrapping_add(1);
            tokio::select! {
                () = tokio::time::sleep(jittered(self.options.interval, tick)) => {}
                () = &mut stop => break,
            }
            if let Err(e) = self.step_all().await {
                warn!(error = %e, "autoscaling: listing Agents failed; next interval retries");
            }
        }
        info!("autoscaling loop stopped");
    }

    /// One round over every Agent the operator watches.
    pub async fn step_all(&self) -> Result<()> {
        let agents: Vec<Agent> =
            list_watched(&self.ctx.client, &self.ctx.config.namespaces, "Agents").await?;
        let scaled: Vec<Agent> = agents
            .into_iter()
            .filter(|a| {
                a.meta().deletion_timestamp.is_none() && autoscaler_config(&a.spec).is_some()
            })
            .collect();
        // Jobs are read only when some Agent may scale to zero: they are what wakes it.
        let to_zero = scaled
            .iter()
            .any(|a| matches!(autoscaler_config(&a.spec), Some(Ok(c)) if c.min_replicas == 0));
        let jobs = if to_zero {
            self.waking_jobs().await?
        } else {
            HashMap::new()
        };
        let jobs = &jobs;
        let keys: Vec<String> = scaled.iter().map(reconciler::key).collect();
        self.memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|k, _| keys.contains(k));
        let names: Vec<(String, String)> = scaled
            .iter()
            .map(|a| (a.namespace().unwrap_or_default(), a.name_any()))
            .collect();
        self.ctx.metrics.autoscaler_retain(&names);
        self.clear_brown_outs(&names).await;
        futures::stream::iter(scaled)
            .for_each_concurrent(self.options.concurrency.max(1), |agent| async move {
                if let Err(e) = self.step_agent(&agent, jobs).await {
                    warn!(agent = %reconciler::key(&agent), error = %e, "autoscaling step failed");
                }
            })
            .await;
        Ok(())
    }

    /// The Soma Jobs that wake an Agent ([`wakes`]), by the Agent's `namespace/name`,
    /// names sorted. A failure fails the round: without it the loop could idle out an Agent
    /// that has work waiting.
    async fn waking_jobs(&self) -> Result<HashMap<String, Vec<String>>> {
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        let jobs: Vec<Job> =
            list_watched(&self.ctx.client, &self.ctx.config.namespaces, "Jobs").await?;
        for job in jobs.iter().filter(|j| wakes(j)) {
            if let (Some(ns), Some(agent)) = (job.namespace(), job.spec.agent_ref.as_ref()) {
                out.entry(format!("{ns}/{}", agent.name))
                    .or_default()
                    .push(job.name_any());
            }
        }
        out.values_mut().for_each(|names| names.sort());
        Ok(out)
    }

    /// The most traffic the Agent's Budget chain lets through ([`budget_rate`]). A chain that
    /// cannot be read now sets no cap for this step (logged): the replicas the load needs are
    /// never withheld on a failed read.
    async fn budget_rate(&self, agent: &Agent, namespace: &str) -> BudgetRate {
        let Some(budget) = agent.spec.budget_ref.as_ref() else {
            return BudgetRate::default();
        };
        let start = BudgetKey::new(namespace, budget.name.clone());
        match resolve_chain(&self.ctx.client, &start, "spec.budgetRef").await {
            Ok(chain) => budget_rate(&chain.resolution.budgets),
            Err(e) => {
                tracing::warn!(agent = %agent.name_any(), namespace, error = %e, "reading the Agent's Budget chain failed; no Budget cap this step");
                BudgetRate::default()
            }
        }
    }

    /// One step of one Agent.
    async fn step_agent(&self, agent: &Agent, jobs: &HashMap<String, Vec<String>>) -> Result<()> {
        let config = match autoscaler_config(&agent.spec) {
            None => return Ok(()),
            Some(Ok(config)) => config,
            Some(Err(e)) => {
                self.forget(agent);
                let step = Step::Invalid {
                    message: e.to_string(),
                };
                let now = Time(self.ctx.clock.now());
                return self.write_status(agent, &step, &now).await;
            }
        };
        let namespace = agent
            .namespace()
            .ok_or(Error::MissingField("metadata.namespace"))?;
        let name = agent.name_any();
        let deployments: Api<Deployment> = Api::namespaced(self.ctx.client.clone(), &namespace);
        let Some(deployment) = deployments
            .get_opt(&name)
            .await
            .map_err(|source| Error::Read {
                what: format!("Deployment {namespace}/{name}"),
                source,
            })?
        else {
            return Ok(()); // the Agent reconcile has not created it (or is held back)
        };
        let current = deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1);
        let pods = self.ready_pods(&namespace, &name).await?;
        let ready = i32::try_from(pods.len()).unwrap_or(i32::MAX);
        let reports = self.reports(&pods).await;
        let reporting = i32::try_from(reports.len()).unwrap_or(i32::MAX);
        let now = Time(self.ctx.clock.now());
        let now_s = now.0.as_millisecond() as f64 / 1000.0;
        let may_idle = config.min_replicas == 0;
        let jobs = if may_idle {
            jobs.get(&format!("{namespace}/{name}"))
                .cloned()
                .unwrap_or_default()
        } else {
            Vec::new()
        };

        let mut memory = self.take_memory(agent, config, current);
        memory
            .scaler
            .set_budget_rate(self.budget_rate(agent, &namespace).await);
        let step = if reports.is_empty() && may_idle && ready == 0 {
            // No pod to measure (scaled to zero, or starting from it): a quiet window. What
            // wakes the Agent is the Jobs that reference it.
            let signal = LoadSignal {
                window_s: memory
                    .last_step_s
                    .map_or(self.options.interval.as_secs_f64(), |t| {
                        (now_s - t).max(0.0)
                    }),
                ..LoadSignal::default()
            };
            self.decide(
                &mut memory,
                &signal,
                &deployment,
                current,
                now_s,
                0,
                jobs,
                agent,
                now.0.as_millisecond(),
            )
            .await?
        } else if reports.is_empty() {
            Step::NoSignal { ready, current }
        } else if memory.reports.is_empty() && memory.last_step_s.is_none() {
            // The first reading since this leader started: reports are cumulative, so the next
            // step measures the traffic in between.
            Step::Baseline { reporting }
        } else {
            let signals: Vec<_> = reports
                .iter()
                .map(|(uid, r)| r.since(memory.reports.get(uid)))
                .collect();
            let signal = merge(&signals);
            self.decide(
                &mut memory,
                &signal,
                &deployment,
                current,
                now_s,
                reporting,
                jobs,
                agent,
                now.0.as_millisecond(),
            )
            .await?
        };
        memory.reports = reports.into_iter().collect();
        self.memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(reconciler::key(agent), memory);
        if let Step::Decided {
            decision,
            current,
            applied,
            brown_out,
            brown_out_revision,
            ..
        } = &step
        {
            if applied != current {
                info!(agent = %reconciler::key(agent), from = current, to = applied, reason = ?decision.reason, "scaled");
            }
            if let Some(revision) = brown_out_revision {
                self.publish_brown_out(&namespace, &name, *revision, brown_out.as_ref())
                    .await;
            }
            let direction = match decision.desired_replicas.cmp(&decision.previous_replicas) {
                std::cmp::Ordering::Greater => "up",
                std::cmp::Ordering::Less => "down",
                std::cmp::Ordering::Equal => "none",
            };
            self.ctx.metrics.autoscaler_decided(
                &namespace,
                &name,
                decision.conductance,
                i64::from(decision.desired_replicas),
                direction,
                reason_name(decision.reason),
                brown_out.as_ref().map_or(0.0, |b| b.fraction),
            );
        }
        self.write_status(agent, &step, &now).await
    }

    /// Steps the autoscaler with `signal` and applies its count (unless another manager owns
    /// `spec.replicas`).
    #[allow(clippy::too_many_arguments)]
    async fn decide(
        &self,
        memory: &mut Memory,
        signal: &LoadSignal,
        deployment: &Deployment,
        current: i32,
        now_s: f64,
        reporting: i32,
        jobs: Vec<String>,
        agent: &Agent,
        now_ms: i64,
    ) -> Result<Step> {
        let previous = agent.status.as_ref().and_then(|s| s.scaling.as_ref());
        let downgrade_model = agent.spec.scaling.brown_out_model.as_deref();
        let namespace = deployment.namespace().unwrap_or_default();
        let name = deployment.name_any();
        let current_u = u32::try_from(current).unwrap_or(0);
        if memory.scaler.replicas() != current_u {
            memory.scaler.observe_replicas(current_u);
        }
        memory
            .scaler
            .set_queued_work(u64::try_from(jobs.len()).unwrap_or(u64::MAX));
        let decision = memory.scaler.step(now_s, signal);
        memory.last_step_s = Some(now_s);
        let desired = i32::try_from(decision.desired_replicas).unwrap_or(i32::MAX);
        let foreign = foreign_replicas_managers(deployment);
        if !foreign.is_empty() {
            memory.scaler.observe_replicas(current_u);
            return Ok(Step::Conflict {
                managers: foreign,
                current,
            });
        }
        // Until the autoscaler co-owns spec.replicas, it applies the current count (no
        // conflict with soma.dev/agent, which applies the same value).
        let owned = autoscaler_owns_replicas(deployment);
        let target = if owned { desired } else { current };
        let applied = if target != current || !owned {
            self.apply_replicas(&namespace, &name, target).await?
        } else {
            Ok(current)
        };
        match applied {
            Ok(applied) => {
                memory
                    .scaler
                    .observe_replicas(u32::try_from(applied).unwrap_or(0));
                let (brown_out, brown_out_revision) = next_brown_out(
                    previous,
                    brown_out_of(decision.brown_out.as_ref(), downgrade_model),
                    now_ms,
                );
                Ok(Step::Decided {
                    state: serde_json::to_value(memory.scaler.snapshot()).map_err(|source| {
                        Error::Serialize {
                            what: "the autoscaler's state",
                            source,
                        }
                    })?,
                    decision: Box::new(decision),
                    current,
                    applied,
                    reporting,
                    scaled: applied != current,
                    jobs,
                    brown_out,
                    brown_out_revision,
                })
            }
            Err(managers) => {
                memory.scaler.observe_replicas(current_u);
                Ok(Step::Conflict { managers, current })
            }
        }
    }

    /// Drops what the loop remembers of an Agent.
    fn forget(&self, agent: &Agent) {
        self.memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&reconciler::key(agent));
    }

    /// The Agent's memory: kept from the last step, else resumed from its status (a new
    /// leader), else new; settings edited since are applied.
    fn take_memory(&self, agent: &Agent, config: AutoscalerConfig, current: i32) -> Memory {
        let kept = self
            .memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&reconciler::key(agent));
        let current = u32::try_from(current).unwrap_or(0);
        match kept {
            Some(m) if m.config == config => m,
            Some(m) => Memory {
                config,
                scaler: Autoscaler::resume(config, m.scaler.snapshot())
                    .unwrap_or_else(|_| fresh(config, current)),
                reports: m.reports,
                last_step_s: m.last_step_s,
            },
            None => {
                let saved = agent
                    .status
                    .as_ref()
                    .and_then(|s| s.scaling.as_ref())
                    .and_then(|s| s.state.clone())
                    .and_then(|v| serde_json::from_value::<Snapshot>(v).ok());
                let scaler = saved
                    .and_then(|s| Autoscaler::resume(config, s).ok())
                    .unwrap_or_else(|| fresh(config, current));
                Memory {
                    config,
                    scaler,
                    reports: HashMap::new(),
                    last_step_s: None,
                }
            }
        }
    }

    /// The Agent's pods that are Ready, have an IP and are not being deleted.
    async fn ready_pods(&self, namespace: &str, agent: &str) -> Result<Vec<AgentPod>> {
        let mut pods = self.admin.pods(&self.ctx.client, namespace, agent).await?;
        pods.retain(|p| p.ready);
        Ok(pods)
    }

    /// The reports of the pods whose sidecar answered, by pod UID.
    async fn reports(&self, pods: &[AgentPod]) -> Vec<(String, LoadReport)> {
        futures::stream::iter(pods.iter().cloned())
            .map(|pod| async move {
                match self
                    .admin
                    .get_json::<LoadReport>(&pod, LOAD_PATH, pod_admin::success)
                    .await
                {
                    Ok(r) => Some((pod.uid, r)),
                    Err(e) => {
                        debug!(pod = %pod.name, ip = %pod.ip, error = %e, "no load report");
                        None
                    }
                }
            })
            .buffer_unordered(16)
            .filter_map(|r| async move { r })
            .collect()
            .await
    }

    /// Applies `spec.replicas` as `soma-autoscaler`, without force: `Err(managers)` when
    /// another manager owns the field with another value.
    async fn apply_replicas(
        &self,
        namespace: &str,
        name: &str,
        replicas: i32,
    ) -> Result<std::result::Result<i32, Vec<String>>> {
        let api: Api<Deployment> = Api::namespaced(self.ctx.client.clone(), namespace);
        let patch = serde_json::json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": replicas},
        });
        match api
            .patch(
                name,
                &PatchParams::apply(AUTOSCALER_MANAGER),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(d) => Ok(Ok(d.spec.and_then(|s| s.replicas).unwrap_or(replicas))),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Err(conflicting_managers(&e.message))),
            Err(source) => Err(Error::Apply {
                kind: "Deployment",
                name: name.to_owned(),
                source,
            }),
        }
    }

    /// Writes `status.scaling` and the `Scaling` condition (only when they changed), and an
    /// Event when the condition's reason changes.
    async fn write_status(&self, agent: &Agent, step: &Step, now: &Time) -> Result<()> {
        let generation = agent.metadata.generation;
        let Some(written) = reconciler::write_status(&self.ctx, agent, |old| {
            scaling_status(old, step, generation, now)
        })
        .await?
        else {
            return Ok(());
        };
        let before = scaling_reason(written.old.as_ref());
        let after = scaling_reason(Some(&written.new));
        if before != after
            && let Some(v) = scaling_verdict(step)
        {
            let type_ = if v.status {
                EventType::Normal
            } else {
                EventType::Warning
            };
            reconciler::publish(&self.ctx, agent, type_, &v.reason, &v.message, "Scale").await;
        }
        if browned_out(written.old.as_ref()) != browned_out(Some(&written.new))
            && let Some(v) = brown_out_verdict(step)
        {
            let (type_, reason) = if v.status {
                (EventType::Warning, v.reason.clone())
            } else {
                (EventType::Normal, "BrownOutCleared".to_owned())
            };
            reconciler::publish(&self.ctx, agent, type_, &reason, &v.message, "BrownOut").await;
        }
        Ok(())
    }

    /// Publishes an Agent's brown-out decision in the ledger, where its sidecars follow it
    /// within a second (a no-op when the row already holds it). Without a ledger, or when the
    /// write fails, the sidecars take it from their ConfigMap instead; the next step retries.
    async fn publish_brown_out(
        &self,
        namespace: &str,
        name: &str,
        revision: i64,
        brown_out: Option<&soma_crds::agent::BrownOutStatus>,
    ) {
        let Some(ledger) = &self.ctx.ledger else {
            return;
        };
        let live = soma_ledger::live::AgentLive {
            revision,
            brown_out: brown_out.map(contract_brown_out),
        };
        let written = match ledger.pool().await {
            Ok(pool) => soma_ledger::live::publish_agent(pool, namespace, name, &live)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match written {
            Ok(true) => {
                info!(agent = %format!("{namespace}/{name}"), revision, brown_out = ?live.brown_out.as_ref().map(|b| b.fraction), "brown-out published");
            }
            Ok(false) => {}
            Err(e) => {
                self.ctx.metrics.ledger_error("live");
                warn!(agent = %format!("{namespace}/{name}"), error = %e, "publishing the brown-out in the ledger failed; the ConfigMap carries it, the next step retries");
            }
        }
    }

    /// Clears the ledger's brown-out of every Agent in the watched namespaces that no longer
    /// autoscales (deleted, or its range closed), so no sidecar keeps shedding for it.
    async fn clear_brown_outs(&self, scaled: &[(String, String)]) {
        let Some(ledger) = &self.ctx.ledger else {
            return;
        };
        let Ok(pool) = ledger.pool().await else {
            return; // reported by the steps that need it
        };
        let rows = match soma_ledger::live::agents_browned_out(pool).await {
            Ok(rows) => rows,
            Err(e) => {
                self.ctx.metrics.ledger_error("live");
                warn!(error = %e, "reading the ledger's brown-outs failed");
                return;
            }
        };
        let watched = &self.ctx.config.namespaces;
        let now = self.ctx.clock.now().as_millisecond();
        for (namespace, name, revision) in rows {
            if (!watched.is_empty() && !watched.contains(&namespace))
                || scaled.iter().any(|(n, a)| *n == namespace && *a == name)
            {
                continue;
            }
            let live = soma_ledger::live::AgentLive {
                revision: now.max(revision + 1),
                brown_out: None,
            };
            match soma_ledger::live::publish_agent(pool, &namespace, &name, &live).await {
                Ok(_) => {
                    info!(agent = %format!("{namespace}/{name}"), "brown-out of an Agent that no longer autoscales cleared")
                }
                Err(e) => {
                    self.ctx.metrics.ledger_error("live");
                    warn!(agent = %format!("{namespace}/{name}"), error = %e, "clearing a brown-out failed; the next step retries");
                }
            }
        }
    }
}

fn fresh(config: AutoscalerConfig, current: u32) -> Autoscaler {
    // Settings came through autoscaler_config, whose output validates; a failure would be a bug
    // there, and the defaults are the safe answer.
    Autoscaler::new(config, current).unwrap_or_else(|_| {
        Autoscaler::new(AutoscalerConfig::default(), current)
            .unwrap_or_else(|_| unreachable!("the default settings are valid"))
    })
}

/// The interval moved by up to ±10 %, differently each tick (no two operators, and no two
/// ticks, line up with a periodic load).
fn jittered(interval: Duration, tick: u64) -> Duration {
    let seed = tick
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(u64::from(std::process::id()));
    let unit = (seed >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
    interval.mul_f64(0.9 + 0.2 * unit)
}

/// The managers a 409 apply conflict names (`conflict with "kubectl": .spec.replicas`).
fn conflicting_managers(message: &str) -> Vec<String> {
    let mut out: Vec<String> = message
        .split("conflict with \"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .map(str::to_owned)
        .collect();
    out.dedup();
    if out.is_empty() {
        out.push("another field manager".to_owned());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent() {
        let i = Duration::from_secs(15);
        for tick in 0..1000 {
            let j = jittered(i, tick);
            assert!(j >= i.mul_f64(0.9) && j <= i.mul_f64(1.1), "{j:?}");
        }
    }

    #[test]
    fn conflicts_name_their_managers() {
        assert_eq!(
            conflicting_managers(
                "Apply failed with 1 conflict: conflict with \"kubectl\" using apps/v1: .spec.replicas"
            ),
            vec!["kubectl".to_owned()]
        );
        assert_eq!(
            conflicting_managers("nope"),
            vec!["another field manager".to_owned()]
        );
    }
}
