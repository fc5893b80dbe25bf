//! Metering conformance: every recording of `tests/conformance/corpus/<provider>/<shape>/`
//! (real provider responses, sources in `corpus/SOURCES.md`) is served byte for byte by a
//! replay provider on 127.0.0.1 while its request goes through the real sidecar. Streams are
//! served in chunks cut at odd byte boundaries, and once more in one piece.
//!
//! For each recording the test checks that the client got the recorded bytes and status, and
//! that the outbox row, `/metrics` and the cost equal what the provider billed (`billed` in
//! `meta.yaml`), per token kind and per server-tool use, with no usage field left unmetered.
//! OpenAI streams recorded with `stream_options.include_usage` are also replayed for a client
//! that did not ask for usage: the sidecar asks for it, meters it, and the client sees no
//! usage chunk.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on a failed set-up too

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};
use support::*;

/// Prices for every replayed model, each kind a different odd number so that a token counted
/// under the wrong kind changes the cost.
fn price() -> Value {
    json!({
        "inputPerMTok": 3_000_011u64,
        "cachedInputPerMTok": 300_007u64,
        "cacheWritePerMTok": 3_750_019u64,
        "cacheWrite1hPerMTok": 6_000_023u64,
        "outputPerMTok": 15_000_017u64,
        "webSearchPerUse": 10_007u64,
        "webFetchPerUse": 1_009u64,
    })
}

/// What the provider billed, in the sidecar's normalisation (`billed` in `meta.yaml`).
#[derive(Debug, Default, PartialEq)]
struct Billed {
    input: u64,
    cached: u64,
    cache_write: u64,
    cache_write_1h: u64,
    output: u64,
    reasoning: u64,
    web_search: u64,
    web_fetch: u64,
}

impl Billed {
    fn of(meta: &Value) -> Billed {
        let b = &meta["billed"];
        let n = |k: &str| b[k].as_u64().unwrap_or(0);
        Billed {
            input: n("input_tokens"),
            cached: n("cached_input_tokens"),
            cache_write: n("cache_write_input_tokens"),
            cache_write_1h: n("cache_write_1h_input_tokens"),
            output: n("output_tokens"),
            reasoning: n("reasoning_tokens"),
            web_search: n("web_search_requests"),
            web_fetch: n("web_fetch_requests"),
        }
    }

    fn of_row(r: &Value) -> Billed {
        let n = |k: &str| r[k].as_u64().unwrap();
        Billed {
            input: n("input_tokens"),
            cached: n("cached_input_tokens"),
            cache_write: n("cache_write_input_tokens"),
            cache_write_1h: n("cache_write_1h_input_tokens"),
            output: n("output_tokens"),
            reasoning: n("reasoning_tokens"),
            web_search: n("web_search_requests"),
            web_fetch: n("web_fetch_requests"),
        }
    }

    /// The cost at [`price`], written out here rather than taken from the sidecar's code:
    /// ceil(Σ tokens × price / 1e6) + Σ uses × price.
    fn cost(&self) -> u64 {
        let plain = self.input - self.cached - self.cache_write;
        let write_5m = self.cache_write - self.cache_write_1h;
        let scaled: u128 = [
            (plain, 3_000_011u128),
            (self.cached, 300_007),
            (write_5m, 3_750_019),
            (self.cache_write_1h, 6_000_023),
            (self.output, 15_000_017),
        ]
        .iter()
        .map(|(n, p)| u128::from(*n) * p)
        .sum();
        let uses = self.web_search * 10_007 + self.web_fetch * 1_009;
        u64::try_from(scaled.div_ceil(1_000_000)).unwrap() + uses
    }
}

/// One recording.
struct Recording {
    name: String,
    meta: Value,
    request: Value,
    body: Bytes,
}

fn corpus() -> Vec<Recording> {
    let root = Path::new(
        &std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()),
    )
    .join("tests/conformance/corpus");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .filter(|p| p.path().is_dir())
        .flat_map(|p| std::fs::read_dir(p.path()).unwrap().flatten())
        .map(|e| e.path())
        .filter(|p| p.join("meta.yaml").exists())
        .collect();
    dirs.sort();
    dirs.into_iter()
        .map(|d| Recording {
            name: d.strip_prefix(&root).unwrap().display().to_string(),
            meta: serde_yaml::from_str(&std::fs::read_to_string(d.join("meta.yaml")).unwrap())
                .unwrap(),
            request: serde_json::from_slice(&std::fs::read(d.join("request.json")).unwrap())
                .unwrap(),
            body: Bytes::from(std::fs::read(d.join("response.body")).unwrap()),
        })
        .collect()
}

/// How a replayed body is cut into chunks.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// The whole body at once.
    Whole,
    /// Chunks of 1, 7, 13, 2, 64, 3, 257, 5 … bytes, cutting through lines, events and UTF-8.
    Odd,
}

/// A provider stand-in that answers every request with one recording, and keeps the
/// request bodies it was sent.
struct Replay {
    addr: String,
    received: Arc<Mutex<Vec<Value>>>,
}

async fn replay(status: u16, content_type: String, body: Bytes, cut: Cut) -> Replay {
    let received = Arc::new(Mutex::new(Vec::new()));
    let seen = received.clone();
    let app = axum::Router::new().fallback(move |req: Request| {
        let (body, content_type, seen) = (body.clone(), content_type.clone(), seen.clone());
        async move {
            let sent = axum::body::to_bytes(req.into_body(), 64 << 20)
                .await
                .unwrap();
            seen.lock()
                .unwrap()
                .push(serde_json::from_slice(&sent).unwrap_or(Value::Null));
            let chunks = match cut {
                Cut::Whole => vec![body],
                Cut::Odd => {
                    let sizes = [1usize, 7, 13, 2, 64, 3, 257, 5];
                    let mut out = Vec::new();
                    let mut at = 0;
                    for i in 0.. {
                        if at >= body.len() {
                            break;
                        }
                        let end = (at + sizes[i % sizes.len()]).min(body.len());
                        out.push(body.slice(at..end));
                        at = end;
                    }
                    out
                }
            };
            // One frame per chunk, each sent on its own.
            let stream = futures::stream::unfold(chunks.into_iter(), |mut it| async move {
                let next = it.next()?;
                tokio::task::yield_now().await;
                Some((Ok::<_, std::io::Error>(next), it))
            });
            Response::builder()
                .status(status)
                .header("content-type", content_type)
                .body(Body::from_stream(stream))
                .unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Replay {
        addr: format!("http://{addr}"),
        received,
    }
}

/// The sidecar's path for a recording's endpoint (OpenAI-compatible providers may serve the
/// same API without `/v1`).
fn sidecar_path(endpoint: &str) -> String {
    if endpoint.starts_with("/v1/") {
        endpoint.to_owned()
    } else {
        format!("/v1{endpoint}")
    }
}

/// The value of a `/metrics` series, 0 when absent.
fn series(metrics: &str, name: &str, labels: &str) -> u64 {
    let prefix = format!("{name}{{{labels}}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

/// What one replay showed.
struct Seen {
    status: u16,
    body: Bytes,
    broken: bool,
    row: Value,
    metrics: String,
    forwarded: Value,
}

/// Sends `request` through a fresh sidecar to a replay of `rec`.
async fn run(rec: &Recording, request: &Value, cut: Cut) -> Seen {
    let meta = &rec.meta;
    let kind = match meta["provider"].as_str().unwrap() {
        "anthropic" => "anthropic",
        "openai" => "openai",
        _ => "openaiCompatible",
    };
    let status = meta["status"].as_u64().unwrap() as u16;
    let content_type = meta["content_type"].as_str().unwrap().to_owned();
    let upstream = replay(status, content_type, rec.body.clone(), cut).await;
    let dir = tempfile::tempdir().unwrap();
    let model = request["model"].as_str().unwrap().to_owned();
    let config = config_json(
        &upstream.addr,
        kind,
        dir.path(),
        json!({"prices": {model.clone(): price()}}),
    );
    let proxy = start_proxy(&config).await;
    let client = http();
    let path = sidecar_path(meta["endpoint"].as_str().unwrap());
    let url = format!("http://{}{path}", proxy.proxy_addr);
    let bearer = format!("Bearer {TOKEN}");
    let headers: Vec<(&str, &str)> = if kind == "anthropic" {
        vec![
            ("x-api-key", TOKEN),
            ("content-type", "application/json"),
            ("anthropic-version", "2023-06-01"),
        ]
    } else {
        vec![
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ]
    };
    let reply = send(&client, "POST", &url, &headers, request.to_string()).await;
    // The row is settled before the body ends; wait for the fold to show it.
    let mut rows = Vec::new();
    for _ in 0..200 {
        rows = proxy.state.outbox.rows().await.unwrap();
        if rows.iter().all(|r| r["state"] == "settled") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let metrics = send(
        &client,
        "GET",
        &format!("http://{}/metrics", proxy.admin_addr),
        &[],
        String::new(),
    )
    .await
    .text();
    let forwarded = upstream
        .received
        .lock()
        .unwrap()
        .first()
        .cloned()
        .unwrap_or(Value::Null);
    Seen {
        status: reply.status.as_u16(),
        body: reply.body,
        broken: reply.broken,
        row: rows.first().cloned().unwrap_or(Value::Null),
        metrics,
        forwarded,
    }
}

/// Checks one replay against the recording; returns what differs.
fn check(rec: &Recording, request: &Value, seen: &Seen, bytes_must_match: bool) -> Vec<String> {
    let mut wrong = Vec::new();
    let meta = &rec.meta;
    let status = meta["status"].as_u64().unwrap() as u16;
    if seen.status != status || seen.broken {
        wrong.push(format!(
            "client got status {} (broken: {}), recorded {status}",
            seen.status, seen.broken
        ));
    }
    if bytes_must_match && seen.body != rec.body {
        wrong.push(format!(
            "client bytes differ ({} vs {} recorded)",
            seen.body.len(),
            rec.body.len()
        ));
    }
    if seen.row.is_null() {
        if status == 200 {
            wrong.push("no outbox row".into());
        }
        return wrong;
    }
    let billed = if status == 200 {
        Billed::of(meta)
    } else {
        Billed::default() // an error is not billed: the reservation is released
    };
    let row = Billed::of_row(&seen.row);
    if row != billed {
        wrong.push(format!("outbox row {row:?}, billed {billed:?}"));
    }
    let cost = seen.row["cost_micros"].as_u64().unwrap();
    if cost != billed.cost() {
        wrong.push(format!("cost {cost} micros, billed {}", billed.cost()));
    }
    if status == 200 && seen.row["estimated"] != false {
        wrong.push("the record is an estimate".into());
    }
    let unmetered = seen.row["unmetered"].as_str().unwrap_or("?");
    if !unmetered.is_empty() {
        wrong.push(format!("fields left unmetered: {unmetered}"));
    }
    // /metrics, per token kind and tool.
    let model = request["model"].as_str().unwrap();
    let base = format!("namespace=\"research\",agent=\"assistant\",model=\"{model}\"");
    for (kind, want) in [
        ("input", billed.input),
        ("cached_input", billed.cached),
        ("cache_write_input", billed.cache_write),
        ("cache_write_1h_input", billed.cache_write_1h),
        ("output", billed.output),
        ("reasoning", billed.reasoning),
    ] {
        let got = series(
            &seen.metrics,
            "soma_proxy_tokens_total",
            &format!("{base},kind=\"{kind}\""),
        );
        if got != want {
            wrong.push(format!("metric tokens {kind} = {got}, billed {want}"));
        }
    }
    for (tool, want) in [
        ("web_search", billed.web_search),
        ("web_fetch", billed.web_fetch),
    ] {
        let got = series(
            &seen.metrics,
            "soma_proxy_tool_uses_total",
            &format!("{base},tool=\"{tool}\""),
        );
        if got != want {
            wrong.push(format!("metric tool uses {tool} = {got}, billed {want}"));
        }
    }
    let metric_cost = series(&seen.metrics, "soma_proxy_cost_micros_total", &base);
    if metric_cost != billed.cost() {
        wrong.push(format!(
            "metric cost {metric_cost}, billed {}",
            billed.cost()
        ));
    }
    wrong
}

/// The recording's OpenAI chat stream as a client that did not ask for usage sees it: every
/// event but the usage-only chunk, and no `"usage": null` member. (A provider that puts the
/// usage on its finish chunk instead keeps it there: the sidecar does not rewrite chunks.)
fn check_stripped(rec: &Recording, seen: &Seen) -> Vec<String> {
    let mut wrong = Vec::new();
    if seen.forwarded.pointer("/stream_options/include_usage") != Some(&Value::Bool(true)) {
        wrong.push("the sidecar did not ask the provider for usage".into());
    }
    let events = |b: &[u8]| -> Vec<Value> {
        String::from_utf8_lossy(b)
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect()
    };
    let recorded = events(&rec.body);
    let got = events(&seen.body);
    let usage_only = recorded
        .iter()
        .filter(|e| e["choices"].as_array().is_some_and(Vec::is_empty))
        .count();
    if got.len() + usage_only != recorded.len() {
        wrong.push(format!(
            "client got {} events, recorded {} with {usage_only} usage-only",
            got.len(),
            recorded.len()
        ));
    }
    if got.iter().any(|e| e.get("usage") == Some(&Value::Null)) {
        wrong.push("a \"usage\": null member reached the client".into());
    }
    let text = |es: &[Value]| -> String {
        es.iter()
            .filter_map(|e| {
                e.pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
            })
            .collect()
    };
    if text(&got) != text(&recorded) {
        wrong.push("the delivered text differs".into());
    }
    wrong
}

#[tokio::test]
async fn every_recorded_shape_is_metered_as_billed() {
    let corpus = corpus();
    assert!(
        corpus.len() >= 35,
        "the corpus has {} recordings",
        corpus.len()
    );
    let mut failures = Vec::new();
    let mut replays = 0;
    for rec in &corpus {
        let streamed = rec.meta["streamed"].as_bool().unwrap_or(false);
        let cuts: &[Cut] = if streamed {
            &[Cut::Odd, Cut::Whole]
        } else {
            &[Cut::Whole]
        };
        for &cut in cuts {
            let seen = run(rec, &rec.request, cut).await;
            replays += 1;
            for w in check(rec, &rec.request, &seen, true) {
                failures.push(format!("{} ({cut:?}): {w}", rec.name));
            }
        }
        // A client that did not ask for usage on an OpenAI chat stream.
        let asked =
            rec.request.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
        if streamed && asked && rec.meta["status"] == 200 {
            let mut request = rec.request.clone();
            request.as_object_mut().unwrap().remove("stream_options");
            let seen = run(rec, &request, Cut::Odd).await;
            replays += 1;
            let mut wrong = check(rec, &request, &seen, false);
            wrong.extend(check_stripped(rec, &seen));
            for w in wrong {
                failures.push(format!("{} (client without include_usage): {w}", rec.name));
            }
        }
    }
    println!("replayed {replays} times over {} recordings", corpus.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
