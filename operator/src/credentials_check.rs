//! The credentials check: on the leader only, every interval, for each Agent whose provider key
//! comes from Vault, ask every one of its pods' sidecars (ready or not: a sidecar without a key
//! is not ready) `GET /readyz`, and set the Agent's `CredentialsUnavailable` condition from what
//! they say, with Vault's own reason (or, for `ledgerCredentials`, a `Ledger…` reason when a
//! sidecar holds no ledger user). A Warning Event is published when it turns True.
//!
//! ```text
//!  every interval ─► list Agents with credentials.vault ─► (at most `concurrency` at once):
//!     pods (PodAdmin) ─► GET http://<podIP>:<admin port>/readyz (200 or 503, both read)
//!     ─► agent::credentials::credentials_verdict ─► status (written only when it changed)
//! ```
//!
//! The sidecar builds its reason and message without any secret (contract `readiness`), so
//! the condition carries none either.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use soma_contract::readiness::{READYZ_PATH, Readiness};
use soma_crds::Agent;
use tracing::{debug, info, warn};

use crate::agent::credentials::{
    CREDENTIALS_UNAVAILABLE, credentials_status, credentials_verdict, uses_vault,
};
use crate::context::{Context, list_watched};
use crate::error::{Error, Result};
use crate::pod_admin::{self, PodAdmin};
use crate::reconciler;

/// How the check runs: every `interval`, `concurrency` Agents at once, each sidecar's
/// `GET /readyz` within `timeout`.
pub use crate::pod_admin::Polling as Options;

/// The check's state: the admin-port client.
pub struct Check {
    ctx: Arc<Context>,
    options: Options,
    admin: PodAdmin,
}

impl Check {
    /// A check over the Agents `ctx` watches.
    pub fn new(ctx: Arc<Context>, options: Options) -> Self {
        Self {
            admin: PodAdmin::new(ctx.config.sidecar.admin_port, options.timeout),
            ctx,
            options,
        }
    }

    /// Checks every interval until `stop` resolves.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        info!(interval = ?self.options.interval, "credentials check started");
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.options.interval) => {}
                () = &mut stop => break,
            }
            if let Err(e) = self.check_all().await {
                warn!(error = %e, "credentials check: listing Agents failed; next interval retries");
            }
        }
        info!("credentials check stopped");
    }

    /// One round over every Agent with Vault credentials.
    pub async fn check_all(&self) -> Result<()> {
        let agents = list_watched::<Agent>(&self.ctx.client, &self.ctx.config.namespaces, "Agents")
            .await?
            .into_iter()
            .filter(|a| a.meta().deletion_timestamp.is_none() && uses_vault(a));
        futures::stream::iter(agents)
            .for_each_concurrent(self.options.concurrency.max(1), |agent| async move {
                if let Err(e) = self.check_agent(&agent).await {
                    warn!(agent = %reconciler::key(&agent), error = %e, "credentials check failed");
                }
            })
            .await;
        Ok(())
    }

    /// Asks one Agent's sidecars and writes the condition when it changed.
    async fn check_agent(&self, agent: &Agent) -> Result<()> {
        let namespace = agent
            .namespace()
            .ok_or(Error::MissingField("metadata.namespace"))?;
        let pods = self
            .admin
            .pods(&self.ctx.client, &namespace, &agent.name_any())
            .await?;
        let answers: Vec<(String, std::result::Result<Readiness, String>)> =
            futures::stream::iter(pods.iter().cloned())
                .map(|pod| async move {
                    let r = self
                        .admin
                        .get_json::<Readiness>(&pod, READYZ_PATH, pod_admin::success_or_unavailable)
                        .await;
                    if let Err(e) = &r {
                        debug!(pod = %pod.name, ip = %pod.ip, error = %e, "no readiness answer");
                    }
                    (pod.name, r)
                })
                .buffer_unordered(16)
                .collect()
                .await;
        let Some(v) = credentials_verdict(&answers) else {
            return Ok(());
        };
        let now = Time(self.ctx.clock.now());
        let generation = agent.metadata.generation;
        let Some(written) = reconciler::write_status(&self.ctx, agent, |old| {
            credentials_status(old, &v, generation, &now)
        })
        .await?
        else {
            return Ok(());
        };
        let was = written.old.as_ref().and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == CREDENTIALS_UNAVAILABLE)
                .map(|c| (c.status.clone(), c.reason.clone()))
        });
        let now_is = (
            if v.status { "True" } else { "False" }.to_owned(),
            v.reason.clone(),
        );
        if was.as_ref() != Some(&now_is) && (v.status || was.is_some()) {
            let type_ = if v.status {
                EventType::Warning
            } else {
                EventType::Normal
            };
            info!(agent = %reconciler::key(agent), reason = %v.reason, unavailable = v.status, "credentials condition changed");
            reconciler::publish(
                &self.ctx,
                agent,
                type_,
                &v.reason,
                &v.message,
                "CheckCredentials",
            )
            .await;
        }
        Ok(())
    }
}
