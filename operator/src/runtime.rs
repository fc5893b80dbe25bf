//! Runs the operator: the HTTP server, leader election on a `coordination.k8s.io` Lease, and
//! the controllers (one per watched namespace, or one for all), until SIGTERM or until
//! leadership is lost.
//!
//! Every replica loads the policies and serves the admission webhook; only the Lease holder
//! reconciles and runs the scaling loop ([`crate::autoscale`]).
//!
//! ```text
//!  start ─▶ serve /healthz /readyz /metrics ─▶ policies (load, watch ConfigMaps, inventory)
//!        ─▶ webhook (certificate, HTTPS, configuration) ─▶ wait for the Lease ─▶ run controllers
//!                                               (standby replicas      │
//!                                                wait here)            ├─ SIGTERM: drain, release the Lease, exit 0
//!                                                                      └─ Lease lost: stop, exit 1 (restart and re-contend)
//! ```

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use kube_lease_manager::LeaseManagerBuilder;
use soma_policy::PolicyStore;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::agent::image::{CosignImages, ImageVerifier, Unconfigured};
use crate::capsule::cosign::Cosign;
use crate::config::OperatorConfig;
use crate::context::Context;
use crate::http::{Health, HttpState, Phase, router};
use crate::metrics::Metrics;
use crate::policy::PolicyOptions;
use crate::policy::check::Checker;
use crate::policy::loader::Policies;
use crate::webhook::WebhookOptions;

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Reconcile settings.
    pub config: OperatorConfig,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    pub metrics_addr: SocketAddr,
    /// Contend for a Lease before reconciling.
    pub leader_election: bool,
    /// Name of the Lease.
    pub lease_name: String,
    /// Namespace of the Lease.
    pub lease_namespace: String,
    /// This replica's identity in the Lease (the pod name).
    pub identity: String,
    /// Lease duration in seconds; a standby takes over at most this long after a leader dies.
    pub lease_seconds: u64,
    /// Where policies come from and how they apply.
    pub policy: PolicyOptions,
    /// The admission webhook and the address it binds, unless disabled.
    pub webhook: Option<(WebhookOptions, IpAddr)>,
    /// How Capsule signatures are verified (registries reached over HTTP, keyless roots).
    pub trust: soma_signatures::TrustConfig,
    /// The clock Budget periods are computed with.
    pub clock: crate::context::Clock,
    /// The scaling loop (run by the leader only).
    pub autoscale: crate::autoscale::Options,
    /// The credentials check of Agents with Vault credentials (run by the leader only).
    pub credentials_check: crate::credentials_check::Options,
}

/// How long a replica waits for the first load of the policy ConfigMaps and the inventory
/// before serving the webhook and reconciling (earlier, objects would be judged by the
/// built-ins alone, or against an empty inventory).
const FIRST_POLICY_LOAD: Duration = Duration::from_secs(30);

/// Resolves when `rx` carries `true` (or its sender is gone).
async fn until(mut rx: watch::Receiver<bool>, value: bool) {
    let _ = rx.wait_for(|v| *v == value).await;
}

/// Runs until `shutdown` resolves (Ok) or leadership is lost (Err).
pub async fn run(
    client: Client,
    options: RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    // A trusted root that cannot be read stops start-up here, before anything is served.
    let cosign = Cosign::new(options.trust.clone())
        .map_err(|e| anyhow::anyhow!("Capsule signature verification: {e}"))?;
    // Agent images: only when required; a policy that accepts nobody stops start-up.
    let images: Arc<dyn ImageVerifier> = if options.config.images.required {
        Arc::new(
            CosignImages::new(options.trust.clone(), &options.config.images)
                .map_err(|e| anyhow::anyhow!("agent image signature verification: {e}"))?,
        )
    } else {
        Arc::new(Unconfigured)
    };
    let store = Arc::new(PolicyStore::new());
    let admission = soma_admission::State::new(
        store.clone(),
        soma_admission::Config {
            deadline: options.policy.deadline,
            fail_open: options.policy.fail_open,
            ..soma_admission::Config::default()
        },
    );
    let metrics = Arc::new(Metrics::new(|r| admission.metrics.register(r)));
    let health = Arc::new(Health::default());
    let listener = tokio::net::TcpListener::bind(options.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics address {}", options.metrics_addr))?;
    info!(addr = %options.metrics_addr, "serving /healthz, /readyz and /metrics");
    let (stop_http, http_stopped) = watch::channel(false);
    let app = router(HttpState {
        health: health.clone(),
        metrics: metrics.clone(),
    });
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(until(http_stopped, true))
            .await
    });

    tokio::pin!(shutdown);
    // Start-up may wait (for the first policy load, for cert-manager's Secret); SIGTERM still
    // stops it at once.
    let (policies, background) = tokio::select! {
        started = start_background(&client, &options, &admission) => started?,
        () = &mut shutdown => {
            info!("shutting down during start-up");
            let _ = stop_http.send(true);
            server.await.context("HTTP server task")?.context("HTTP server")?;
            return Ok(());
        }
    };
    // `leading` is true while this replica may reconcile.
    let (lease_task, leading) = if options.leader_election {
        let manager = LeaseManagerBuilder::new(client.clone(), &options.lease_name)
            .with_namespace(&options.lease_namespace)
            .with_identity(&options.identity)
            .with_duration(options.lease_seconds)
            .with_grace(options.lease_seconds.div_ceil(3).max(1))
            // One field manager per replica: server-side apply then refuses a second replica's
            // take-over of a held Lease with a conflict, which is the lock's guard.
            .with_field_manager(format!("soma.dev/leader-election-{}", options.identity))
            .build()
            .await
            .context("setting up leader election")?;
        let (leading, task) = manager.watch().await;
        health.set(Phase::Standby);
        info!(lease = %options.lease_name, namespace = %options.lease_namespace, identity = %options.identity, "waiting for leadership");
        (Some(task), leading)
    } else {
        let (tx, rx) = watch::channel(true);
        std::mem::forget(tx); // always leading; the sender must outlive the receiver
        (None, rx)
    };

    tokio::select! {
        () = until(leading.clone(), true) => {}
        () = &mut shutdown => {
            info!("shutting down before becoming leader");
            return finish(health, stop_http, server, lease_task, leading, background).await;
        }
    }
    health.set(Phase::Leading);
    // Reconcilers start now and check against the current set; later reloads re-check.
    let mut reloads = policies.reloads();
    reloads.mark_unchanged();
    info!(namespaces = ?options.config.namespaces, "leading: starting controllers");

    let mut context = Context::new(client.clone(), options.config.clone(), metrics)
        .with_policy(Checker {
            store,
            deadline: options.policy.deadline,
            fail_open: options.policy.fail_open,
        })
        .with_verifier(Arc::new(cosign))
        .with_image_verifier(images)
        .with_clock(options.clock.clone());
    let mut ledger_tasks = Vec::new();
    if let Some(url) = &options.config.ledger.url {
        let ledger = Arc::new(
            crate::ledger::Ledger::new(url.expose())
                .map_err(|_| anyhow::anyhow!("--ledger-url is not a valid PostgreSQL URL"))?,
        );
        // The seal key is loaded in the background: a Secret that cannot be read yet only
        // delays sealing, never reconciling.
        ledger_tasks.push(tokio::spawn({
            let (ledger, client) = (ledger.clone(), client.clone());
            let (namespace, name) = (
                options.lease_namespace.clone(),
                options.config.ledger.seal_key_secret.clone(),
            );
            async move {
                let mut wait = Duration::from_secs(1);
                loop {
                    match crate::ledger::load_seal_key(&client, &namespace, &name).await {
                        Ok(key) => {
                            *ledger.seal.lock().await = Some(key);
                            return;
                        }
                        Err(e) => warn!(error = %e, "the ledger seal key is not available yet; seals wait"),
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(60));
                }
            }
        }));
        context = context.with_ledger(ledger);
    }
    let ctx = Arc::new(context);
    if let Some(ledger) = ctx.ledger.clone() {
        // Sidecars charging Budgets wake their status refresh, at most once per interval.
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        ledger_tasks.push(tokio::spawn(crate::ledger::follow_usage(
            ledger,
            options.config.ledger.refresh,
            tx,
        )));
        let index = ctx.index.clone();
        ledger_tasks.push(tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                index.refresh(batch);
            }
        }));
    }
    let (stop_controllers, controllers_stopped) = watch::channel(false);
    let scopes = crate::context::scopes(&options.config.namespaces);
    let controllers = futures::future::join_all(scopes.into_iter().flat_map(|ns| {
        [
            tokio::spawn(crate::budget::controller::run(
                ctx.clone(),
                ns.clone(),
                until(controllers_stopped.clone(), true),
            )),
            tokio::spawn(crate::agent::controller::run(
                ctx.clone(),
                ns.clone(),
                until(controllers_stopped.clone(), true),
                reloads.clone(),
            )),
            tokio::spawn(crate::capsule::controller::run(
                ctx.clone(),
                ns.clone(),
                until(controllers_stopped.clone(), true),
                reloads.clone(),
            )),
            tokio::spawn(crate::job::controller::run(
                ctx.clone(),
                ns,
                until(controllers_stopped.clone(), true),
                reloads.clone(),
            )),
        ]
    }));
    // One scaling loop per leader, over every watched namespace; it stops with the controllers.
    let autoscale = tokio::spawn(
        crate::autoscale::Loop::new(ctx.clone(), options.autoscale.clone())
            .run(until(controllers_stopped.clone(), true)),
    );
    // Likewise the credentials check (the `CredentialsUnavailable` condition).
    let credentials_check = tokio::spawn(
        crate::credentials_check::Check::new(ctx.clone(), options.credentials_check.clone())
            .run(until(controllers_stopped.clone(), true)),
    );
    tokio::pin!(controllers);

    let lost = tokio::select! {
        () = &mut shutdown => false,
        () = until(leading.clone(), false) => true,
        _ = &mut controllers => {
            warn!("controllers stopped on their own");
            false
        }
    };
    health.set(Phase::Stopping);
    let _ = stop_controllers.send(true);
    // In-flight reconciles finish; a stuck one does not hold the shutdown forever.
    let _ = tokio::time::timeout(Duration::from_secs(20), controllers).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), autoscale).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), credentials_check).await;
    for task in ledger_tasks {
        task.abort();
    }
    finish(health, stop_http, server, lease_task, leading, background).await?;
    if lost {
        anyhow::bail!(
            "lost the leader lease; exiting so that this replica restarts and contends again"
        );
    }
    Ok(())
}

/// What every replica runs beside the HTTP server, before it contends for the Lease: the
/// policies (built-ins and the directory first, then the ConfigMaps as they are listed and
/// changed), the inventory, and the webhook once both are in place.
async fn start_background(
    client: &Client,
    options: &RunOptions,
    admission: &Arc<soma_admission::State>,
) -> anyhow::Result<(Arc<Policies>, Background)> {
    let policies = Policies::new(admission.store.clone(), admission.metrics.clone());
    let first = policies.load(&[], &options.policy).unwrap_or_default();
    if !first.is_clean() {
        warn!(
            errors = first.errors.len(),
            "some policies did not load; see the warnings above"
        );
    }
    let (stop_background, background_stopped) = watch::channel(false);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "soma-operator".into(),
            instance: Some(options.identity.clone()),
        },
    );
    tokio::spawn(crate::policy::loader::run(
        client.clone(),
        policies.clone(),
        recorder,
        options.policy.clone(),
        until(background_stopped.clone(), true),
    ));
    tokio::spawn(crate::policy::inventory::run(
        client.clone(),
        policies.clone(),
        options.config.namespaces.clone(),
        until(background_stopped.clone(), true),
    ));
    // Serve decisions only with the ConfigMaps' policies and the inventory in place.
    if !policies.wait_synced(FIRST_POLICY_LOAD).await {
        warn!("policy ConfigMaps or inventory not listed yet; serving with what is loaded");
    }
    let webhook = match &options.webhook {
        Some((webhook, bind)) => Some(
            crate::webhook::server::start(
                client.clone(),
                webhook.clone(),
                *bind,
                admission.clone(),
                until(background_stopped, true),
            )
            .await
            .context("starting the admission webhook")?,
        ),
        None => None,
    };
    Ok((
        policies,
        Background {
            stop: stop_background,
            webhook,
        },
    ))
}

/// Tasks every replica runs beside the HTTP server.
struct Background {
    stop: watch::Sender<bool>,
    webhook: Option<tokio::task::JoinHandle<()>>,
}

/// Stops the HTTP server, the webhook and the policy watches, and releases the Lease.
async fn finish(
    health: Arc<Health>,
    stop_http: watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    lease_task: Option<
        tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
    >,
    leading: watch::Receiver<bool>,
    background: Background,
) -> anyhow::Result<()> {
    health.set(Phase::Stopping);
    let _ = background.stop.send(true);
    if let Some(webhook) = background.webhook {
        let _ = tokio::time::timeout(Duration::from_secs(5), webhook).await;
    }
    // Dropping the last receiver ends the lease task, which hands the Lease back.
    drop(leading);
    if let Some(task) = lease_task {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(manager))) => {
                if let Err(e) = manager.release().await {
                    warn!(error = %e, "releasing the Lease failed; it expires on its own");
                }
            }
            Ok(Ok(Err(e))) => warn!(error = %e, "leader election ended with an error"),
            Ok(Err(e)) => warn!(error = %e, "leader election task failed"),
            Err(_) => warn!("leader election did not stop in time"),
        }
    }
    let _ = stop_http.send(true);
    server
        .await
        .context("HTTP server task")?
        .context("HTTP server")?;
    info!("stopped");
    Ok(())
}
