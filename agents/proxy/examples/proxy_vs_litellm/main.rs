//! Soma's sidecar against LiteLLM's proxy, both in front of the same fake provider, in one
//! run. Run by `bench/proxy-vs-litellm`.
//!
//! 1. **Highest sustained rate.** Each proxy alone gets an open-loop ladder of rates (25, 50,
//!    100, ... doubling, then one step halfway between the last sustained rate and the first
//!    failed one). A rate is sustained when, over the step, achieved throughput (2xx replies
//!    over the longer of the step and the time the last reply arrived) is at least 95 % of the
//!    offered rate, under 1 % of calls fail or time out, and p99 latency from the scheduled
//!    time stays under a bound (500 ms by default). The ladder stops at the first rate not
//!    sustained.
//!    The same ladder straight to the provider shows the harness's own ceiling.
//! 2. **Added latency** at the highest rate LiteLLM sustains: for each proxy in turn, one
//!    open-loop schedule whose even slots go straight to the provider and odd slots through
//!    the proxy (each at that rate), as `bench/proxy-overhead` does; added = proxied
//!    percentile minus direct percentile of the same schedule.
//!
//! Ends with `RESULT proxy-vs-litellm soma_added_p99_us=.. litellm_added_p99_us=..
//! p99_ratio=.. soma_max_rps=.. litellm_max_rps=.. ...`.

#[path = "../bench_support/mod.rs"]
mod bench_support;
mod litellm;

use std::path::PathBuf;
use std::time::Duration;

use bench_support::load::{self, Http, Schedule, Target, ok_latencies, pct};
use bench_support::procs;
use bench_support::soma::{Sidecar, Upstream, sidecar_config};
use serde_json::json;

struct Args {
    step_seconds: f64,
    seconds: f64,
    max_rate: u64,
    p99_bound_ms: u64,
    litellm: PathBuf,
    workers: u32,
}

fn usage() -> ! {
    eprintln!(
        "usage: proxy_vs_litellm [--step-seconds S] [--seconds S] [--max-rate RPS] \
         [--p99-bound-ms MS] [--litellm PATH] [--litellm-workers N]"
    );
    std::process::exit(2)
}

fn args() -> Args {
    let cache = std::env::var("SOMA_CACHE").map_or_else(
        |_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/soma"),
        PathBuf::from,
    );
    let mut a = Args {
        step_seconds: 4.0,
        seconds: 20.0,
        max_rate: 12_800,
        p99_bound_ms: 500,
        litellm: cache.join("litellm-venv/bin/litellm"),
        workers: 2,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    for pair in v.chunks(2) {
        let [flag, value] = pair else { usage() };
        let num = || {
            value
                .parse::<f64>()
                .ok()
                .filter(|n| *n > 0.0)
                .unwrap_or_else(|| usage())
        };
        match flag.as_str() {
            "--step-seconds" => a.step_seconds = num(),
            "--seconds" => a.seconds = num(),
            "--max-rate" => a.max_rate = num() as u64,
            "--p99-bound-ms" => a.p99_bound_ms = num() as u64,
            "--litellm-workers" => a.workers = num() as u32,
            "--litellm" => a.litellm = PathBuf::from(value),
            _ => usage(),
        }
    }
    a
}

/// One ladder step's outcome.
struct Step {
    rate: u64,
    achieved: f64,
    error_rate: f64,
    p99_us: u64,
    sustained: bool,
    /// The first failure, if any (a status and body, or a transport error).
    first_error: Option<String>,
}

async fn step(client: &Http, target: &Target, rate: u64, a: &Args) -> Step {
    let samples = load::open_loop(
        client,
        &Schedule {
            targets: std::slice::from_ref(target),
            rate,
            seconds: a.step_seconds,
            stream: false,
            max_tokens: 16,
            timeout: Duration::from_secs(5),
        },
    )
    .await;
    let ok = samples.iter().filter(|s| s.ok()).count();
    let span = samples
        .iter()
        .map(|s| s.done_at.as_secs_f64())
        .fold(a.step_seconds, f64::max);
    let achieved = ok as f64 / span;
    let error_rate = 1.0 - ok as f64 / samples.len().max(1) as f64;
    let p99_us = pct(&ok_latencies(&samples, 0), 0.99);
    let sustained =
        achieved >= 0.95 * rate as f64 && error_rate < 0.01 && p99_us <= a.p99_bound_ms * 1000;
    let first_error = samples.iter().find(|s| !s.ok()).map(|s| match &s.outcome {
        Ok(r) => format!("HTTP {}", r.status),
        Err(e) => e.chars().take(120).collect(),
    });
    // Let any queue drain before the next step.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Step {
        rate,
        achieved,
        error_rate,
        p99_us,
        sustained,
        first_error,
    }
}

/// The ladder for one proxy; returns the highest sustained rate (0 if none).
async fn max_rate(client: &Http, name: &str, target: &Target, a: &Args) -> u64 {
    let show = |s: &Step| {
        println!(
            "  {name:<8} offered {:>6}/s  achieved {:>8.1}/s  errors {:>5.2}%  p99 {:>8}us  {}",
            s.rate,
            s.achieved,
            s.error_rate * 100.0,
            s.p99_us,
            if s.sustained {
                "sustained"
            } else {
                "NOT sustained"
            }
        );
        if let Some(e) = &s.first_error {
            println!("           first error: {e}");
        }
    };
    let mut best = 0;
    let mut rate = 25;
    let mut failed = None;
    while rate <= a.max_rate {
        let s = step(client, target, rate, a).await;
        show(&s);
        if !s.sustained {
            failed = Some(rate);
            break;
        }
        best = rate;
        rate *= 2;
    }
    if let Some(failed) = failed
        && best > 0
    {
        let mid = (best + failed) / 2;
        let s = step(client, target, mid, a).await;
        show(&s);
        if s.sustained {
            best = mid;
        }
    }
    best
}

/// Direct and proxied latency percentiles at `rate` per side.
struct Added {
    direct: (u64, u64),
    proxied: (u64, u64),
    errors: usize,
}

impl Added {
    fn p50(&self) -> i64 {
        self.proxied.0 as i64 - self.direct.0 as i64
    }
    fn p99(&self) -> i64 {
        self.proxied.1 as i64 - self.direct.1 as i64
    }
}

async fn added(client: &Http, direct: &Target, proxy: &Target, rate: u64, a: &Args) -> Added {
    let samples = load::open_loop(
        client,
        &Schedule {
            targets: &[direct.clone(), proxy.clone()],
            rate: rate * 2,
            seconds: a.seconds,
            stream: false,
            max_tokens: 16,
            timeout: Duration::from_secs(5),
        },
    )
    .await;
    let (d, p) = (ok_latencies(&samples, 0), ok_latencies(&samples, 1));
    Added {
        direct: (pct(&d, 0.5), pct(&d, 0.99)),
        proxied: (pct(&p, 0.5), pct(&p, 0.99)),
        errors: samples.iter().filter(|s| !s.ok()).count(),
    }
}

async fn warm_up(client: &Http, target: &Target) {
    let s = Schedule {
        targets: std::slice::from_ref(target),
        rate: 50,
        seconds: 2.0,
        stream: false,
        max_tokens: 16,
        timeout: Duration::from_secs(10),
    };
    let samples = load::open_loop(client, &s).await;
    if let Some(bad) = samples.iter().find(|s| !s.ok()) {
        let why = match &bad.outcome {
            Ok(r) => format!("HTTP {}: {}", r.status, String::from_utf8_lossy(&r.body)),
            Err(e) => e.clone(),
        };
        panic!("warm-up call to {} failed: {why}", target.url);
    }
}

#[tokio::main]
async fn main() {
    let a = args();
    // Checked before any process starts (exiting later would leave them running).
    if !a.litellm.is_file() {
        eprintln!(
            "proxy_vs_litellm: no LiteLLM at {} (install it with scripts/test-deps/litellm.sh)",
            a.litellm.display()
        );
        std::process::exit(1);
    }
    println!("load average at start: {}", procs::load_average());
    let dir = tempfile::tempdir().expect("tempdir");
    let client = load::client();
    let upstream = Upstream::start();
    // The Soma side as deployed: a cost Budget with per-minute token and request limits, all
    // far above what the run spends, a price table and the SQLite outbox.
    let budget = json!({"name": "bench",
        "limits": {"costMicros": 1_000_000_000_000u64, "tokensPerMinute": 100_000_000_000u64,
                   "requestsPerMinute": 100_000_000u64},
        "period": {"calendar": "month"}});
    let soma = Sidecar::start(
        &sidecar_config(&upstream, dir.path(), &[budget]),
        dir.path(),
    );
    println!("starting LiteLLM ({}) ...", a.litellm.display());
    let lite = litellm::LiteLlm::start(&client, &a.litellm, &upstream, dir.path(), a.workers).await;
    let (direct, soma_t, lite_t) = (upstream.target(), soma.target(), lite.target());
    for t in [&direct, &soma_t, &lite_t] {
        warm_up(&client, t).await;
    }

    println!(
        "highest sustained rate ({} s steps; >=95% achieved, <1% errors, p99 <= {} ms):",
        a.step_seconds, a.p99_bound_ms
    );
    let soma_max = max_rate(&client, "soma", &soma_t, &a).await;
    let lite_max = max_rate(&client, "litellm", &lite_t, &a).await;
    // The same ladder straight to the provider: the ceiling of this harness on this machine
    // (generator and provider share the cores with the proxy).
    let direct_max = max_rate(&client, "direct", &direct, &a).await;
    println!(
        "  soma max {soma_max}/s, litellm max {lite_max}/s (direct, no proxy: {direct_max}/s)"
    );

    let rate = lite_max.max(25);
    println!(
        "added latency at {rate}/s through each proxy (+ {rate}/s direct, interleaved, {} s):",
        a.seconds
    );
    let s = added(&client, &direct, &soma_t, rate, &a).await;
    let l = added(&client, &direct, &lite_t, rate, &a).await;
    for (name, r) in [("soma", &s), ("litellm", &l)] {
        println!(
            "  {name:<8} direct p50={:>6}us p99={:>6}us | proxied p50={:>7}us p99={:>7}us | added p50={:>7}us p99={:>7}us | errors {}",
            r.direct.0,
            r.direct.1,
            r.proxied.0,
            r.proxied.1,
            r.p50(),
            r.p99(),
            r.errors
        );
    }
    // Tail noise on a shared machine can put Soma's added p99 below its added p50 (or below
    // zero); the ratio then uses the added p50 instead, which can only make it smaller.
    let soma_floor = s.p99().max(s.p50()).max(1);
    if soma_floor != s.p99() {
        println!(
            "  (Soma's added p99 is below its added p50: the ratio divides by {soma_floor}us)"
        );
    }
    let ratio = l.p99() as f64 / soma_floor as f64;
    let rps_ratio = soma_max as f64 / lite_max.max(1) as f64;
    println!(
        "LiteLLM's added p99 over Soma's: {ratio:.1}x; Soma's max rate over LiteLLM's: {rps_ratio:.1}x"
    );
    println!("load average at end: {}", procs::load_average());
    println!(
        "RESULT proxy-vs-litellm soma_added_p50_us={} soma_added_p99_us={} litellm_added_p50_us={} litellm_added_p99_us={} p99_ratio={ratio:.1} soma_max_rps={soma_max} litellm_max_rps={lite_max} max_rps_ratio={rps_ratio:.1} rate_rps={rate} direct_max_rps={direct_max} errors={} aim_p99_ratio=20",
        s.p50(),
        s.p99(),
        l.p50(),
        l.p99(),
        s.errors + l.errors,
    );
}
