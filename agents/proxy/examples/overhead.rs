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

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

const KEY: &str = "sk-bench-key";
const TOKEN: &str = "bench-pod-token";

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

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `bin` and returns the first line containing `marker`.
fn start(
    bin: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
    marker: &str,
) -> (Killed, String) {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    let out = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(out).lines();
    let line = loop {
        match lines.next() {
            Some(Ok(l)) if l.contains(marker) => break l,
            Some(Ok(_)) => continue,
            _ => panic!("{} exited before {marker:?}", bin.display()),
        }
    };
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (Killed(child), line)
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

type Http = Client<HttpConnector, Full<Bytes>>;

async fn call(
    client: &Http,
    url: &str,
    auth: &str,
    body: Bytes,
) -> (Bytes, Option<Duration>, Vec<Duration>) {
    let t = Instant::now();
    let req = hyper::Request::post(url)
        .header("authorization", auth)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .expect("request");
    let resp = client.request(req).await.expect("response");
    assert!(resp.status().is_success(), "status {}", resp.status());
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut first = None;
    let mut gaps = Vec::new();
    let mut last = Instant::now();
    while let Some(f) = body.frame().await {
        let f = f.expect("body");
        if let Ok(d) = f.into_data() {
            let now = Instant::now();
            if first.is_none() {
                first = Some(now - t);
            } else {
                gaps.push(now - last);
            }
            last = now;
            buf.extend_from_slice(&d);
        }
    }
    (Bytes::from(buf), first, gaps)
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

/// Open loop at `rate` for `seconds`, alternating direct and proxied slots.
async fn open_loop(
    client: &Http,
    direct: &str,
    proxy: &str,
    rate: u64,
    seconds: u64,
    stream: bool,
) -> Run {
    let total = rate * seconds;
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let via_proxy = i % 2 == 1;
        let (url, auth) = if via_proxy {
            (proxy.to_owned(), format!("Bearer {TOKEN}"))
        } else {
            (direct.to_owned(), format!("Bearer {KEY}"))
        };
        let body = Bytes::from(
            json!({"model": "gpt-4o", "max_tokens": 16, "stream": stream,
                   "messages": [{"role": "user", "content": format!("request {} of the benchmark", i / 2)}]})
            .to_string(),
        );
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let (bytes, ttft, gaps) = call(&client, &url, &auth, body).await;
            let lat = Instant::now().saturating_duration_since(due);
            (via_proxy, lat, ttft, gaps, bytes, i / 2)
        }));
    }
    let mut run = Run {
        direct: vec![],
        proxy: vec![],
        direct_ttft: vec![],
        proxy_ttft: vec![],
        direct_gap: vec![],
        proxy_gap: vec![],
        identical: true,
    };
    let mut bodies: std::collections::HashMap<u64, (Option<Bytes>, Option<Bytes>)> =
        Default::default();
    for t in tasks {
        let (via_proxy, lat, ttft, gaps, bytes, pair) = t.await.expect("task");
        let us = lat.as_micros() as u64;
        let entry = bodies.entry(pair).or_default();
        let gaps_us = gaps.iter().map(|g| g.as_micros() as u64);
        if via_proxy {
            run.proxy.push(us);
            run.proxy_ttft.extend(ttft.map(|t| t.as_micros() as u64));
            run.proxy_gap.extend(gaps_us);
            entry.1 = Some(bytes);
        } else {
            run.direct.push(us);
            run.direct_ttft.extend(ttft.map(|t| t.as_micros() as u64));
            run.direct_gap.extend(gaps_us);
            entry.0 = Some(bytes);
        }
    }
    for (d, p) in bodies.into_values() {
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

async fn call_get(client: &Http, url: &str) -> String {
    let resp = client
        .request(
            hyper::Request::get(url)
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("metrics");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// Upper bucket bounds (µs) holding the 50th and 99th percentiles of a histogram.
fn histogram_quantiles(text: &str, name: &str, endpoint: &str) -> (u64, u64) {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(&format!("endpoint=\"{endpoint}\"")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    let q = |p: f64| {
        buckets
            .iter()
            .find(|(_, c)| *c >= total * p)
            .map_or(0, |(le, _)| {
                if le.is_finite() {
                    (le * 1e6).round() as u64
                } else {
                    u64::MAX
                }
            })
    };
    (q(0.5), q(0.99))
}

#[tokio::main]
async fn main() {
    let a = args();
    let exe = std::env::current_exe().expect("exe");
    let bin_dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    let dir = tempfile::tempdir().expect("tempdir");

    let (_up, line) = start(
        &bin_dir.join("soma-fake-upstream"),
        &["--listen", "127.0.0.1:0", "--key", KEY],
        &[],
        "listening on",
    );
    let upstream = line.trim_start_matches("listening on ").trim().to_owned();
    std::fs::write(dir.path().join("key"), KEY).expect("key");
    let config = json!({
        "listen": "127.0.0.1:0", "adminListen": "127.0.0.1:0",
        "agent": {"namespace": "bench", "name": "overhead"},
        "provider": {"kind": "openai", "upstream": format!("http://{upstream}"), "model": "gpt-4o"},
        "credentials": {"file": dir.path().join("key")},
        "budget": "bench", "clientTokenEnv": "SOMA_POD_UID", "tools": [], "capsules": [],
        "outboxPath": dir.path().join("outbox.db"),
        "prices": {"gpt-4o": {"inputPerMTok": 2_500_000, "outputPerMTok": 10_000_000, "cachedInputPerMTok": 1_250_000}},
        "budgets": [{"name": "bench", "limits": {"costMicros": 1_000_000_000_000u64}, "period": {"calendar": "month"}}],
    });
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, config.to_string()).expect("config");
    let (_proxy, line) = start(
        &bin_dir.join("soma-proxy"),
        &["--config", cfg.to_str().expect("utf-8 path")],
        &[
            ("SOMA_POD_UID", TOKEN),
            ("RUST_LOG", "warn,soma_proxy=info"),
        ],
        "soma-proxy serving",
    );
    let v: serde_json::Value = serde_json::from_str(&line).expect("json log");
    let proxy_addr = v["fields"]["proxy_addr"].as_str().expect("addr").to_owned();
    let admin_addr = v["fields"]["admin_addr"].as_str().expect("addr").to_owned();

    let client: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(512)
        .build_http();
    let direct = format!("http://{upstream}/v1/chat/completions");
    let proxy = format!("http://{proxy_addr}/v1/chat/completions");
    // Warm-up: connections, tokenizer tables, SQLite pages.
    open_loop(&client, &direct, &proxy, 200, 2, false).await;

    let r = open_loop(&client, &direct, &proxy, a.rate, a.seconds, false).await;
    let s = open_loop(&client, &direct, &proxy, a.stream_rate, a.seconds, true).await;

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
    let metrics = call_get(&client, &format!("http://{admin_addr}/metrics")).await;
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
