//! Budget reservations under contention: 64 closed-loop clients through `soma-proxy` with a
//! Budget, against the same sidecars without one (the peer), in one run, for each budget
//! authority. Run by `bench/budget-contention`.
//!
//! For each authority (`--authority embedded|postgres|both`, default both), phases whose
//! sidecars each have a fresh outbox, all in front of one fake provider:
//!
//! 1. **peer** (no Budget) and **large cap** (a cost Budget far above the run's spend),
//!    alternated in `--rounds` slices (ABBA) so both see the same machine: throughput and
//!    per-request latency; the added latency is the budgeted percentile minus the peer's.
//! 2. **exhausted** (a cost cap set to `--cap-fraction` of what the peer spent, so it runs out
//!    partway): every call is either admitted (the reservation was taken) or refused with 429;
//!    `reserve_ops_per_s` is those decisions per second, and `overspend` is how far settled
//!    cost went over the cap, by the sidecars' outboxes, by their `/metrics`, by the usage the
//!    clients saw in their replies and (cluster) by the PostgreSQL ledger (the largest counts;
//!    it must be 0).
//!
//! The embedded authority is one sidecar enforcing alone. The cluster authority is
//! `--sidecars` (3) sidecars sharing the Budget through a real PostgreSQL started here on
//! 127.0.0.1 (`tests/support/pg.rs`; each phase in its own database), the clients spread
//! round-robin over them; its figures also count the authority's database transactions from
//! the sidecars' `soma_proxy_budget_lease_transactions_total`. Ends with `RESULT
//! budget-contention overspend=.. reserve_ops_per_s=.. added_p99_us=.. ... cluster_overspend=..
//! ...` (embedded keys first, `cluster_*` after).

mod bench_support;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bench_support::load::{self, Http, Target, chat_body, pct};
use bench_support::procs;
use bench_support::soma::{
    OutboxTotals, Sidecar, Upstream, counter_sum, counter_sum_where, outbox_totals,
    reported_cost_micros, sidecar_config,
};
use serde_json::{Value, json};
use soma_testsupport::Pg;

/// Which budget authorities to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Embedded,
    Postgres,
    Both,
}

struct Args {
    clients: usize,
    seconds: f64,
    rounds: u32,
    cap_fraction: f64,
    mode: Mode,
    /// Sidecars sharing the Budget with the cluster authority.
    sidecars: usize,
}

fn usage(why: &str) -> ! {
    eprintln!(
        "budget_contention: {why}\nusage: budget_contention [--clients N] [--seconds S] \
         [--rounds N] [--cap-fraction F] [--authority embedded|postgres|both] [--sidecars N]"
    );
    std::process::exit(2)
}

fn args() -> Args {
    let mut a = Args {
        clients: 64,
        seconds: 10.0,
        rounds: 4,
        cap_fraction: 0.5,
        mode: Mode::Both,
        sidecars: 3,
    };
    let mut sidecars_set = false;
    let v: Vec<String> = std::env::args().skip(1).collect();
    for pair in v.chunks(2) {
        let [flag, value] = pair else {
            usage("every flag takes a value")
        };
        let num = || {
            value
                .parse::<f64>()
                .ok()
                .filter(|n| *n > 0.0)
                .unwrap_or_else(|| usage(&format!("{flag} needs a positive number")))
        };
        match flag.as_str() {
            "--clients" => a.clients = num() as usize,
            "--seconds" => a.seconds = num(),
            "--rounds" => a.rounds = num() as u32,
            "--cap-fraction" => a.cap_fraction = num(),
            "--sidecars" => {
                a.sidecars = num() as usize;
                sidecars_set = true;
            }
            "--authority" => {
                a.mode = match value.as_str() {
                    "embedded" => Mode::Embedded,
                    "postgres" => Mode::Postgres,
                    "both" => Mode::Both,
                    _ => usage("--authority is embedded, postgres or both"),
                }
            }
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    if a.clients == 0 || a.rounds == 0 || a.sidecars == 0 {
        usage("--clients, --rounds and --sidecars need at least 1");
    }
    if a.mode == Mode::Embedded && sidecars_set {
        usage("the embedded authority is per sidecar: --sidecars applies to --authority postgres");
    }
    a
}

/// Where a phase's sidecars keep their Budget state.
#[derive(Clone, Copy)]
enum Backend<'a> {
    /// One sidecar, enforcing alone in memory.
    Embedded,
    /// `sidecars` sidecars sharing the Budget through the cluster authority on `pg`; each
    /// phase has its own database there, so no Budget window or ledger row crosses phases.
    Cluster { pg: &'a Pg, sidecars: usize },
}

impl Backend<'_> {
    fn name(&self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Cluster { .. } => "cluster",
        }
    }
}

/// The URL of database `name` on `pg`.
fn database_url(pg: &Pg, name: &str) -> String {
    let url = pg.url();
    let (server, _) = url.rsplit_once('/').expect("a database in the URL");
    format!("{server}/{name}")
}

/// Sidecars sharing one Budget, each from `config` with its own outbox under `dir`: the
/// embedded authority is per sidecar, so one; the cluster authority gets its connection
/// settings (`databaseUrl`, `authority: postgres`) added to each copy of `config`.
fn launch(
    backend: Backend<'_>,
    config: &Value,
    database: Option<&str>,
    dir: &Path,
) -> Vec<Running> {
    match (backend, database) {
        (Backend::Cluster { sidecars, .. }, Some(url)) => (0..sidecars)
            .map(|i| {
                let own = dir.join(format!("replica-{i}"));
                std::fs::create_dir_all(&own).expect("replica dir");
                let outbox = own.join("outbox.db");
                let mut c = config.clone();
                c["outboxPath"] = json!(outbox);
                c["databaseUrl"] = json!(url);
                c["authority"] = json!({"postgres": {}});
                Running {
                    sidecar: Sidecar::start(&c, &own),
                    outbox,
                }
            })
            .collect(),
        _ => vec![Running {
            sidecar: Sidecar::start(config, dir),
            outbox: dir.join("outbox.db"),
        }],
    }
}

/// A launched sidecar and where its outbox is.
struct Running {
    sidecar: Sidecar,
    outbox: PathBuf,
}

/// What the sidecars' `/metrics` say, summed over them.
#[derive(Clone, Copy, Debug, Default)]
struct Readings {
    cost_micros: u64,
    refused: u64,
    /// Cluster authority top-ups (a request waited for a PostgreSQL transaction).
    top_ups: u64,
    /// Cluster authority heartbeats (background transactions).
    heartbeats: u64,
}

/// The ledger as the cluster authority's PostgreSQL holds it after a phase.
#[derive(Clone, Copy, Debug, Default)]
struct LedgerTotals {
    rows: u64,
    micros: u64,
    /// The Budget window's `granted` total: what the authority handed out as slices.
    granted_micros: u64,
    /// Every settled outbox row had reached the ledger.
    complete: bool,
}

/// One phase's sidecars, each in its own directory.
struct Phase {
    _dir: tempfile::TempDir,
    sidecars: Vec<Running>,
    /// The phase's database (cluster authority).
    database: Option<String>,
}

impl Phase {
    async fn start(
        upstream: &Upstream,
        backend: Backend<'_>,
        name: &str,
        budget: Option<Value>,
    ) -> Phase {
        let dir = tempfile::tempdir().expect("tempdir");
        let budgets: Vec<Value> = budget.into_iter().collect();
        let config = sidecar_config(upstream, dir.path(), &budgets);
        let database = match backend {
            Backend::Embedded => None,
            Backend::Cluster { pg, .. } => {
                let admin = pg.pool().await;
                // `name` is one of this file's phase names, never input.
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&admin)
                    .await
                    .expect("CREATE DATABASE");
                admin.close().await;
                Some(database_url(pg, name))
            }
        };
        let sidecars = launch(backend, &config, database.as_deref(), dir.path());
        Phase {
            _dir: dir,
            sidecars,
            database,
        }
    }

    fn targets(&self) -> Vec<Target> {
        self.sidecars.iter().map(|r| r.sidecar.target()).collect()
    }

    fn outbox(&self) -> OutboxTotals {
        let mut t = OutboxTotals::default();
        for r in &self.sidecars {
            let o = outbox_totals(&r.outbox);
            t.settled_micros += o.settled_micros;
            t.settled += o.settled;
            t.open += o.open;
        }
        t
    }

    /// Cost, refusals and the cluster authority's transactions by the sidecars' `/metrics`.
    async fn readings(&self, client: &Http) -> Readings {
        let mut r = Readings::default();
        const TX: &str = "soma_proxy_budget_lease_transactions";
        for s in &self.sidecars {
            let text = s.sidecar.metrics(client).await;
            r.cost_micros += counter_sum(&text, "soma_proxy_cost_micros") as u64;
            r.refused += counter_sum(&text, "soma_proxy_budget_refusals") as u64;
            r.top_ups += counter_sum_where(&text, TX, &[("kind", "top_up")]) as u64;
            r.heartbeats += counter_sum_where(&text, TX, &[("kind", "heartbeat")]) as u64;
        }
        r
    }

    /// The ledger's totals once it holds `settled_rows` rows (delivery runs in the
    /// background; after 60 s it reports what arrived). `None` without a database.
    async fn ledger(&self, settled_rows: u64) -> Option<LedgerTotals> {
        let url = self.database.as_deref()?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .expect("connect to the phase's database");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut t = LedgerTotals::default();
        loop {
            let (rows, micros): (i64, i64) = sqlx::query_as(
                "SELECT COUNT(*), COALESCE(SUM(cost_micros), 0)::BIGINT FROM usage_records",
            )
            .fetch_one(&pool)
            .await
            .unwrap_or((0, 0));
            (t.rows, t.micros) = (rows as u64, micros as u64);
            t.complete = t.rows == settled_rows;
            if t.complete || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let granted: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(granted_micros) FROM budget_windows WHERE budget = 'bench/contended'",
        )
        .fetch_one(&pool)
        .await
        .expect("read budget_windows");
        t.granted_micros = granted.unwrap_or(0) as u64;
        pool.close().await;
        Some(t)
    }
}

/// What the clients saw in one closed-loop run.
#[derive(Default)]
struct Seen {
    /// Latency of 2xx replies, µs.
    admitted: Vec<u64>,
    /// Latency of budget refusals (429), µs.
    refused: Vec<u64>,
    /// Anything else.
    errors: u64,
    /// Cost of the usage the 2xx replies reported.
    reported_micros: u64,
    /// Wall time until the last client stopped.
    elapsed: Duration,
}

impl Seen {
    fn merge(&mut self, other: Seen) {
        self.admitted.extend(other.admitted);
        self.refused.extend(other.refused);
        self.errors += other.errors;
        self.reported_micros += other.reported_micros;
        self.elapsed += other.elapsed;
    }

    fn decisions_per_s(&self) -> f64 {
        (self.admitted.len() + self.refused.len()) as f64 / self.elapsed.as_secs_f64()
    }
}

/// `clients` closed-loop clients (each sends its next call when the last one finished),
/// spread over `targets`, for `seconds`.
async fn closed_loop(client: &Http, targets: &[Target], clients: usize, seconds: f64) -> Seen {
    let start = Instant::now();
    let stop = start + Duration::from_secs_f64(seconds);
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let (client, target, counter) = (
            client.clone(),
            targets[c % targets.len()].clone(),
            counter.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            while Instant::now() < stop {
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let t = Instant::now();
                let reply = load::call(&client, &target, chat_body(n, false, 16)).await;
                let us = t.elapsed().as_micros() as u64;
                match reply {
                    Ok(r) if r.status == 200 => {
                        seen.admitted.push(us);
                        seen.reported_micros += reported_cost_micros(&r.body).unwrap_or(0);
                    }
                    Ok(r) if r.status == 429 && is_budget_refusal(&r.body) => seen.refused.push(us),
                    _ => seen.errors += 1,
                }
            }
            seen
        }));
    }
    let mut all = Seen::default();
    for t in tasks {
        all.merge(t.await.expect("client task"));
    }
    all.elapsed = start.elapsed();
    all.admitted.sort_unstable();
    all.refused.sort_unstable();
    all
}

/// A 429 that names a Budget (not, say, an upstream rate limit passed through).
fn is_budget_refusal(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| v.get("soma_budget").is_some())
}

fn cost_budget(cap_micros: u64) -> Value {
    json!({"name": "contended", "limits": {"costMicros": cap_micros}, "period": {"calendar": "month"}})
}

fn show(name: &str, s: &Seen) {
    println!(
        "  {name:<10} admitted {:>7} ({:>7.0}/s)  refused {:>7}  errors {:>3}  decisions {:>7.0}/s  admitted p50={:>6}us p99={:>6}us",
        s.admitted.len(),
        s.admitted.len() as f64 / s.elapsed.as_secs_f64(),
        s.refused.len(),
        s.errors,
        s.decisions_per_s(),
        pct(&s.admitted, 0.5),
        pct(&s.admitted, 0.99),
    );
}

/// One authority's figures.
struct Report {
    backend: &'static str,
    sidecars: usize,
    peer: Seen,
    large: Seen,
    exhausted: Seen,
    cap: u64,
    spent: u64,
    /// Top-ups while the large-cap clients ran (measured slices only).
    large_top_ups: u64,
    /// Top-ups in the large-cap warm-up (the first slices).
    warmup_top_ups: u64,
    /// Top-ups in the exhausted phase.
    exhausted_top_ups: u64,
    /// Heartbeats over both budgeted phases.
    heartbeats: u64,
    ledger: Option<LedgerTotals>,
}

impl Report {
    fn overspend(&self) -> u64 {
        self.spent.saturating_sub(self.cap)
    }
    /// The cluster authority handed out more than the cap (it must never).
    fn granted_over_cap(&self) -> bool {
        self.ledger.is_some_and(|l| l.granted_micros > self.cap)
    }
    fn added(&self, p: f64) -> i64 {
        pct(&self.large.admitted, p) as i64 - pct(&self.peer.admitted, p) as i64
    }
    fn ratio(&self) -> f64 {
        self.large.decisions_per_s() / self.peer.decisions_per_s()
    }
    fn errors(&self) -> u64 {
        self.peer.errors + self.large.errors + self.exhausted.errors
    }
    fn per_request(trips: u64, seen: &Seen) -> f64 {
        trips as f64 / (seen.admitted.len() + seen.refused.len()).max(1) as f64
    }
}

/// The peer and the large cap alternated, then a cap exhausted partway, on `backend`.
async fn measure(a: &Args, client: &Http, upstream: &Upstream, backend: Backend<'_>) -> Report {
    let label = backend.name();
    let sidecars = match backend {
        Backend::Embedded => 1,
        Backend::Cluster { sidecars, .. } => sidecars,
    };
    println!(
        "== {label} authority: {sidecars} sidecar(s); load average {}",
        procs::load_average()
    );
    let peer = Phase::start(upstream, backend, "peer", None).await;
    let large = Phase::start(
        upstream,
        backend,
        "large",
        Some(cost_budget(1_000_000_000_000)),
    )
    .await;
    let (peer_t, large_t) = (peer.targets(), large.targets());
    // Warm-up: connections, tokenizer tables, SQLite pages, and (cluster) the first leases.
    closed_loop(client, &peer_t, a.clients, 1.0).await;
    closed_loop(client, &large_t, a.clients, 1.0).await;

    println!(
        "{} closed-loop clients, {} s per side in {} alternating slices:",
        a.clients, a.seconds, a.rounds
    );
    let before = large.readings(client).await;
    let slice = a.seconds / f64::from(a.rounds);
    let (mut p, mut l) = (Seen::default(), Seen::default());
    // ABBA order, so neither side always runs first (or just after the other) in a round.
    for round in 0..a.rounds {
        if round % 2 == 0 {
            p.merge(closed_loop(client, &peer_t, a.clients, slice).await);
            l.merge(closed_loop(client, &large_t, a.clients, slice).await);
        } else {
            l.merge(closed_loop(client, &large_t, a.clients, slice).await);
            p.merge(closed_loop(client, &peer_t, a.clients, slice).await);
        }
    }
    let after = large.readings(client).await;
    for s in [&mut p, &mut l] {
        s.admitted.sort_unstable();
    }
    show("no budget", &p);
    show("large cap", &l);

    // A cap the peer's spend would have crossed halfway (by default) through the same time.
    let peer_cost = peer.outbox().settled_micros;
    let cap = ((peer_cost as f64 * a.cap_fraction) as u64).max(1);
    let exhausted = Phase::start(upstream, backend, "exhausted", Some(cost_budget(cap))).await;
    let e = closed_loop(client, &exhausted.targets(), a.clients, a.seconds).await;
    show("exhausted", &e);
    let outbox = exhausted.outbox();
    let r = exhausted.readings(client).await;
    let ledger = exhausted.ledger(outbox.settled).await;
    let spent = outbox
        .settled_micros
        .max(r.cost_micros)
        .max(e.reported_micros)
        .max(ledger.map_or(0, |l| l.micros));
    let mut line = format!(
        "  cap {cap} micros; settled: outbox {} micros ({} rows, {} open), /metrics {} micros, \
         clients' usage {} micros",
        outbox.settled_micros, outbox.settled, outbox.open, r.cost_micros, e.reported_micros,
    );
    if let Some(l) = ledger {
        let _ = write!(
            line,
            ", ledger {} micros ({} rows{}); Budget window granted {} micros",
            l.micros,
            l.rows,
            if l.complete {
                ""
            } else {
                ", DELIVERY INCOMPLETE"
            },
            l.granted_micros
        );
    }
    let _ = write!(
        line,
        "; refusals: clients {} /metrics {}",
        e.refused.len(),
        r.refused
    );
    println!("{line}");
    let report = Report {
        backend: label,
        sidecars,
        peer: p,
        large: l,
        exhausted: e,
        cap,
        spent,
        large_top_ups: after.top_ups - before.top_ups,
        warmup_top_ups: before.top_ups,
        exhausted_top_ups: r.top_ups,
        heartbeats: after.heartbeats + r.heartbeats,
        ledger,
    };
    if let Backend::Cluster { .. } = backend {
        println!(
            "  database transactions: top-ups {} in the large-cap warm-up, then {} for {} large-cap \
             decisions ({:.5} per request), {} for {} exhausted-phase decisions ({:.5} per \
             request); heartbeats {}",
            report.warmup_top_ups,
            report.large_top_ups,
            report.large.admitted.len() + report.large.refused.len(),
            Report::per_request(report.large_top_ups, &report.large),
            report.exhausted_top_ups,
            report.exhausted.admitted.len() + report.exhausted.refused.len(),
            Report::per_request(report.exhausted_top_ups, &report.exhausted),
            report.heartbeats,
        );
    }
    println!(
        "  budgeted over unbudgeted: added p50 {}us, p99 {}us; throughput {:.3}x; overspend {}",
        report.added(0.5),
        report.added(0.99),
        report.ratio(),
        report.overspend(),
    );
    report
}

/// The RESULT keys of an embedded report (the benchmark's original keys).
fn embedded_keys(r: &Report, clients: usize) -> String {
    format!(
        "overspend={} reserve_ops_per_s={:.0} added_p50_us={} added_p99_us={} clients={clients} \
         cap_micros={} spent_micros={} admitted={} refused={} errors={} large_cap_ops_per_s={:.0} \
         unbudgeted_ops_per_s={:.0} throughput_ratio={:.3} authority=embedded sidecars={}",
        r.overspend(),
        r.exhausted.decisions_per_s(),
        r.added(0.5),
        r.added(0.99),
        r.cap,
        r.spent,
        r.exhausted.admitted.len(),
        r.exhausted.refused.len(),
        r.errors(),
        r.large.decisions_per_s(),
        r.peer.decisions_per_s(),
        r.ratio(),
        r.sidecars,
    )
}

/// The `cluster_*` RESULT keys.
fn cluster_keys(r: &Report, embedded: Option<&Report>) -> String {
    let ledger = r.ledger.unwrap_or_default();
    let mut s = format!(
        "cluster_overspend={} cluster_reserve_ops_per_s={:.0} cluster_added_p50_us={} \
         cluster_added_p99_us={} cluster_sidecars={} cluster_cap_micros={} cluster_spent_micros={} \
         cluster_ledger_micros={} cluster_ledger_complete={} cluster_granted_micros={} \
         cluster_admitted={} cluster_refused={} cluster_errors={} cluster_large_cap_ops_per_s={:.0} \
         cluster_unbudgeted_ops_per_s={:.0} cluster_throughput_ratio={:.3} \
         cluster_db_trips_per_request_large_cap={:.6} cluster_db_trips_per_request_exhausted={:.6} \
         cluster_top_ups={} cluster_heartbeats={}",
        r.overspend(),
        r.exhausted.decisions_per_s(),
        r.added(0.5),
        r.added(0.99),
        r.sidecars,
        r.cap,
        r.spent,
        ledger.micros,
        ledger.complete,
        ledger.granted_micros,
        r.exhausted.admitted.len(),
        r.exhausted.refused.len(),
        r.errors(),
        r.large.decisions_per_s(),
        r.peer.decisions_per_s(),
        r.ratio(),
        Report::per_request(r.large_top_ups, &r.large),
        Report::per_request(r.exhausted_top_ups, &r.exhausted),
        r.large_top_ups + r.exhausted_top_ups,
        r.heartbeats,
    );
    if let Some(e) = embedded {
        let _ = write!(
            s,
            " cluster_vs_embedded_large_cap_ops={:.3}",
            r.large.decisions_per_s() / e.large.decisions_per_s()
        );
    }
    s
}

#[tokio::main]
async fn main() {
    let a = args();
    println!("load average at start: {}", procs::load_average());
    let client = load::client();
    let upstream = Upstream::start();
    let embedded = if a.mode == Mode::Postgres {
        None
    } else {
        Some(measure(&a, &client, &upstream, Backend::Embedded).await)
    };
    let cluster = if a.mode == Mode::Embedded {
        None
    } else {
        // Panics with the install command when PostgreSQL is missing (or pass
        // --authority embedded).
        let pg = Pg::start();
        let backend = Backend::Cluster {
            pg: &pg,
            sidecars: a.sidecars,
        };
        Some(measure(&a, &client, &upstream, backend).await)
    };
    println!("load average at end: {}", procs::load_average());
    let mut keys = Vec::new();
    if let Some(e) = &embedded {
        keys.push(embedded_keys(e, a.clients));
    }
    if let Some(c) = &cluster {
        if embedded.is_none() {
            keys.push(format!("clients={}", a.clients));
        }
        keys.push(cluster_keys(c, embedded.as_ref()));
    }
    println!("RESULT budget-contention {}", keys.join(" "));
    let broken: Vec<&str> = [&embedded, &cluster]
        .into_iter()
        .flatten()
        .filter(|r| r.overspend() > 0 || r.granted_over_cap())
        .map(|r| r.backend)
        .collect();
    if !broken.is_empty() {
        eprintln!(
            "budget_contention: OVERSPEND with the {} authority",
            broken.join(", ")
        );
        std::process::exit(1);
    }
}
