//! Added latency of the sidecar: the same open-loop load sent straight to the fake provider
//! and through `soma-proxy` (a Budget and usage recording on), interleaved slot by slot so
//! both see the same machine. Run by `bench/proxy-overhead`.
//!
//! Processes: `soma-fake-upstream` and `soma-proxy` (release builds beside this example), this
//! load generator. Latency is measured from each request's scheduled send time, so a stall
//! cannot hide queued requests (no coordinated omission).
//!
//! Prints the distributions and ends with
//! `RESULT proxy-overhead added_p50_us=.. added_p99_us=.. rate_rps=.. ...`.

#[path = "bench_support/mod.rs"]
mod bench_support;

use std::collections::HashMap;
use std::time::Duration;

use bench_support::load::{self, Http, Sample, Schedule, Target, pct};
use bench_support::soma::{Sidecar, Upstream, histogram_quantiles, sidecar_config};
use bytes::Bytes;
use serde_json::json;

struct Args {
    rate: u64,
    seconds: u64,
    stream_rate: u64,
}

fn args() -> Args {
    let mut a = Args {
        rate: 1000,
        seconds: 10,
        stream_rate: 200,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    for pair in v.chunks(2) {
        let n = pair.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        match pair[0].as_str() {
            "--rate" => a.rate = n,
            "--seconds" => a.seconds = n,
            "--stream-rate" => a.stream_rate = n,
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
}

/// Open loop at `rate` for `seconds`, alternating direct (even) and proxied (odd) slots.
async fn open_loop(
    client: &Http,
    targets: &[Target; 2],
    rate: u64,
    seconds: u64,
    stream: bool,
) -> Run {
    let samples = load::open_loop(
        client,
        &Schedule {
            targets,
            rate,
            seconds: seconds as f64,
            stream,
            max_tokens: 16,
            timeout: Duration::from_secs(60),
        },
    )
    .await;
    let mut run = Run {
        direct: vec![],
        proxy: vec![],
        direct_ttft: vec![],
        proxy_ttft: vec![],
        direct_gap: vec![],
        proxy_gap: vec![],
        identical: true,
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
            Ok(r) => panic!("status {} from {}", r.status, targets[target].url),
            Err(e) => panic!("{}: {e}", targets[target].url),
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
    run
}

#[tokio::main]
async fn main() {
    let a = args();
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = Upstream::start();
    // As deployed: a cost Budget (far above what the run spends), prices, the SQLite outbox.
    let budget = json!({"name": "bench", "limits": {"costMicros": 1_000_000_000_000u64},
        "period": {"calendar": "month"}});
    let sidecar = Sidecar::start(
        &sidecar_config(&upstream, dir.path(), &[budget]),
        dir.path(),
    );
    let client = load::client();
    let targets = [upstream.target(), sidecar.target()];
    // Warm-up: connections, tokenizer tables, SQLite pages.
    open_loop(&client, &targets, 200, 2, false).await;

    let r = open_loop(&client, &targets, a.rate, a.seconds, false).await;
    let s = open_loop(&client, &targets, a.stream_rate, a.seconds, true).await;

    let show = |name: &str, d: &[u64], p: &[u64]| {
        println!(
            "{name:<22} direct p50={:>6}us p99={:>6}us | proxy p50={:>6}us p99={:>6}us | added p50={:>6}us p99={:>6}us (n={})",
            pct(d, 0.5),
            pct(d, 0.99),
            pct(p, 0.5),
            pct(p, 0.99),
            pct(p, 0.5) as i64 - pct(d, 0.5) as i64,
            pct(p, 0.99) as i64 - pct(d, 0.99) as i64,
            p.len()
        );
    };
    show(&format!("non-stream @{} rps", a.rate), &r.direct, &r.proxy);
    show(
        &format!("stream TTFT @{} rps", a.stream_rate),
        &s.direct_ttft,
        &s.proxy_ttft,
    );
    show("stream inter-chunk", &s.direct_gap, &s.proxy_gap);
    // The sidecar's own view: time spent before forwarding plus after the provider's body
    // (non-streamed) or headers (streamed), from its histogram's bucket bounds.
    let metrics = sidecar.metrics(&client).await;
    let (inside_p50, inside_p99) = histogram_quantiles(
        &metrics,
        "soma_proxy_added_latency_seconds",
        "chat_completions",
    );
    println!(
        "inside the sidecar (all requests, histogram bucket bounds): p50<={inside_p50}us p99<={inside_p99}us"
    );
    println!("streamed bytes identical: {}", s.identical);
    println!("non-stream bytes identical: {}", r.identical);
    println!(
        "RESULT proxy-overhead added_p50_us={} added_p99_us={} rate_rps={} stream_added_ttft_p50_us={} stream_added_ttft_p99_us={} stream_added_gap_p99_us={} stream_rate_rps={} bytes_identical={} inside_p50_le_us={inside_p50} inside_p99_le_us={inside_p99}",
        pct(&r.proxy, 0.5) as i64 - pct(&r.direct, 0.5) as i64,
        pct(&r.proxy, 0.99) as i64 - pct(&r.direct, 0.99) as i64,
        a.rate,
        pct(&s.proxy_ttft, 0.5) as i64 - pct(&s.direct_ttft, 0.5) as i64,
        pct(&s.proxy_ttft, 0.99) as i64 - pct(&s.direct_ttft, 0.99) as i64,
        pct(&s.proxy_gap, 0.99) as i64 - pct(&s.direct_gap, 0.99) as i64,
        a.stream_rate,
        r.identical && s.identical,
    );
}
