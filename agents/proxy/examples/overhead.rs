//! Added latency and cost of the sidecar: the same open-loop load sent straight to the fake
//! provider and through `soma-proxy` (a Budget and usage recording on), interleaved slot by
//! slot so both see the same machine. Run by `bench/proxy-overhead`.
//!
//! Processes: `soma-fake-upstream` and `soma-proxy` (release builds beside this example), this
//! load generator. Latency is measured from each request's scheduled send time, so a stall
//! cannot hide queued requests (no coordinated omission). `--rate` is the proxied rate: every
//! proxied request has a direct twin, so the provider serves twice that.
//!
//! Runs, in order: non-streaming at `--rate` (1,000/s) and at `--low-rate` (200/s, where the
//! sidecar's own cost shows apart from contention), streaming at `--stream-rate`, then the
//! one-core ladder: the sidecar pinned to core 1, the generator and provider to core 0, the
//! rate raised step by step until the added p99 reaches `--p99-bound-us` (1 ms). The sidecar's
//! CPU time (`/proc/PID/stat`, all threads) over each run divided by its proxied requests is
//! its CPU per request, background work (folding the journal, leases) included.
//!
//! The same runs are then made with nginx in the sidecar's place (`nginx_*` keys): a bare
//! reverse proxy that forwards bytes and does nothing else, the floor a proxy hop costs on
//! this machine, measured minutes apart in the same invocation (`--no-nginx` leaves it out).
//!
//! Prints the distributions and ends with one `RESULT proxy-overhead key=value ...` line.

#[path = "bench_support/mod.rs"]
mod bench_support;

use std::collections::HashMap;
use std::time::Duration;

use bench_support::cpu;
use bench_support::load::{self, Http, Sample, Schedule, Target, pct};
use bench_support::nginx::{self, Nginx};
use bench_support::procs::load_average;
use bench_support::soma::{Sidecar, Upstream, histogram_quantiles, sidecar_config};
use bytes::Bytes;
use serde_json::json;

struct Args {
    /// Proxied requests per second (the direct twins add as many again).
    rate: u64,
    /// The low-rate run, proxied requests per second.
    low_rate: u64,
    seconds: u64,
    stream_rate: u64,
    /// Length of each step of the one-core ladder.
    step_seconds: u64,
    /// Where the one-core ladder stops climbing.
    max_rate: u64,
    /// A step is sustained while the added p99 stays under this.
    p99_bound_us: u64,
    /// Also measure nginx in the sidecar's place.
    nginx: bool,
    /// Cores of the machine, read before the one-core ladders pin this process to one.
    cores: usize,
}

fn args() -> Args {
    let mut a = Args {
        rate: 1000,
        low_rate: 200,
        seconds: 10,
        stream_rate: 200,
        step_seconds: 4,
        max_rate: 24_000,
        p99_bound_us: 1000,
        nginx: true,
        cores: cpu::cores(),
    };
    let mut v: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = v.iter().position(|x| x == "--no-nginx") {
        v.remove(i);
        a.nginx = false;
    }
    for pair in v.chunks(2) {
        let n = pair.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        match pair[0].as_str() {
            "--rate" => a.rate = n,
            "--low-rate" => a.low_rate = n,
            "--seconds" => a.seconds = n,
            "--stream-rate" => a.stream_rate = n,
            "--step-seconds" => a.step_seconds = n,
            "--max-rate" => a.max_rate = n,
            "--p99-bound-us" => a.p99_bound_us = n,
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

struct Run {
    direct: Vec<u64>,
    proxy: Vec<u64>,
    direct_ttft: Vec<u64>,
    proxy_ttft: Vec<u64>,
    direct_gap: Vec<u64>,
    proxy_gap: Vec<u64>,
    identical: bool,
    /// Slots without a 2xx reply, with the first reason seen.
    failed: usize,
    first_failure: Option<String>,
    /// The proxy's CPU time over the run divided by the proxied requests, in µs.
    cpu_us_per_request: f64,
    /// How busy the load generator's core was (one-core runs only), 0..=1.
    generator_busy: f64,
}

impl Run {
    fn added(&self, p: f64) -> i64 {
        pct(&self.proxy, p) as i64 - pct(&self.direct, p) as i64
    }
}

/// Open loop at `rate` proxied requests per second for `seconds`, each proxied slot beside a
/// direct twin (the order of the twins rotates), with the proxy's CPU time around it.
async fn open_loop(
    client: &Http,
    targets: &[Target; 2],
    proxy_pid: u32,
    rate: u64,
    seconds: u64,
    stream: bool,
) -> Run {
    let cpu_before = cpu::process_cpu_us(proxy_pid);
    let core_before = cpu::core_jiffies(0);
    let samples = load::open_loop(
        client,
        &Schedule {
            targets,
            rate: rate * 2,
            seconds: seconds as f64,
            stream,
            max_tokens: 16,
            timeout: Duration::from_secs(60),
        },
    )
    .await;
    let cpu_used = cpu::process_cpu_us(proxy_pid) - cpu_before;
    let generator_busy = cpu::busy_between(core_before, cpu::core_jiffies(0));
    let mut run = Run {
        direct: vec![],
        proxy: vec![],
        direct_ttft: vec![],
        proxy_ttft: vec![],
        direct_gap: vec![],
        proxy_gap: vec![],
        identical: true,
        failed: 0,
        first_failure: None,
        cpu_us_per_request: 0.0,
        generator_busy,
    };
    let mut bodies: HashMap<u64, [Option<Bytes>; 2]> = HashMap::new();
    for Sample {
        target,
        pair,
        latency_us,
        outcome,
        ..
    } in samples
    {
        let reply = match outcome {
            Ok(r) if (200..300).contains(&r.status) => r,
            other => {
                run.failed += 1;
                run.first_failure.get_or_insert_with(|| match other {
                    Ok(r) => format!("status {} from {}", r.status, targets[target].url),
                    Err(e) => format!("{}: {e}", targets[target].url),
                });
                continue;
            }
        };
        let (lat, ttft, gap) = if target == 1 {
            (&mut run.proxy, &mut run.proxy_ttft, &mut run.proxy_gap)
        } else {
            (&mut run.direct, &mut run.direct_ttft, &mut run.direct_gap)
        };
        lat.push(latency_us);
        ttft.extend(reply.ttft.map(|t| t.as_micros() as u64));
        gap.extend(reply.gaps.iter().map(|g| g.as_micros() as u64));
        bodies.entry(pair).or_default()[target] = Some(reply.body);
    }
    for [d, p] in bodies.into_values() {
        if let (Some(d), Some(p)) = (d, p) {
            run.identical &= d == p;
        }
    }
    for v in [
        &mut run.direct,
        &mut run.proxy,
        &mut run.direct_ttft,
        &mut run.proxy_ttft,
        &mut run.direct_gap,
        &mut run.proxy_gap,
    ] {
        v.sort_unstable();
    }
    run.cpu_us_per_request = cpu_used as f64 / run.proxy.len().max(1) as f64;
    run
}

/// A measured run that must not fail.
fn all_ok(run: Run, what: &str) -> Run {
    if let Some(why) = &run.first_failure {
        panic!("{what}: {} slots failed, first: {why}", run.failed);
    }
    run
}

/// The Budget every run charges: a cost cap far above what the run spends.
fn budget() -> serde_json::Value {
    json!({"name": "bench", "limits": {"costMicros": 1_000_000_000_000u64},
        "period": {"calendar": "month"}})
}

fn show(name: &str, d: &[u64], p: &[u64]) {
    println!(
        "{name:<24} direct p50={:>6}us p99={:>6}us | proxy p50={:>6}us p99={:>6}us | added p50={:>6}us p99={:>6}us (n={})",
        pct(d, 0.5),
        pct(d, 0.99),
        pct(p, 0.5),
        pct(p, 0.99),
        pct(p, 0.5) as i64 - pct(d, 0.5) as i64,
        pct(p, 0.99) as i64 - pct(d, 0.99) as i64,
        p.len()
    );
}

/// The highest step of the one-core ladder that held.
struct Capacity {
    rate: u64,
    added_p99_us: i64,
    cpu_us_per_request: f64,
    rss_kib: u64,
    /// What ended the climb: `bound` (added p99 or a failed slot), `generator` (the load
    /// generator's core was saturated first, so the sidecar's ceiling is higher), or `max_rate`.
    limited_by: &'static str,
}

/// The proxy alone on core 1, the load generator and the provider on core 0: an open-loop
/// ladder (doubling to 4,000 req/s, then +2,000) until the added p99 passes the bound or a slot
/// fails. `Err` says why no step held: `skipped` (one core), or what ended the first step.
async fn one_core_ladder(a: &Args, kind: Kind) -> Result<Capacity, &'static str> {
    if a.cores < 2 {
        println!("one-core ladder skipped: this machine has one core");
        return Err("skipped");
    }
    cpu::pin_self(0);
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = Upstream::start_on(Some(0));
    let proxy = Proxy::start(kind, Some(1), &upstream, dir.path());
    let client = load::client();
    let targets = [upstream.target(), proxy.target()];
    open_loop(&client, &targets, proxy.pid(), 200, 2, false).await;
    let mut best: Option<Capacity> = None;
    let mut rate = 1000;
    let limited_by = loop {
        if rate > a.max_rate {
            break "max_rate";
        }
        let run = open_loop(&client, &targets, proxy.pid(), rate, a.step_seconds, false).await;
        let (rss, _) = cpu::process_rss_kib(proxy.pid());
        let added = run.added(0.99);
        println!(
            "{kind:?} one core @{rate:>6} rps: added p50={:>6}us p99={:>6}us, {:.1} CPU-us/request, rss {} KiB, generator core {:.0}% busy, failed {}",
            run.added(0.5),
            added,
            run.cpu_us_per_request,
            rss,
            run.generator_busy * 100.0,
            run.failed,
        );
        if run.failed > 0 || added >= a.p99_bound_us as i64 {
            if let Some(why) = &run.first_failure {
                println!("  first failure: {why}");
            }
            break if run.generator_busy > 0.9 {
                "generator"
            } else {
                "bound"
            };
        }
        best = Some(Capacity {
            rate,
            added_p99_us: added,
            cpu_us_per_request: run.cpu_us_per_request,
            rss_kib: rss,
            limited_by: "bound",
        });
        rate = if rate < 4000 { rate * 2 } else { rate + 2000 };
    };
    best.map(|b| Capacity { limited_by, ..b }).ok_or(limited_by)
}

/// The proxy under test: the sidecar, or nginx in its place.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Soma,
    Nginx,
}

enum Proxy {
    Soma(Sidecar),
    Nginx(Nginx),
}

impl Proxy {
    /// Starts `kind` in front of `upstream`, on core `cpu` when given. The sidecar as
    /// deployed: a cost Budget, prices, the journal and SQLite outbox.
    fn start(kind: Kind, cpu: Option<usize>, upstream: &Upstream, dir: &std::path::Path) -> Proxy {
        match kind {
            Kind::Soma => Proxy::Soma(Sidecar::start_on(
                cpu,
                &sidecar_config(upstream, dir, &[budget()]),
                dir,
            )),
            Kind::Nginx => {
                let bin = nginx::binary().expect(
                    "nginx not found (bench/proxy-overhead installs nginx-light; \
                     SOMA_BENCH_NGINX names another, --no-nginx leaves it out)",
                );
                Proxy::Nginx(Nginx::start_on(&bin, cpu, upstream, dir))
            }
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Proxy::Soma(s) => s.pid(),
            Proxy::Nginx(n) => n.pid(),
        }
    }

    fn target(&self) -> Target {
        match self {
            Proxy::Soma(s) => s.target(),
            Proxy::Nginx(n) => n.target(),
        }
    }
}

/// What one proxy measured in the three runs on both cores.
struct Figures {
    main: Run,
    rss: u64,
    low: Run,
    stream: Run,
    /// The sidecar's own view of its added time (its histogram's bucket bounds), p50 and p99.
    inside: Option<(u64, u64)>,
}

/// The ladder's figures, zeros when no step held.
fn capacity_keys(cap: &Result<Capacity, &'static str>) -> (u64, i64, f64, u64, &'static str) {
    cap.as_ref().map_or_else(
        |why| (0, 0, 0.0, 0, *why),
        |c| {
            (
                c.rate,
                c.added_p99_us,
                c.cpu_us_per_request,
                c.rss_kib,
                c.limited_by,
            )
        },
    )
}

async fn measure(kind: Kind, a: &Args) -> Figures {
    println!("== {kind:?} ==");
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = Upstream::start();
    let proxy = Proxy::start(kind, None, &upstream, dir.path());
    let client = load::client();
    let targets = [upstream.target(), proxy.target()];
    let pid = proxy.pid();
    // Warm-up: connections, tokenizer tables, SQLite pages.
    open_loop(&client, &targets, pid, 200, 2, false).await;

    let main = all_ok(
        open_loop(&client, &targets, pid, a.rate, a.seconds, false).await,
        "main run",
    );
    let (rss, peak) = cpu::process_rss_kib(pid);
    let low = all_ok(
        open_loop(&client, &targets, pid, a.low_rate, a.seconds, false).await,
        "low-rate run",
    );
    let stream = all_ok(
        open_loop(&client, &targets, pid, a.stream_rate, a.seconds, true).await,
        "stream run",
    );

    show(
        &format!("non-stream @{} rps", a.rate),
        &main.direct,
        &main.proxy,
    );
    println!(
        "  {kind:?}: {:.1} CPU-us per proxied request, rss {rss} KiB (peak {peak} KiB)",
        main.cpu_us_per_request
    );
    show(
        &format!("non-stream @{} rps", a.low_rate),
        &low.direct,
        &low.proxy,
    );
    println!(
        "  {kind:?}: {:.1} CPU-us per proxied request",
        low.cpu_us_per_request
    );
    show(
        &format!("stream TTFT @{} rps", a.stream_rate),
        &stream.direct_ttft,
        &stream.proxy_ttft,
    );
    show("stream inter-chunk", &stream.direct_gap, &stream.proxy_gap);
    // The sidecar's own view: time spent before forwarding plus after the provider's body
    // (non-streamed) or headers (streamed), from its histogram's bucket bounds.
    let inside = match &proxy {
        Proxy::Soma(sidecar) => {
            let metrics = sidecar.metrics(&client).await;
            let q = histogram_quantiles(
                &metrics,
                "soma_proxy_added_latency_seconds",
                "chat_completions",
            );
            println!(
                "inside the sidecar (all requests, histogram bucket bounds): p50<={}us p99<={}us",
                q.0, q.1
            );
            Some(q)
        }
        Proxy::Nginx(_) => None,
    };
    println!("streamed bytes identical: {}", stream.identical);
    println!(
        "non-stream bytes identical: {}",
        main.identical && low.identical
    );
    Figures {
        main,
        rss,
        low,
        stream,
        inside,
    }
}

#[tokio::main]
async fn main() {
    let a = args();
    println!("load average at start: {}", load_average());
    // Both proxies' runs on both cores first: the one-core ladders pin this process to core 0.
    let soma = measure(Kind::Soma, &a).await;
    let floor = if a.nginx {
        Some(measure(Kind::Nginx, &a).await)
    } else {
        None
    };
    let soma_cap = one_core_ladder(&a, Kind::Soma).await;
    let floor_cap = if a.nginx {
        Some(one_core_ladder(&a, Kind::Nginx).await)
    } else {
        None
    };
    println!("load average at end: {}", load_average());

    let (cap_rate, cap_p99, cap_cpu, cap_rss, cap_limit) = capacity_keys(&soma_cap);
    let (inside_p50, inside_p99) = soma.inside.unwrap_or_default();
    let (r, low, s) = (&soma.main, &soma.low, &soma.stream);
    let nginx_keys = floor.as_ref().zip(floor_cap.as_ref()).map_or_else(
        || "nginx=skipped".to_owned(),
        |(f, cap)| {
            let (rate, p99, cpu, _, limit) = capacity_keys(cap);
            format!(
                "nginx_added_p50_us={} nginx_added_p99_us={} nginx_cpu_us_per_request={:.1} nginx_low_added_p99_us={} nginx_low_cpu_us_per_request={:.1} nginx_one_core_max_rps={rate} nginx_one_core_added_p99_us={p99} nginx_one_core_cpu_us_per_request={cpu:.1} nginx_one_core_limited_by={limit}",
                f.main.added(0.5),
                f.main.added(0.99),
                f.main.cpu_us_per_request,
                f.low.added(0.99),
                f.low.cpu_us_per_request,
            )
        },
    );
    println!(
        "RESULT proxy-overhead rate_rps={} added_p50_us={} added_p99_us={} cpu_us_per_request={:.1} rss_kib={} low_rate_rps={} low_added_p50_us={} low_added_p99_us={} low_cpu_us_per_request={:.1} one_core_max_rps={cap_rate} one_core_added_p99_us={cap_p99} one_core_cpu_us_per_request={cap_cpu:.1} one_core_rss_kib={cap_rss} one_core_limited_by={cap_limit} stream_added_ttft_p50_us={} stream_added_ttft_p99_us={} stream_added_gap_p99_us={} stream_rate_rps={} bytes_identical={} inside_p50_le_us={inside_p50} inside_p99_le_us={inside_p99} {nginx_keys}",
        a.rate,
        r.added(0.5),
        r.added(0.99),
        r.cpu_us_per_request,
        soma.rss,
        a.low_rate,
        low.added(0.5),
        low.added(0.99),
        low.cpu_us_per_request,
        pct(&s.proxy_ttft, 0.5) as i64 - pct(&s.direct_ttft, 0.5) as i64,
        pct(&s.proxy_ttft, 0.99) as i64 - pct(&s.direct_ttft, 0.99) as i64,
        pct(&s.proxy_gap, 0.99) as i64 - pct(&s.direct_gap, 0.99) as i64,
        a.stream_rate,
        r.identical && low.identical && s.identical,
    );
}
