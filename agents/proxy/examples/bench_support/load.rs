//! The load generator: an HTTP/1 keep-alive client, one call with its timings, an open-loop
//! schedule over several targets, and percentiles.
//!
//! Open loop: slot `i` is due at `start + i / rate` whatever happened before, and its latency
//! is counted from that due time, so a stall cannot hide the requests queued behind it (no
//! coordinated omission). Slot `i` carries prompt number `i / targets.len()`, so the same
//! prompt reaches every target ("twins"); the order of the twins rotates from round to round.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

/// The client every benchmark uses.
pub type Http = Client<HttpConnector, Full<Bytes>>;

/// A keep-alive client with room for many idle connections.
pub fn client() -> Http {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector)
}

/// Where a slot's request goes.
#[derive(Clone, Debug)]
pub struct Target {
    /// Full URL of the endpoint.
    pub url: String,
    /// The `Authorization` header value.
    pub auth: String,
}

impl Target {
    /// The chat endpoint of the server at `addr` (`127.0.0.1:PORT`), called with `token`.
    pub fn chat(addr: &str, token: &str) -> Target {
        Target {
            url: format!("http://{addr}/v1/chat/completions"),
            auth: format!("Bearer {token}"),
        }
    }
}

/// A finished call.
#[derive(Debug, Default)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// The whole body.
    pub body: Bytes,
    /// From sending to the first body bytes.
    pub ttft: Option<Duration>,
    /// Between consecutive body frames.
    pub gaps: Vec<Duration>,
}

/// The request body for prompt number `n`.
pub fn chat_body(n: u64, stream: bool, max_tokens: u64) -> Bytes {
    chat_body_with(n, stream, max_tokens, 0)
}

/// [`chat_body`] whose prompt also carries about `prose_bytes` of English prose, new in every
/// request (as a tool's output or a user's turn is): the words are drawn from a fixed list by
/// `n`, so no two requests send the same text.
pub fn chat_body_with(n: u64, stream: bool, max_tokens: u64, prose_bytes: usize) -> Bytes {
    const WORDS: [&str; 16] = [
        "the", "agent", "reads", "a", "file", "and", "writes", "its", "summary", "before",
        "calling", "another", "tool", "with", "results", "again",
    ];
    let mut content = format!("request {n} of the benchmark.");
    let mut state = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while content.len() < prose_bytes {
        // xorshift: a different word sequence for every `n`.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        content.push(' ');
        content.push_str(WORDS[(state % WORDS.len() as u64) as usize]);
    }
    let v = json!({"model": "gpt-4o", "max_tokens": max_tokens, "stream": stream,
        "messages": [{"role": "user", "content": content}]});
    Bytes::from(v.to_string())
}

/// POSTs `body` to `target`; any status is a reply, a transport failure an error.
pub async fn call(client: &Http, target: &Target, body: Bytes) -> Result<Reply, String> {
    let t = Instant::now();
    let req = hyper::Request::post(&target.url)
        .header("authorization", &target.auth)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut reply = Reply {
        status,
        ..Reply::default()
    };
    let mut buf = Vec::new();
    let mut last = Instant::now();
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.map_err(|e| e.to_string())?.into_data() {
            let now = Instant::now();
            match reply.ttft {
                None => reply.ttft = Some(now - t),
                Some(_) => reply.gaps.push(now - last),
            }
            last = now;
            buf.extend_from_slice(&d);
        }
    }
    reply.body = Bytes::from(buf);
    Ok(reply)
}

/// GETs `url` and returns the body as text (metrics, health).
pub async fn get_text(client: &Http, url: &str) -> Result<(u16, String), String> {
    let req = hyper::Request::get(url)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// One slot of an open-loop run.
#[derive(Debug)]
pub struct Sample {
    /// Index into the targets.
    pub target: usize,
    /// Prompt number (the same for the twins sent to each target).
    pub pair: u64,
    /// From the slot's due time to the end of the body, in µs.
    pub latency_us: u64,
    /// From the start of the run to the end of the body.
    pub done_at: Duration,
    /// The reply, or why there was none (including `timeout`).
    pub outcome: Result<Reply, String>,
}

impl Sample {
    /// A 2xx reply.
    pub fn ok(&self) -> bool {
        matches!(&self.outcome, Ok(r) if (200..300).contains(&r.status))
    }
}

/// An open-loop schedule: `rate` slots per second for `seconds`, spread round-robin over
/// `targets`; every call gives up after `timeout`.
pub struct Schedule<'a> {
    /// Where slots go.
    pub targets: &'a [Target],
    /// Slots per second, over all targets.
    pub rate: u64,
    /// Length of the schedule.
    pub seconds: f64,
    /// Streaming requests.
    pub stream: bool,
    /// `max_tokens` of every request.
    pub max_tokens: u64,
    /// Per-call limit; a call over it is an error.
    pub timeout: Duration,
}

/// Runs `s` and returns every slot's sample, in slot order.
///
/// Slots are released by a dedicated thread that sleeps until each due time
/// (`std::thread::sleep`, accurate to the kernel's timer slack, about 50 µs) and hands the call
/// to the runtime; tokio's own timer rounds to whole milliseconds, which would add up to 1 ms
/// of scheduling lag to every latency. Within a round of `n` twins the order rotates (round
/// `r` starts with target `r % n`), so no target is always the first of its round.
pub async fn open_loop(client: &Http, s: &Schedule<'_>) -> Vec<Sample> {
    let total = (s.rate as f64 * s.seconds).round() as u64;
    let n = s.targets.len().max(1) as u64;
    let interval = Duration::from_nanos(1_000_000_000 / s.rate.max(1));
    let start = Instant::now() + Duration::from_millis(50);
    let runtime = tokio::runtime::Handle::current();
    let (client, targets, stream, max_tokens, timeout) = (
        client.clone(),
        s.targets.to_vec(),
        s.stream,
        s.max_tokens,
        s.timeout,
    );
    let releaser = std::thread::spawn(move || {
        let mut tasks = Vec::with_capacity(total as usize);
        for i in 0..total {
            let due = start + interval * i as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let pair = i / n;
            let target = ((i + pair) % n) as usize;
            let body = chat_body(pair, stream, max_tokens);
            let (client, t) = (client.clone(), targets[target].clone());
            tasks.push(runtime.spawn(async move {
                let outcome = match tokio::time::timeout(timeout, call(&client, &t, body)).await {
                    Ok(r) => r,
                    Err(_) => Err("timeout".to_owned()),
                };
                let now = Instant::now();
                Sample {
                    target,
                    pair,
                    latency_us: now.saturating_duration_since(due).as_micros() as u64,
                    done_at: now.saturating_duration_since(start),
                    outcome,
                }
            }));
        }
        tasks
    });
    let tasks = tokio::task::spawn_blocking(move || releaser.join().expect("slot releaser"))
        .await
        .expect("slot releaser");
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("load task"));
    }
    out
}

/// The `p` quantile (0..=1) of sorted values, nearest rank; 0 when empty.
pub fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Sorted latencies (µs) of the successful samples sent to `target`.
pub fn ok_latencies(samples: &[Sample], target: usize) -> Vec<u64> {
    let mut v: Vec<u64> = samples
        .iter()
        .filter(|s| s.target == target && s.ok())
        .map(|s| s.latency_us)
        .collect();
    v.sort_unstable();
    v
}
