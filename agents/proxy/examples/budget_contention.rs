//! Budget reservations under contention: 64 closed-loop clients through `soma-proxy` with a
//! Budget, against the same sidecar without one (the peer), in one run. Run by
//! `bench/budget-contention`.
//!
//! Phases, each sidecar with its own fresh outbox, all in front of one fake provider:
//!
//! 1. **peer** (no Budget) and **large cap** (a cost Budget far above the run's spend),
//!    alternated in `--rounds` slices (ABBA) so both see the same machine: throughput and per-request
//!    latency; the added latency is the budgeted percentile minus the peer's.
//! 2. **exhausted** (a cost cap set to `--cap-fraction` of what the peer spent, so it runs out
//!    partway): every call is either admitted (the reservation was taken) or refused with 429;
//!    `reserve_ops_per_s` is those decisions per second, and `overspend` is how far settled
//!    cost went over the cap, by the sidecar's outbox, by its `/metrics` and by the usage the
//!    clients saw in their replies (the largest counts; it must be 0).
//!
//! The sidecars are started by [`launch`] from a configuration document, so a cluster
//! authority (`--authority postgres --sidecars N` sharing one Budget) needs only another arm
//! there. Ends with `RESULT budget-contention overspend=.. reserve_ops_per_s=..
//! added_p99_us=.. ...`.

mod bench_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bench_support::load::{self, Http, Target, chat_body, pct};
use bench_support::procs;
use bench_support::soma::{
    OutboxTotals, Sidecar, Upstream, counter_sum, outbox_totals, reported_cost_micros,
    sidecar_config,
};
use serde_json::{Value, json};

/// Which budget authority the sidecars use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Authority {
    /// Each sidecar's in-memory authority (the only one built).
    Embedded,
    /// PostgreSQL-backed, shared by several sidecars (not wired into this benchmark yet).
    Postgres,
}

struct Args {
    clients: usize,
    seconds: f64,
    rounds: u32,
    cap_fraction: f64,
    authority: Authority,
    sidecars: usize,
}

fn usage(why: &str) -> ! {
    eprintln!(
        "budget_contention: {why}\nusage: budget_contention [--clients N] [--seconds S] \
         [--rounds N] [--cap-fraction F] [--authority embedded|postgres] [--sidecars N]"
    );
    std::process::exit(2)
}

fn args() -> Args {
    let mut a = Args {
        clients: 64,
        seconds: 10.0,
        rounds: 4,
        cap_fraction: 0.5,
        authority: Authority::Embedded,
        sidecars: 1,
    };
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
            "--sidecars" => a.sidecars = num() as usize,
            "--authority" => {
                a.authority = match value.as_str() {
                    "embedded" => Authority::Embedded,
                    "postgres" => Authority::Postgres,
                    _ => usage("--authority is embedded or postgres"),
                }
            }
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    if a.authority == Authority::Embedded && a.sidecars != 1 {
        usage("the embedded authority is per sidecar: --sidecars N needs --authority postgres");
    }
    if a.authority == Authority::Postgres {
        usage("--authority postgres is not wired into this benchmark yet (see launch())");
    }
    a
}

/// Sidecars sharing one Budget, each from `config` with its own outbox under `dir`. The
/// embedded authority is per sidecar, so it launches exactly one; a cluster authority would
/// add its connection settings to each copy of `config` here.
fn launch(authority: Authority, config: &Value, sidecars: usize, dir: &Path) -> Vec<Running> {
    match authority {
        Authority::Embedded => {
            vec![Running {
                sidecar: Sidecar::start(config, dir),
                outbox: dir.join("outbox.db"),
            }]
        }
        Authority::Postgres => unreachable!("refused in args(): {sidecars} sidecars"),
    }
}

/// A launched sidecar and where its outbox is.
struct Running {
    sidecar: Sidecar,
    outbox: PathBuf,
}

/// One phase's sidecars, each in its own directory.
struct Phase {
    _dir: tempfile::TempDir,
    sidecars: Vec<Running>,
}

impl Phase {
    fn start(a: &Args, upstream: &Upstream, budget: Option<Value>) -> Phase {
        let dir = tempfile::tempdir().expect("tempdir");
        let budgets: Vec<Value> = budget.into_iter().collect();
        let config = sidecar_config(upstream, dir.path(), &budgets);
        let sidecars = launch(a.authority, &config, a.sidecars, dir.path());
        Phase {
            _dir: dir,
            sidecars,
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

    /// Cost and refusals by the sidecars' own `/metrics`.
    async fn metrics(&self, client: &Http) -> (u64, u64) {
        let (mut cost, mut refused) = (0.0, 0.0);
        for r in &self.sidecars {
            let text = r.sidecar.metrics(client).await;
            cost += counter_sum(&text, "soma_proxy_cost_micros");
            refused += counter_sum(&text, "soma_proxy_budget_refusals");
        }
        (cost as u64, refused as u64)
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

#[tokio::main]
async fn main() {
    let a = args();
    println!("load average at start: {}", procs::load_average());
    let client = load::client();
    let upstream = Upstream::start();
    let peer = Phase::start(&a, &upstream, None);
    let large = Phase::start(&a, &upstream, Some(cost_budget(1_000_000_000_000)));
    let (peer_t, large_t) = (peer.targets(), large.targets());
    // Warm-up: connections, tokenizer tables, SQLite pages.
    closed_loop(&client, &peer_t, a.clients, 1.0).await;
    closed_loop(&client, &large_t, a.clients, 1.0).await;

    println!(
        "{} closed-loop clients, {} s per sidecar in {} alternating slices:",
        a.clients, a.seconds, a.rounds
    );
    let slice = a.seconds / f64::from(a.rounds);
    let (mut p, mut l) = (Seen::default(), Seen::default());
    // ABBA order, so neither side always runs first (or just after the other) in a round.
    for round in 0..a.rounds {
        if round % 2 == 0 {
            p.merge(closed_loop(&client, &peer_t, a.clients, slice).await);
            l.merge(closed_loop(&client, &large_t, a.clients, slice).await);
        } else {
            l.merge(closed_loop(&client, &large_t, a.clients, slice).await);
            p.merge(closed_loop(&client, &peer_t, a.clients, slice).await);
        }
    }
    for s in [&mut p, &mut l] {
        s.admitted.sort_unstable();
    }
    show("no budget", &p);
    show("large cap", &l);

    // A cap the peer's spend would have crossed halfway (by default) through the same time.
    let peer_cost = peer.outbox().settled_micros;
    let cap = ((peer_cost as f64 * a.cap_fraction) as u64).max(1);
    let exhausted = Phase::start(&a, &upstream, Some(cost_budget(cap)));
    let e = closed_loop(&client, &exhausted.targets(), a.clients, a.seconds).await;
    show("exhausted", &e);
    let outbox = exhausted.outbox();
    let (metrics_cost, metrics_refused) = exhausted.metrics(&client).await;
    let spent = outbox
        .settled_micros
        .max(metrics_cost)
        .max(e.reported_micros);
    let overspend = spent.saturating_sub(cap);
    println!(
        "  cap {cap} micros; settled: outbox {} micros ({} rows, {} open), /metrics {metrics_cost} micros, \
         clients' usage {} micros; refusals: clients {} /metrics {metrics_refused}",
        outbox.settled_micros,
        outbox.settled,
        outbox.open,
        e.reported_micros,
        e.refused.len()
    );
    let added_p50 = pct(&l.admitted, 0.5) as i64 - pct(&p.admitted, 0.5) as i64;
    let added_p99 = pct(&l.admitted, 0.99) as i64 - pct(&p.admitted, 0.99) as i64;
    let ops_ratio = l.decisions_per_s() / p.decisions_per_s();
    println!(
        "budgeted over unbudgeted: added p50 {added_p50}us, p99 {added_p99}us; throughput {ops_ratio:.3}x"
    );
    println!("load average at end: {}", procs::load_average());
    println!(
        "RESULT budget-contention overspend={overspend} reserve_ops_per_s={:.0} added_p50_us={added_p50} added_p99_us={added_p99} clients={} cap_micros={cap} spent_micros={spent} admitted={} refused={} errors={} large_cap_ops_per_s={:.0} unbudgeted_ops_per_s={:.0} throughput_ratio={ops_ratio:.3} authority=embedded sidecars={}",
        e.decisions_per_s(),
        a.clients,
        e.admitted.len(),
        e.refused.len(),
        e.errors + p.errors + l.errors,
        l.decisions_per_s(),
        p.decisions_per_s(),
        a.sidecars,
    );
}
