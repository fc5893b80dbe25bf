//! The autoscaler's signal and brown-out, against a real sidecar in front of the fake provider:
//!
//! - `GET /load` on the admin port reports what the sidecar served (the contract's
//!   `LoadReport`), and `/metrics` the same as `soma_proxy_load_*`;
//! - the agent's report of its own queue (`PUT /v1/queue`) is `waiting` until it expires; a
//!   report without the pod token or with a bad body is refused and changes nothing;
//! - a brown-out in the configuration file (the live path the operator writes) sheds the
//!   computed share of low-priority traffic with 503 and `Retry-After` in the client's wire
//!   format, never high-priority traffic, downgrades instead when asked, and lifts when the
//!   file drops it; a brown-out the sidecar cannot enforce changes nothing.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on a failed set-up too

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use soma_contract::load::LoadReport;
use soma_proxy::fake_upstream::FakeUpstream;
use support::*;

fn chat(max_tokens: u64) -> Value {
    json!({"model": "gpt-4o", "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hello there"}]})
}

async fn post_with(url: &str, priority: Option<&str>, anthropic: bool, body: &Value) -> Reply {
    let auth = format!("Bearer {TOKEN}");
    let mut headers = vec![("content-type", "application/json")];
    if anthropic {
        headers.push(("x-api-key", TOKEN));
        headers.push(("anthropic-version", "2023-06-01"));
    } else {
        headers.push(("authorization", auth.as_str()));
    }
    if let Some(p) = priority {
        headers.push(("x-soma-priority", p));
    }
    send(&http(), "POST", url, &headers, body.to_string()).await
}

async fn load(admin: std::net::SocketAddr) -> LoadReport {
    let r = send(
        &http(),
        "GET",
        &format!("http://{admin}/load"),
        &[],
        String::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    serde_json::from_slice(&r.body).unwrap()
}

#[tokio::test]
async fn the_load_report_counts_what_the_sidecar_served() {
    let h = Harness::start("openai", json!({})).await;
    let url = h.proxy_url("/v1/chat/completions");
    let before = load(h.proxy.admin_addr).await;
    assert_eq!((before.requests, before.completed), (0, 0));
    assert_eq!(before.latency_p95_s, None);
    for i in 0..6 {
        let priority = ["low", "normal", "HIGH"][i % 3];
        let r = post_with(&url, Some(priority), false, &chat(5)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Bad input is refused in the client's format and is not load.
    let bad = post_with(&url, Some("urgent"), false, &chat(5)).await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("x-soma-priority")
    );
    let no_model = h
        .post("/v1/chat/completions", &json!({"messages": []}))
        .await;
    assert_eq!(no_model.status, 400);

    let report = load(h.proxy.admin_addr).await;
    assert_eq!(
        (report.requests, report.completed, report.in_flight),
        (6, 6, 0)
    );
    assert_eq!((report.shed, report.downgraded, report.waiting), (0, 0, 0));
    assert_eq!(report.started_at_ms, before.started_at_ms);
    assert!(report.at_ms >= before.at_ms);
    assert!(report.latency_sum_s > 0.0);
    assert!(report.latency_sq_sum_s2 > 0.0);
    let p95 = report.latency_p95_s.unwrap();
    assert!(p95 > 0.0 && p95 <= report.latency_sum_s * 1.2, "{p95}");
    // Tokens are the provider's, as the outbox recorded them.
    let rows = h.settled_rows().await;
    let input: u64 = rows
        .iter()
        .map(|r| r["input_tokens"].as_u64().unwrap())
        .sum();
    let output: u64 = rows
        .iter()
        .map(|r| r["output_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!((report.input_tokens, report.output_tokens), (input, output));
    assert!(input > 0 && output > 0);
    // The difference of two reports is the window the operator steps the autoscaler with.
    let signal = report.since(Some(&before));
    assert_eq!((signal.requests, signal.completed), (6, 6));

    let metrics = h.metrics().await;
    for line in [
        "soma_proxy_load_arrivals_total 6",
        "soma_proxy_load_completions_total 6",
        "soma_proxy_load_in_flight 0",
        "soma_proxy_load_shed_total 0",
        &format!("soma_proxy_load_input_tokens_total {input}"),
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    assert!(metrics.contains("soma_proxy_load_service_p95_seconds "));
    h.proxy.stop().await;
}

async fn put_queue(url: &str, token: Option<&str>, body: &str) -> Reply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = auth.as_deref() {
        headers.push(("authorization", a));
    }
    send(&http(), "PUT", url, &headers, body.to_owned()).await
}

#[tokio::test]
async fn the_agents_queue_report_is_waiting_until_it_expires_and_bad_reports_change_nothing() {
    let h = Harness::start("openai", json!({"queueReportTtlMs": 1500})).await;
    let url = h.proxy_url("/v1/queue");
    assert_eq!(load(h.proxy.admin_addr).await.waiting, 0);

    let ok = put_queue(&url, Some(TOKEN), r#"{"waiting": 12}"#).await;
    assert_eq!(ok.status, 204, "{}", ok.text());
    let report = load(h.proxy.admin_addr).await;
    assert_eq!(report.waiting, 12);
    assert_eq!(report.requests, 0, "a queue report is not an arrival");
    assert!(h.metrics().await.contains("soma_proxy_load_waiting 12"));

    // Refused, in OpenAI's error format, and nothing changes.
    for (token, body, status, says) in [
        (None, r#"{"waiting": 1}"#, 401, ""),
        (Some("not-the-pod-token"), r#"{"waiting": 1}"#, 401, ""),
        (Some(TOKEN), r#"{"waiting": -1}"#, 400, "waiting"),
        (
            Some(TOKEN),
            r#"{"waiting": 1, "arrivals": 3}"#,
            400,
            "arrivals",
        ),
        (Some(TOKEN), r#"{"queue": 1}"#, 400, "waiting"),
        (Some(TOKEN), "not json", 400, ""),
    ] {
        let r = put_queue(&url, token, body).await;
        assert_eq!(r.status, status, "{body}: {}", r.text());
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains(says), "{body}: {message}");
        assert_eq!(
            load(h.proxy.admin_addr).await.waiting,
            12,
            "{body} changed the report"
        );
    }
    let get = send(
        &http(),
        "GET",
        &url,
        &[("authorization", &format!("Bearer {TOKEN}"))],
        String::new(),
    )
    .await;
    assert_eq!(get.status, 405, "{}", get.text());

    // An agent that stops reporting stops adding to the signal.
    let deadline = Instant::now() + Duration::from_secs(30);
    while load(h.proxy.admin_addr).await.waiting != 0 {
        assert!(Instant::now() < deadline, "the report never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.proxy.stop().await;
}

struct Live {
    _upstream: FakeUpstream,
    dir: tempfile::TempDir,
    path: std::path::PathBuf,
    upstream_url: String,
    proxy: soma_proxy::Running,
}

impl Live {
    fn write(&self, brown_out: Option<Value>) {
        let mut extra = json!({"live": {"fileCheckMs": 50}});
        if let Some(b) = brown_out {
            extra["brownOut"] = b;
        }
        let config = config_json(&self.upstream_url, "openai", self.dir.path(), extra);
        std::fs::write(&self.path, config.to_string()).unwrap();
    }

    async fn start(kind: &str, brown_out: Option<Value>) -> Live {
        let upstream = FakeUpstream::start(KEY).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let mut extra = json!({"live": {"fileCheckMs": 50}});
        if let Some(b) = brown_out {
            extra["brownOut"] = b;
        }
        let config = config_json(&upstream.url(), kind, dir.path(), extra);
        std::fs::write(&path, config.to_string()).unwrap();
        let proxy = soma_proxy::start(
            soma_proxy::Config::parse(&config.to_string()).unwrap(),
            TOKEN.to_owned(),
            Some(path.clone()),
        )
        .await
        .unwrap();
        Live {
            upstream_url: upstream.url(),
            _upstream: upstream,
            dir,
            path,
            proxy,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy.proxy_addr)
    }
}

#[tokio::test]
async fn a_brown_out_sheds_its_share_of_low_priority_traffic_and_lifts_with_the_file() {
    let shed = json!({"fraction": 0.25, "action": "shed",
        "message": "P95 wait ≤ 2s needs 5 replicas, but maxReplicas is 2"});
    let live = Live::start("openai", Some(shed)).await;
    let url = live.url("/v1/chat/completions");
    // Half low, half high: a quarter of all traffic is half of the low traffic, and no high.
    let (mut low_shed, mut high_shed) = (0, 0);
    for _ in 0..40 {
        let low = post_with(&url, Some("low"), false, &chat(3)).await;
        if low.status == 503 {
            low_shed += 1;
            assert_eq!(low.headers["retry-after"], "15");
            let e = low.json();
            assert_eq!(e["error"]["code"], "brown_out", "{e}");
            assert!(
                e["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("maxReplicas is 2")
            );
        } else {
            assert_eq!(low.status, 200, "{}", low.text());
        }
        let high = post_with(&url, Some("high"), false, &chat(3)).await;
        if high.status != 200 {
            high_shed += 1;
        }
    }
    assert_eq!(high_shed, 0);
    assert!(
        (19..=21).contains(&low_shed),
        "{low_shed} of 40 low requests shed"
    );
    let report = load(live.proxy.admin_addr).await;
    // Shed requests are demand: the autoscaler must still see them.
    assert_eq!(report.requests, 80);
    assert_eq!(report.shed, low_shed);
    assert_eq!(report.completed, 80 - low_shed);

    // A brown-out the sidecar cannot enforce is refused; the one in force stays.
    live.write(Some(json!({"fraction": 0.5, "action": "downgrade"})));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        live.proxy
            .state
            .brown_out
            .spec()
            .is_some_and(|b| b.fraction == 0.25)
    );

    // The operator lifts it: within the file check, nothing is shed.
    live.write(None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while live.proxy.state.brown_out.spec().is_some() {
        assert!(
            Instant::now() < deadline,
            "the lifted brown-out was never taken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..20 {
        assert_eq!(
            post_with(&url, Some("low"), false, &chat(3)).await.status,
            200
        );
    }
    let metrics = live.proxy.state.metrics.encode().unwrap();
    assert!(
        metrics.contains(&format!(
            "soma_proxy_errors_total{{reason=\"brown_out\"}} {low_shed}"
        )),
        "{metrics}"
    );
    live.proxy.stop().await;
}

#[tokio::test]
async fn a_downgrade_brown_out_rewrites_the_model_and_an_anthropic_client_is_shed_in_its_format() {
    let live = Live::start("openai", None).await;
    let url = live.url("/v1/chat/completions");
    assert_eq!(post_with(&url, None, false, &chat(3)).await.status, 200);
    live.write(Some(
        json!({"fraction": 1.0, "action": "downgrade", "model": "gpt-4o-mini",
        "message": "maxReplicas is 1"}),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while live.proxy.state.brown_out.spec().is_none() {
        assert!(Instant::now() < deadline, "the brown-out was never taken");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = post_with(&url, Some("normal"), false, &chat(3)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["model"]
            .as_str()
            .map(|m| m.starts_with("gpt-4o-mini")),
        Some(true)
    );
    let high = post_with(&url, Some("high"), false, &chat(3)).await;
    assert_eq!(
        high.json()["model"]
            .as_str()
            .map(|m| m.starts_with("gpt-4o-mini")),
        Some(false)
    );
    assert_eq!(load(live.proxy.admin_addr).await.downgraded, 1);
    live.proxy.stop().await;

    let shed = json!({"fraction": 1.0, "action": "shed", "message": "maxReplicas is 1"});
    let live = Live::start("anthropic", Some(shed)).await;
    let body = json!({"model": "claude-sonnet-4", "max_tokens": 3,
        "messages": [{"role": "user", "content": "hi"}]});
    let r = post_with(&live.url("/v1/messages"), None, true, &body).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["retry-after"], "15");
    let e = r.json();
    assert_eq!(
        (e["type"].as_str(), e["error"]["type"].as_str()),
        (Some("error"), Some("overloaded_error"))
    );
    live.proxy.stop().await;
}
