//! The real `soma-proxy` binary: key hygiene across every response and log line, and a
//! `kill -9` mid-stream followed by a restart on the same outbox.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on a failed set-up too

mod support;

use http_body_util::BodyExt;
use serde_json::{Value, json};
use soma_proxy::fake_upstream::FakeUpstream;
use support::sidecar::*;
use support::*;

fn reply_text(r: &Reply) -> String {
    let mut s = format!("{}\n", r.status);
    for (k, v) in &r.headers {
        s.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    s.push_str(&r.text());
    s
}

#[tokio::test]
async fn the_key_never_appears_in_any_response_or_log_line() {
    for kind in ["openai", "anthropic"] {
        let upstream = FakeUpstream::start(KEY).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(
            dir.path(),
            &upstream.url(),
            kind,
            json!({
                "budget": "team",
                "budgets": [{"name": "team", "limits": {"costMicros": 30_000}, "period": {"calendar": "day"}}],
            }),
        );
        let p = spawn(&cfg, "trace");
        let client = http();
        let (path, model, auth_header) = match kind {
            "openai" => ("/v1/chat/completions", "gpt-4o", "authorization"),
            _ => ("/v1/messages", "claude-sonnet-4", "x-api-key"),
        };
        let good = if kind == "openai" {
            format!("Bearer {TOKEN}")
        } else {
            TOKEN.to_owned()
        };
        let with_key = if kind == "openai" {
            format!("Bearer {KEY}")
        } else {
            KEY.to_owned()
        };
        let body = |text: &str, extra: Value| {
            let mut b = json!({"model": model, "max_tokens": 20, "messages": [{"role": "user", "content": text}]});
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            b.to_string()
        };
        let url = format!("http://{}{path}", p.addr);
        let mut replies = Vec::new();
        for (auth, payload, ct) in [
            (good.as_str(), body("hello", json!({})), "application/json"),
            (
                good.as_str(),
                body("hello", json!({"stream": true})),
                "application/json",
            ),
            (
                good.as_str(),
                body("SCENARIO:echo-key", json!({})),
                "application/json",
            ),
            (
                good.as_str(),
                body("SCENARIO:error-500", json!({})),
                "application/json",
            ),
            (
                good.as_str(),
                body("SCENARIO:cut", json!({"stream": true})),
                "application/json",
            ),
            (
                good.as_str(),
                body("SCENARIO:error-mid-stream", json!({"stream": true})),
                "application/json",
            ),
            (good.as_str(), "{broken".to_owned(), "application/json"),
            (good.as_str(), body("hello", json!({})), "text/plain"),
            (
                good.as_str(),
                body("hello", json!({"model": "no-such-model"})),
                "application/json",
            ),
            (
                good.as_str(),
                body("hello", json!({"max_tokens": 100_000})),
                "application/json",
            ),
            (
                with_key.as_str(),
                body("hello", json!({})),
                "application/json",
            ),
            ("Bearer nope", body("hello", json!({})), "application/json"),
        ] {
            replies.push(
                send(
                    &client,
                    "POST",
                    &url,
                    &[(auth_header, auth), ("content-type", ct)],
                    payload,
                )
                .await,
            );
        }
        replies.push(
            send(
                &client,
                "GET",
                &format!("http://{}/metrics", p.admin),
                &[],
                String::new(),
            )
            .await,
        );
        let statuses: Vec<u16> = replies.iter().map(|r| r.status.as_u16()).collect();
        // ok, ok, echo (400 passed through), 500, cut, mid-stream error, bad json, content type,
        // unknown model, budget, key-as-token, wrong token, metrics
        assert_eq!(
            statuses,
            vec![
                200, 200, 400, 500, 200, 200, 400, 415, 400, 429, 401, 401, 200
            ],
            "{kind}"
        );
        assert!(
            replies[2].text().contains("[redacted]"),
            "{}",
            replies[2].text()
        );
        for r in &replies {
            let text = reply_text(r);
            assert!(!text.contains(KEY), "{kind}: key in a response:\n{text}");
        }
        // The provider did receive the key.
        assert!(
            upstream
                .received()
                .iter()
                .all(|c| c.headers.iter().any(|(_, v)| v.contains(KEY)))
        );
        let logs = p.kill();
        assert!(
            logs.iter().any(|l| l.contains("usage recorded")),
            "no usage logs: {logs:#?}"
        );
        for l in &logs {
            assert!(!l.contains(KEY), "{kind}: key in a log line: {l}");
        }
    }
}

#[tokio::test]
async fn kill_9_mid_stream_loses_nothing_and_counts_it_once_after_restart() {
    let upstream = FakeUpstream::start(KEY).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &upstream.url(),
        "openai",
        json!({
            "budget": "team",
            "budgets": [{"name": "team", "limits": {"costMicros": 1_000_000}, "period": {"calendar": "day"}}],
        }),
    );
    let p = spawn(&cfg, "trace");
    let client = http();
    // One complete request, then a slow stream killed after its first chunk.
    let done = send(&client, "POST", &format!("http://{}/v1/chat/completions", p.addr),
        &[("authorization", &format!("Bearer {TOKEN}")), ("content-type", "application/json")],
        json!({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}).to_string()).await;
    assert_eq!(done.status, 200);
    let req = hyper::Request::post(format!("http://{}/v1/chat/completions", p.addr))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            json!({"model": "gpt-4o", "max_tokens": 200, "stream": true, "messages": [{"role": "user", "content": "SCENARIO:slow"}]}).to_string(),
        )))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let mut body = resp.into_body();
    assert!(body.frame().await.unwrap().unwrap().is_data());
    p.kill();
    drop(body);

    let p = spawn(&cfg, "trace");
    let outbox = soma_proxy::outbox::Outbox::open(&dir.path().join("outbox.db"))
        .await
        .unwrap();
    let rows = outbox.rows().await.unwrap();
    assert_eq!(rows.len(), 2, "{rows:#?}");
    assert!(rows.iter().all(|r| r["state"] == "settled"));
    let killed = &rows[1];
    assert_eq!(
        (killed["outcome"].as_str(), killed["estimated"].as_bool()),
        (Some("interrupted"), Some(true))
    );
    // Charged at its reservation: never less than what the client could have received.
    assert_eq!(killed["cost_micros"], killed["reserved_micros"]);
    // The restarted sidecar counts both against the Budget, once: a request that needs more
    // than what is left is refused with exactly that remainder.
    let total: u64 = rows
        .iter()
        .map(|r| r["cost_micros"].as_u64().unwrap())
        .sum();
    let r = send(&client, "POST", &format!("http://{}/v1/chat/completions", p.addr),
        &[("authorization", &format!("Bearer {TOKEN}")), ("content-type", "application/json")],
        json!({"model": "gpt-4o", "max_tokens": 100_000, "messages": [{"role": "user", "content": "hi"}]}).to_string()).await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.json()["soma_budget"]["remaining"].as_u64(),
        Some(1_000_000 - total)
    );
    outbox.close().await;
    p.kill();
}
