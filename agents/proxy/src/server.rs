//! Start-up and the two routers: the proxy (loopback) and the admin listener
//! (`/healthz`, `/metrics`, `/load`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use crate::authority::{Authority, ChainError, plan};
use crate::brownout::BrownOutGate;
use crate::budgets::Budgets;
use crate::cluster::ClusterAuthority;
use crate::config::{AuthorityConfig, Config, Credentials};
use crate::endpoint::Endpoint;
use crate::error::ProxyError;
use crate::handler;
use crate::keys::{KeyHolder, Problem, Reason};
use crate::ledger_access::LedgerAccess;
use crate::load::LoadMeter;
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Sink};
use crate::state::AppState;
use crate::upstream::{self, ProviderKey};
use crate::vault::{self, VaultSource};
use soma_contract::LedgerCredentials;

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The client token's variable is unset or empty.
    #[error(
        "environment variable {0} (clientTokenEnv) is unset or empty: refusing to serve unauthenticated"
    )]
    ClientToken(String),
    /// The key file could not be read.
    #[error("cannot read the provider key file {path}")]
    KeyFile {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The Budget chain is invalid.
    #[error("invalid budget definitions")]
    Budgets(#[from] ChainError),
    /// The outbox could not be opened or replayed.
    #[error("cannot open the outbox {path}")]
    Outbox {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: sqlx::Error,
    },
    /// The ledger URL does not parse (its text, which may hold a password, is not repeated).
    #[error("databaseUrl is not a valid PostgreSQL URL")]
    Ledger,
    /// `authority: postgres` without `databaseUrl`.
    #[error("authority.postgres needs databaseUrl (the PostgreSQL holding the Budget leases)")]
    AuthorityDatabase,
    /// `provider.upstream` cannot be used.
    #[error("{0}")]
    Upstream(String),
    /// TLS setup.
    #[error("cannot set up TLS for the upstream client")]
    Tls(#[from] rustls::Error),
    /// A listener could not bind.
    #[error("cannot listen on {addr}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The provider key the configuration points at: read from its file now, or (Vault) pending
/// until [`start`]'s first fetch. A Vault that cannot be read is not a start failure: the
/// sidecar serves 503s and `/readyz` says why (crate::keys).
pub fn read_key(credentials: &Credentials) -> Result<KeyHolder, StartError> {
    match credentials {
        Credentials::None => Ok(KeyHolder::with_key(ProviderKey::new(None))),
        Credentials::File(path) => std::fs::read_to_string(path)
            .map(|k| KeyHolder::with_key(ProviderKey::new(Some(k))))
            .map_err(|source| StartError::KeyFile {
                path: path.clone(),
                source,
            }),
        Credentials::Vault(_) => Ok(KeyHolder::pending(Problem::new(
            Reason::VaultPending,
            "the first read of the provider key from Vault has not finished",
        ))),
    }
}

/// Builds the shared state: key, client, budget chain, outbox (recovering interrupted rows and
/// replaying spend into the authority).
pub async fn state(config: Config, client_token: String) -> Result<Arc<AppState>, StartError> {
    if client_token.trim().is_empty() {
        return Err(StartError::ClientToken(config.client_token_env.clone()));
    }
    let keys = read_key(&config.credentials)?;
    let upstream =
        upstream::Upstream::parse(&config.provider.upstream).map_err(StartError::Upstream)?;
    let client = upstream::client(Duration::from_millis(config.timeouts.connect_ms))?;
    let outbox_err = |source| StartError::Outbox {
        path: config.outbox_path.clone(),
        source,
    };
    let outbox = Outbox::open(&config.outbox_path)
        .await
        .map_err(outbox_err)?;
    let plan = plan(config.budget_key().as_ref(), &config.budgets);
    if let Some(problem) = &plan.problem {
        // Not a start failure: the ledger may hold the missing definition, or the operator
        // may write it soon. Metered requests are refused (fail closed) until it resolves.
        tracing::warn!(problem = %problem, "the Budget chain cannot be enforced yet; metered requests are refused until it can");
    }
    let ledger = match config.database_url.as_deref() {
        Some(url) => Some(LedgerAccess::new(url).map_err(|_| StartError::Ledger)?),
        None if config.ledger_credentials.is_some() => return Err(StartError::Ledger),
        None => None,
    };
    let authority = match &config.authority {
        AuthorityConfig::Embedded => Budgets::Embedded(Authority::new(&plan)?),
        AuthorityConfig::Postgres(pg) => {
            let access = ledger.as_ref().ok_or(StartError::AuthorityDatabase)?;
            let pool = access.pool(4, Duration::from_secs(2));
            // The holder name lives in the outbox: a restart on the same file takes its lease back.
            let holder = outbox.holder_id().await.map_err(outbox_err)?;
            let ttl = pg.lease_ttl_ms.max(300);
            let terms = crate::lease::Terms {
                holder,
                namespace: config.agent.namespace.clone(),
                agent: config.agent.name.clone(),
                ttl: Duration::from_millis(ttl),
                reclaim_after: Duration::from_millis(
                    pg.reclaim_after_ms.unwrap_or(ttl.saturating_mul(10)),
                ),
            };
            Budgets::Cluster(Box::new(ClusterAuthority::new(&plan, pool, terms)?))
        }
    };
    let now = jiff::Timestamp::now();
    let recovered = outbox.recover_interrupted(now).await.map_err(outbox_err)?;
    if recovered > 0 {
        tracing::warn!(
            recovered,
            "settled requests a previous run left open, at their worst case"
        );
    }
    if authority.is_budgeted() {
        let rows = outbox
            .spend_since(authority.replay_since(now))
            .await
            .map_err(outbox_err)?;
        authority.replay(&rows, None);
    }
    tokio::task::spawn_blocking(soma_metering::tokens::warm)
        .await
        .unwrap_or_default();
    let mut metrics = Metrics::new(&config.agent.namespace, &config.agent.name);
    metrics.credentials_ready(keys.readiness().ready);
    if let Budgets::Cluster(c) = &authority {
        metrics.register_lease_transactions(c.transactions());
    }
    let load = LoadMeter::new();
    metrics.register_load(load.clone());
    let brown_out = BrownOutGate::default();
    if let Err(why) = brown_out.set_checked(config.brown_out.clone(), &load, config.prices.as_ref())
    {
        tracing::warn!(reason = %why, "the configuration's brown-out is refused; starting without one");
    }
    // Reading and hashing the delivered bundles is file work: off the async workers.
    let (list, settings) = (config.capsules.clone(), config.recall.clone());
    let capsules =
        tokio::task::spawn_blocking(move || crate::recall::Shelf::load(&list, &settings))
            .await
            .unwrap_or_default();
    capsules.set_revoked(&config.revoked_capsules);
    Ok(Arc::new(AppState {
        load,
        brown_out,
        capsules,
        in_flight: Arc::new(tokio::sync::Semaphore::new(config.max_in_flight.get())),
        client_token: client_token.trim().to_owned(),
        keys,
        client,
        upstream,
        authority,
        outbox,
        metrics,
        config,
        ledger,
    }))
}

/// The proxy's routes.
pub fn router(state: Arc<AppState>) -> Router {
    let mut r = Router::new();
    for ep in Endpoint::ALL {
        let h = move |State(s): State<Arc<AppState>>, req: Request| handler::handle(s, ep, req);
        r = match ep {
            Endpoint::Models => r.route(ep.path(), get(h)),
            _ => r.route(ep.path(), post(h)),
        };
    }
    r = r.route(crate::recall::PATH, post(crate::recall::handle));
    r = r.route(crate::mcp::PATH, any(crate::mcp::handle));
    r = r.route(crate::queue::PATH, put(crate::queue::handle));
    r.fallback(|req: Request| async move {
        let dialect = if req.uri().path().starts_with("/v1/messages") {
            soma_metering::wire::Dialect::Anthropic
        } else {
            soma_metering::wire::Dialect::OpenAi
        };
        ProxyError::NotFound(format!("{} {}", req.method(), req.uri().path())).into_wire(dialect)
    })
    .with_state(state)
}

/// `/healthz` (the process serves), `/readyz` (it holds a provider key the provider has not
/// refused: 503 with the reason otherwise; the contract's `Readiness`, read by the
/// operator for the Agent's `CredentialsUnavailable` condition), `/metrics` and `/load` (the contract's
/// `LoadReport`, read by the operator's autoscaler).
pub fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(soma_contract::readiness::READYZ_PATH, get(readyz))
        .route("/metrics", get(metrics))
        .route(
            soma_contract::load::LOAD_PATH,
            get(|State(s): State<Arc<AppState>>| async move { axum::Json(s.load.report()) }),
        )
        .with_state(state)
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    let mut r = s.keys.readiness().to_wire();
    // The ledger's user from Vault is reported beside the key; it does not decide the status:
    // requests are served and their usage waits in the outbox.
    r.ledger = vault_ledger(&s).map(|l| l.readiness());
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(r)).into_response()
}

/// The ledger's access when its credentials come from Vault.
fn vault_ledger(s: &AppState) -> Option<&Arc<LedgerAccess>> {
    s.ledger
        .as_ref()
        .filter(|_| s.config.ledger_credentials.is_some())
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    // Read when scraped: a refresh that installs the key before it is recorded, or a lease
    // that ends between rounds, is shown as it is now.
    s.metrics.credentials_ready(s.keys.readiness().ready);
    if let Some(l) = vault_ledger(&s) {
        s.metrics.ledger_credentials_ready(l.usable());
    }
    // What each Budget has left and what waits in the outbox, read when scraped rather than
    // written on every request.
    let now = jiff::Timestamp::now();
    for (budget, left) in s.authority.remaining_micros(now) {
        if let Some(left) = left {
            s.metrics.budget_remaining(&budget, left);
        }
    }
    let sinks = [
        (s.config.database_url.is_some(), Sink::Ledger, "ledger"),
        (s.config.nats_url.is_some(), Sink::Events, "nats"),
    ];
    for (_, sink, label) in sinks.into_iter().filter(|(on, ..)| *on) {
        match s.outbox.backlog(sink).await {
            Ok(b) => {
                let age = b.oldest_finished_at.map_or(0.0, |t| {
                    (now.as_millisecond() - t.as_millisecond()).max(0) as f64 / 1000.0
                });
                s.metrics.backlog(label, b.records, age);
            }
            Err(e) => tracing::warn!(error = %e, sink = label, "reading the outbox backlog failed"),
        }
    }
    match s.metrics.encode() {
        Ok(text) => (
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Deletes delivered outbox rows older than the longest budget window, every
/// `pruneIntervalMs`, until `stop`.
async fn prune_loop(state: Arc<AppState>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let every = Duration::from_millis(state.config.prune_interval_ms);
    let sinks = crate::outbox::Sinks {
        ledger: state.config.database_url.is_some(),
        events: state.config.nats_url.is_some(),
    };
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(every) => {}
        }
        let before = state.authority.replay_since(jiff::Timestamp::now());
        match state.outbox.prune(before, sinks).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(pruned = n, "delivered outbox rows deleted"),
            Err(e) => tracing::warn!(error = %e, "outbox pruning failed"),
        }
    }
}

/// Folds the request journal into the outbox every `foldIntervalMs` (and once more at stop),
/// so the outbox stays current even when nothing reads it.
async fn fold_loop(state: Arc<AppState>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let every = Duration::from_millis(state.config.fold_interval_ms.max(1));
    loop {
        let stopping = tokio::select! {
            _ = stop.wait_for(|s| *s) => true,
            _ = tokio::time::sleep(every) => false,
        };
        if let Err(e) = state.outbox.fold().await {
            tracing::warn!(error = %e, "folding the journal into the outbox failed; it is retried");
            state.metrics.error("outbox");
        }
        if stopping {
            return;
        }
    }
}

/// A running sidecar.
#[derive(Debug)]
pub struct Running {
    /// Where the proxy listens.
    pub proxy_addr: SocketAddr,
    /// Where `/healthz` and `/metrics` are.
    pub admin_addr: SocketAddr,
    /// The shared state (tests read the outbox through it).
    pub state: Arc<AppState>,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    vault_stop: tokio::sync::watch::Sender<bool>,
    vault_task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish, flushes the outbox, and waits; then
    /// revokes the Vault session (and the ledger user leased with it).
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = self.vault_stop.send(true);
        if let Some(t) = self.vault_task {
            let _ = t.await;
        }
    }
}

async fn bind(addr: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: addr.to_owned(),
            source,
        })
}

/// Binds both listeners and serves until [`Running::stop`]. With `config_path`, the file is
/// followed for live changes (`crate::live`); with a ledger, so are its Budget rows.
pub async fn start(
    config: Config,
    client_token: String,
    config_path: Option<PathBuf>,
) -> Result<Running, StartError> {
    let proxy = bind(&config.listen).await?;
    let admin = bind(&config.admin_listen).await?;
    let state = state(config, client_token).await?;
    // The configuration's revocations take effect on the Capsule folders before anything is
    // served: a Capsule revoked while this sidecar was down stays withdrawn. With a ledger,
    // nothing is put back until the live loop has read the ledger's revocations too.
    let mode = if state.ledger.is_some() {
        crate::withdraw::Mode::WithdrawOnly
    } else {
        crate::withdraw::Mode::Full
    };
    let placing = state.clone();
    let _ = tokio::task::spawn_blocking(move || crate::withdraw::place(&placing, mode)).await;
    let proxy_addr = proxy.local_addr().map_err(|source| StartError::Bind {
        addr: "proxy".into(),
        source,
    })?;
    let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
        addr: "admin".into(),
        source,
    })?;
    let (shutdown, rx) = tokio::sync::watch::channel(false);
    let serve = |listener: TcpListener, app: Router, mut rx: tokio::sync::watch::Receiver<bool>| {
        tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            // Streams are many small writes: without TCP_NODELAY, Nagle's algorithm and the
            // client's delayed ACK hold each SSE chunk back by ~40 ms on a reused connection.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!(error = %e, "server stopped");
            }
        })
    };
    let mut tasks = vec![
        serve(proxy, router(state.clone()), rx.clone()),
        serve(admin, admin_router(state.clone()), rx.clone()),
    ];
    // The Vault session first: the ledger's pools below start with the user it leases. It
    // outlives the other tasks: its token (and the ledger user leased with it) is revoked
    // only once the outbox has been flushed to the ledger.
    let (vault_stop, vault_rx) = tokio::sync::watch::channel(false);
    let mut vault_task = None;
    if let Credentials::Vault(v) = &state.config.credentials {
        // The first read before serving is reported as "ready", so that a sidecar that can
        // read its key is ready at once; one that cannot keeps retrying in the background.
        let mut source = VaultSource::new(v.as_ref().clone());
        if let (Some(LedgerCredentials::Vault(db)), Some(access)) =
            (&state.config.ledger_credentials, &state.ledger)
        {
            source = source.with_database(db.clone(), access.clone());
        }
        let before = state.keys.readiness().problem;
        let result = source.fetch(&state.keys).await;
        vault::record(&state.keys, &state.metrics, &before, &result);
        if source.wants_database() {
            let db = source.database_round().await;
            vault::record_database(&db, &state.metrics);
        }
        vault_task = Some(tokio::spawn(vault::run(source, state.clone(), vault_rx)));
    }
    if let Some(url) = &state.config.nats_url {
        tasks.push(tokio::spawn(crate::events::run(
            state.outbox.clone(),
            url.clone(),
            Duration::from_millis(state.config.delivery_interval_ms),
            500,
            state.metrics.delivery("nats"),
            Duration::from_millis(state.config.flush_on_stop_ms),
            rx.clone(),
        )));
    }
    // Two connections: the listener holds one for as long as it listens.
    let live_pool = state
        .ledger
        .as_ref()
        .map(|l| l.pool(2, Duration::from_secs(5)));
    // The file and the ledger carry the brown-out and Capsule revocations as well as Budgets:
    // the ledger is followed even by a sidecar that charges no Budget.
    if config_path.is_some() || live_pool.is_some() {
        tasks.push(tokio::spawn(crate::live::run(
            state.clone(),
            config_path,
            live_pool,
            rx.clone(),
        )));
    }
    if let Some(access) = &state.ledger {
        let pool = access.pool(2, Duration::from_secs(5));
        let interval = Duration::from_millis(state.config.delivery_interval_ms);
        tasks.push(tokio::spawn(crate::ledger::run(
            state.outbox.clone(),
            pool,
            interval,
            500,
            state.metrics.delivery("ledger"),
            Duration::from_millis(state.config.flush_on_stop_ms),
            rx.clone(),
        )));
    }
    if state.config.prune_interval_ms > 0 {
        tasks.push(tokio::spawn(prune_loop(state.clone(), rx.clone())));
    }
    tasks.push(tokio::spawn(fold_loop(state.clone(), rx.clone())));
    if let Budgets::Cluster(_) = &state.authority {
        let s = state.clone();
        let rx = rx.clone();
        tasks.push(tokio::spawn(async move {
            if let Budgets::Cluster(c) = &s.authority {
                c.run(rx).await;
            }
        }));
    }
    tracing::info!(%proxy_addr, %admin_addr, budgets = %state.authority.chain_label(), "soma-proxy serving");
    Ok(Running {
        proxy_addr,
        admin_addr,
        state,
        shutdown,
        tasks,
        vault_stop,
        vault_task,
    })
}
