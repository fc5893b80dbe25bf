//! The sidecar in-process against the deterministic fake provider, both on 127.0.0.1:
//! passthrough, metering, budgets, bad input, upstream failures, the outbox.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on a failed set-up too

mod support;

use serde_json::{Value, json};
use soma_metering::BudgetKey;
use support::*;

fn chat(model: &str, text: &str, extra: Value) -> Value {
    let mut b = json!({"model": model, "messages": [{"role": "user", "content": text}]});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

fn upstream_prompt_tokens(h: &Harness) -> u64 {
    let body: Value = serde_json::from_slice(&h.upstream.received().last().unwrap().body).unwrap();
    soma_proxy::fake_upstream::prompt_tokens(&body)
}

/// Tokens of the answer's first `n` words as the sidecar's tokenizer counts them.
fn words_tokens(n: u64) -> u64 {
    let text: String = (0..n).map(|i| format!("w{i} ")).collect();
    soma_metering::tokens::count_text("gpt-4o", &text)
}

#[tokio::test]
async fn non_streaming_openai_is_byte_identical_and_metered_from_the_providers_usage() {
    let h = Harness::start("openai", json!({})).await;
    let body = chat("gpt-4o", "hello SCENARIO:cached", json!({"max_tokens": 5}));
    let via = h.post("/v1/chat/completions", &body).await;
    let direct = h.post_direct("/v1/chat/completions", &body, false).await;
    assert_eq!(via.status, 200);
    assert_eq!(via.body, direct.body, "bytes differ");
    assert_eq!(via.headers["content-type"], direct.headers["content-type"]);
    let u = &via.json()["usage"];
    let (input, cached, output) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert!(cached > 0);
    let rows = h.rows().await;
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(
        (
            r["state"].as_str(),
            r["outcome"].as_str(),
            r["estimated"].as_bool()
        ),
        (Some("settled"), Some("ok"), Some(false))
    );
    assert_eq!(r["input_tokens"], input);
    assert_eq!(r["cached_input_tokens"], cached);
    assert_eq!(r["output_tokens"], output);
    assert_eq!(r["cost_micros"], cost("gpt-4o", input, cached, output));
    // The provider got the key, not the pod token, and no client credential.
    let seen = h.upstream.received();
    let auth: Vec<_> = seen[0]
        .headers
        .iter()
        .filter(|(k, _)| k == "authorization")
        .collect();
    assert_eq!(auth.len(), 1);
    assert_eq!(auth[0].1, format!("Bearer {KEY}"));
}

#[tokio::test]
async fn openai_stream_without_usage_requested_is_identical_to_the_providers_stream() {
    let h = Harness::start("openai", json!({})).await;
    let body = chat(
        "gpt-4o",
        "stream me",
        json!({"stream": true, "max_tokens": 6}),
    );
    let via = h.post("/v1/chat/completions", &body).await;
    // The sidecar asked the provider for usage...
    let sent: Value = serde_json::from_slice(&h.upstream.received()[0].body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    let prompt = upstream_prompt_tokens(&h);
    // ...and the client sees exactly what the provider sends a client that did not ask.
    let direct = h.post_direct("/v1/chat/completions", &body, false).await;
    assert_eq!(via.text(), direct.text());
    assert!(!via.text().contains("\"usage\""));
    let rows = h.rows().await;
    assert_eq!(
        (
            rows[0]["input_tokens"].as_u64(),
            rows[0]["output_tokens"].as_u64()
        ),
        (Some(prompt), Some(6))
    );
    assert_eq!(rows[0]["estimated"], false);
}

#[tokio::test]
async fn openai_stream_with_usage_requested_passes_the_usage_chunk_through() {
    let h = Harness::start("openai", json!({})).await;
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let mut body = json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 4});
        if path == "/v1/completions" {
            body["prompt"] = json!("say hi");
        } else {
            body["messages"] = json!([{"role": "user", "content": "hi"}]);
        }
        let via = h.post(path, &body).await;
        let direct = h.post_direct(path, &body, false).await;
        assert_eq!(via.body, direct.body, "{path}");
        assert!(via.text().contains("\"choices\":[],\"usage\""));
        // Forwarded unchanged: same bytes the client sent.
        assert_eq!(
            h.upstream.received().iter().rev().nth(1).unwrap().body,
            body.to_string().as_bytes()
        );
    }
    let rows = h.rows().await;
    assert!(
        rows.iter()
            .all(|r| r["estimated"] == false && r["output_tokens"] == 4)
    );
}

#[tokio::test]
async fn anthropic_messages_stream_and_body_are_identical_and_count_cache_reads() {
    let h = Harness::start("anthropic", json!({})).await;
    for stream in [false, true] {
        let body = json!({"model": "claude-sonnet-4", "max_tokens": 7, "stream": stream,
            "messages": [{"role": "user", "content": "hello SCENARIO:cached"}]});
        let via = h.post_anthropic("/v1/messages", &body).await;
        let direct = h.post_direct("/v1/messages", &body, true).await;
        assert_eq!(via.status, 200);
        assert_eq!(via.body, direct.body, "stream={stream}");
    }
    let rows = h.rows().await;
    let seen = h.upstream.received();
    let direct_calls = [&seen[1], &seen[3]];
    for (r, call) in rows.iter().zip(direct_calls) {
        let prompt =
            soma_proxy::fake_upstream::prompt_tokens(&serde_json::from_slice(&call.body).unwrap());
        assert_eq!(r["input_tokens"], prompt);
        assert_eq!(r["cached_input_tokens"], prompt / 2);
        assert_eq!(r["output_tokens"], 7);
        assert_eq!(r["estimated"], false);
        assert_eq!(
            r["cost_micros"],
            cost("claude-sonnet-4", prompt, prompt / 2, 7)
        );
    }
    // The provider got x-api-key = the key, and the client's anthropic-version.
    let headers = &h.upstream.received()[0].headers;
    assert!(headers.contains(&("x-api-key".into(), KEY.into())));
    assert!(headers.contains(&("anthropic-version".into(), "2023-06-01".into())));
}

#[tokio::test]
async fn responses_embeddings_models_and_count_tokens() {
    let h = Harness::start("openai", json!({})).await;
    let r = h.post("/v1/responses", &json!({"model": "gpt-4o", "input": "hi", "max_output_tokens": 3, "stream": true, "instructions": "SCENARIO:reasoning"})).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("response.completed"));
    let e = h
        .post(
            "/v1/embeddings",
            &json!({"model": "text-embedding-3-small", "input": ["a", "b"]}),
        )
        .await;
    assert_eq!(e.status, 200);
    let m = send(
        &h.client,
        "GET",
        &h.proxy_url("/v1/models"),
        &[("authorization", &format!("Bearer {TOKEN}"))],
        String::new(),
    )
    .await;
    assert_eq!(m.status, 200);
    assert_eq!(m.json()["data"][0]["id"], "gpt-4o");
    let rows = h.rows().await;
    assert_eq!(rows.len(), 2, "models is not metered");
    let resp = rows.iter().find(|r| r["endpoint"] == "responses").unwrap();
    assert_eq!(
        (
            resp["output_tokens"].as_u64(),
            resp["reasoning_tokens"].as_u64(),
            resp["estimated"].as_bool()
        ),
        (Some(3), Some(1), Some(false))
    );
    let emb = rows.iter().find(|r| r["endpoint"] == "embeddings").unwrap();
    assert_eq!(emb["output_tokens"], 0);

    let a = Harness::start("anthropic", json!({})).await;
    let c = a
        .post_anthropic(
            "/v1/messages/count_tokens",
            &json!({"model": "claude-sonnet-4", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(c.status, 200);
    assert!(c.json()["input_tokens"].as_u64().unwrap() > 0);
    assert!(a.rows().await.is_empty(), "count_tokens is not metered");
}

#[tokio::test]
async fn clients_without_the_pod_token_get_401_in_their_wire_format() {
    let h = Harness::start("openai", json!({})).await;
    let body = chat("gpt-4o", "hi", json!({})).to_string();
    for headers in [
        vec![("content-type", "application/json")],
        vec![
            ("content-type", "application/json"),
            ("authorization", "Bearer wrong"),
        ],
        vec![
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {KEY}")),
        ],
        vec![
            ("content-type", "application/json"),
            ("authorization", TOKEN),
        ],
    ] {
        let r = send(
            &h.client,
            "POST",
            &h.proxy_url("/v1/chat/completions"),
            &headers,
            body.clone(),
        )
        .await;
        assert_eq!(r.status, 401);
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    }
    let a = Harness::start("anthropic", json!({})).await;
    let r = send(
        &a.client,
        "POST",
        &a.proxy_url("/v1/messages"),
        &[("content-type", "application/json"), ("x-api-key", "nope")],
        body,
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    assert!(h.upstream.received().is_empty() && a.upstream.received().is_empty());
}

#[tokio::test]
async fn bad_input_gets_a_4xx_in_the_clients_format_and_changes_nothing() {
    let h = Harness::start("openai", json!({"bodyLimitBytes": 1024})).await;
    let auth = format!("Bearer {TOKEN}");
    let post = |path: &'static str, ct: &'static str, body: String| {
        let auth = auth.clone();
        let h = &h;
        async move {
            send(
                &h.client,
                "POST",
                &h.proxy_url(path),
                &[("authorization", &auth), ("content-type", ct)],
                body,
            )
            .await
        }
    };
    let cases = [
        (
            post(
                "/v1/chat/completions",
                "application/json",
                "{not json".into(),
            )
            .await,
            400,
            "invalid_request",
        ),
        (
            post("/v1/chat/completions", "application/json", "[1,2]".into()).await,
            400,
            "invalid_request",
        ),
        (
            post(
                "/v1/chat/completions",
                "text/plain",
                chat("gpt-4o", "hi", json!({})).to_string(),
            )
            .await,
            415,
            "invalid_request",
        ),
        (
            post(
                "/v1/chat/completions",
                "application/json",
                chat("gpt-4o", &"x".repeat(2048), json!({})).to_string(),
            )
            .await,
            413,
            "request_too_large",
        ),
        (
            post(
                "/v1/chat/completions",
                "application/json",
                chat("gpt-5-ultra", "hi", json!({})).to_string(),
            )
            .await,
            400,
            "model_not_found",
        ),
        (
            post(
                "/v1/chat/completions",
                "application/json",
                json!({"messages": []}).to_string(),
            )
            .await,
            400,
            "invalid_request",
        ),
        (
            post(
                "/v1/messages",
                "application/json",
                chat("gpt-4o", "hi", json!({})).to_string(),
            )
            .await,
            404,
            "not_found",
        ),
        (
            post("/v1/nope", "application/json", "{}".into()).await,
            404,
            "not_found",
        ),
    ];
    for (i, (r, status, code)) in cases.iter().enumerate() {
        assert_eq!(r.status, *status, "case {i}: {}", r.text());
        if i == 6 {
            // /v1/messages is Anthropic's endpoint: the error is in Anthropic's format.
            assert_eq!(r.json()["error"]["type"], "not_found_error");
            continue;
        }
        assert_eq!(r.json()["error"]["code"], *code, "case {i}");
        assert!(r.json()["error"]["message"].as_str().unwrap().len() > 10);
    }
    // JSON must be UTF-8: a body that is not says where it stops being UTF-8.
    let r = send(
        &h.client,
        "POST",
        &h.proxy_url("/v1/chat/completions"),
        &[("authorization", &auth), ("content-type", "application/json")],
        &b"{\"model\": \"gpt-4o\", \"messages\": [{\"role\": \"user\", \"content\": \"\xff\"}]}"[..],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "invalid_request");
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("not UTF-8 (at byte 62)"), "{message}");
    assert!(
        h.upstream.received().is_empty(),
        "bad input reached the provider"
    );
    assert!(h.rows().await.is_empty(), "bad input was recorded");
}

#[tokio::test]
async fn upstream_errors_pass_through_and_release_the_reservation() {
    let h = Harness::start("openai", json!({
        "budget": "team",
        "budgets": [{"name": "team", "limits": {"costMicros": 1_000_000}, "period": {"calendar": "day"}}],
    })).await;
    for scenario in ["error-500", "error-429"] {
        let body = chat("gpt-4o", &format!("SCENARIO:{scenario}"), json!({}));
        let via = h.post("/v1/chat/completions", &body).await;
        let direct = h.post_direct("/v1/chat/completions", &body, false).await;
        assert_eq!((via.status, &via.body), (direct.status, &direct.body));
    }
    let rows = h.rows().await;
    assert!(
        rows.iter()
            .all(|r| r["outcome"] == "upstream_error" && r["cost_micros"] == 0)
    );
    // Nothing held: the whole cap is left.
    let left = h
        .proxy
        .state
        .authority
        .remaining_micros(jiff::Timestamp::now());
    assert_eq!(
        left,
        vec![(BudgetKey::new("research", "team"), Some(1_000_000))]
    );
}

#[tokio::test]
async fn unreachable_and_silent_upstreams_get_502_and_504() {
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_json(&dead_url, "anthropic", dir.path(), json!({}));
    let p = start_proxy(&cfg).await;
    let r = send(
        &http(),
        "POST",
        &format!("http://{}/v1/messages", p.proxy_addr),
        &[("x-api-key", TOKEN), ("content-type", "application/json")],
        json!({"model": "claude-sonnet-4", "max_tokens": 5, "messages": []}).to_string(),
    )
    .await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["type"], "api_error");
    let rows = p.state.outbox.rows().await.unwrap();
    assert_eq!(
        (rows[0]["outcome"].as_str(), rows[0]["cost_micros"].as_u64()),
        (Some("upstream_unreachable"), Some(0))
    );

    let h = Harness::start("openai", json!({"timeouts": {"responseHeadersMs": 300}})).await;
    let r = h
        .post(
            "/v1/chat/completions",
            &chat("gpt-4o", "SCENARIO:headers-stall", json!({})),
        )
        .await;
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"]["code"], "upstream_unavailable");
}

#[tokio::test]
async fn a_stream_cut_midway_is_metered_from_what_was_delivered() {
    let h = Harness::start("openai", json!({})).await;
    let body = chat(
        "gpt-4o",
        "SCENARIO:cut",
        json!({"stream": true, "max_tokens": 10}),
    );
    let r = h.post("/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200);
    assert!(r.broken, "the client must see the stream break");
    let delivered = r.text().matches("\"content\":\"w").count() as u64;
    assert!(delivered > 0 && delivered < 10);
    let rows = h.settled_rows().await;
    assert_eq!(
        (rows[0]["outcome"].as_str(), rows[0]["estimated"].as_bool()),
        (Some("upstream_cut"), Some(true))
    );
    assert_eq!(
        rows[0]["output_tokens"].as_u64(),
        Some(words_tokens(delivered))
    );
    // The provider never said how long the prompt was: it is counted by the BPE (the
    // reservation was on its bound).
    assert_eq!(
        rows[0]["input_tokens"].as_u64(),
        Some(soma_metering::tokens::estimate_prompt("gpt-4o", &body))
    );
    assert!(rows[0]["prompt_estimate"].as_u64() > rows[0]["input_tokens"].as_u64());
    // Counted by cause, though the client had its 200.
    let m = h.metrics().await;
    for needle in [
        "soma_proxy_errors_total{reason=\"stream_cut\"} 1",
        "soma_proxy_stream_endings_total{outcome=\"upstream_cut\"} 1",
        "soma_proxy_requests_total{endpoint=\"chat_completions\",model=\"gpt-4o\",status=\"200\"} 1",
    ] {
        assert!(m.contains(needle), "missing {needle} in\n{m}");
    }

    // Anthropic: the input comes from message_start even when the stream dies.
    let a = Harness::start("anthropic", json!({})).await;
    let r = a.post_anthropic("/v1/messages", &json!({"model": "claude-sonnet-4", "max_tokens": 10, "stream": true, "messages": [{"role": "user", "content": "SCENARIO:cut"}]})).await;
    assert!(r.broken);
    let rows = a.settled_rows().await;
    assert_eq!(
        rows[0]["input_tokens"].as_u64(),
        Some(upstream_prompt_tokens(&a))
    );
    assert_eq!(rows[0]["estimated"], true);
}

#[tokio::test]
async fn a_stalled_stream_times_out_and_is_metered() {
    let h = Harness::start("openai", json!({"timeouts": {"idleMs": 300}})).await;
    let r = h
        .post(
            "/v1/chat/completions",
            &chat("gpt-4o", "SCENARIO:stall", json!({"stream": true})),
        )
        .await;
    assert!(r.broken);
    let rows = h.settled_rows().await;
    assert_eq!(rows[0]["outcome"], "upstream_timeout");
    assert_eq!(rows[0]["estimated"], true);
}

#[tokio::test]
async fn errors_inside_a_stream_are_forwarded_and_metered_as_delivered() {
    let h = Harness::start("openai", json!({})).await;
    let body = chat(
        "gpt-4o",
        "SCENARIO:error-mid-stream",
        json!({"stream": true, "max_tokens": 4}),
    );
    let via = h.post("/v1/chat/completions", &body).await;
    let direct = h.post_direct("/v1/chat/completions", &body, false).await;
    assert_eq!(via.body, direct.body);
    let rows = h.settled_rows().await;
    assert_eq!(
        (
            rows[0]["estimated"].as_bool(),
            rows[0]["output_tokens"].as_u64(),
            rows[0]["outcome"].as_str()
        ),
        (
            Some(true),
            Some(words_tokens(4)),
            Some("upstream_error_event")
        )
    );
    let m = h.metrics().await;
    for needle in [
        "soma_proxy_errors_total{reason=\"stream_error_event\"} 1",
        "soma_proxy_stream_endings_total{outcome=\"upstream_error_event\"} 1",
    ] {
        assert!(m.contains(needle), "missing {needle} in\n{m}");
    }
}

#[tokio::test]
async fn a_client_that_leaves_midway_is_metered_for_what_it_received() {
    use http_body_util::BodyExt;
    let h = Harness::start("openai", json!({})).await;
    let req = hyper::Request::post(h.proxy_url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            chat(
                "gpt-4o",
                "SCENARIO:slow",
                json!({"stream": true, "max_tokens": 200}),
            )
            .to_string(),
        )))
        .unwrap();
    let resp = h.client.request(req).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);
    let rows = h.settled_rows().await;
    assert_eq!(rows[0]["outcome"], "client_disconnected");
    assert_eq!(rows[0]["estimated"], true);
    assert!(
        rows[0]["output_tokens"].as_u64().unwrap() < 400,
        "metered beyond what was delivered"
    );
}

#[tokio::test]
async fn a_budget_refuses_with_429_naming_itself_what_is_left_and_when_it_resets() {
    let h = Harness::start("openai", json!({
        "budget": "team",
        "budgets": [{"name": "team", "limits": {"costMicros": 2_000}, "period": {"calendar": "day", "timeZone": "Europe/Berlin"}}],
    })).await;
    // Worst case of one request: ~20 prompt tokens at $2.50/M + 100 output at $10/M ≈ 1,050 micros.
    let body = chat("gpt-4o", "hi", json!({"max_tokens": 100}));
    let mut ok = 0;
    let mut refused = None;
    for _ in 0..5 {
        let r = h.post("/v1/chat/completions", &body).await;
        match r.status.as_u16() {
            200 => ok += 1,
            429 => {
                refused = Some(r);
                break;
            }
            s => panic!("unexpected {s}"),
        }
    }
    let r = refused.expect("the budget never refused");
    assert!(ok >= 1);
    let j = r.json();
    assert_eq!(j["error"]["type"], "insufficient_quota");
    assert_eq!(j["error"]["code"], "budget_exceeded");
    let msg = j["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("\"research/team\"")
            && msg.contains("costMicros")
            && msg.contains("resets at"),
        "{msg}"
    );
    assert_eq!(j["soma_budget"]["budget"], "research/team");
    let remaining = j["soma_budget"]["remaining"].as_u64().unwrap();
    assert!(remaining < j["soma_budget"]["requested"].as_u64().unwrap());
    assert!(r.headers.contains_key("retry-after"));
    let settled: u64 = h
        .rows()
        .await
        .iter()
        .map(|r| r["cost_micros"].as_u64().unwrap())
        .sum();
    assert!(settled <= 2_000);
    assert_eq!(remaining, 2_000 - settled);
    assert_eq!(
        h.upstream.received().len(),
        ok,
        "a refused request reached the provider"
    );

    // Anthropic clients get Anthropic's error shape.
    let a = Harness::start(
        "anthropic",
        json!({
            "budget": "team",
            "budgets": [{"name": "team", "limits": {"tokens": 10}, "period": {"rolling": "1h"}}],
        }),
    )
    .await;
    let r = a
        .post_anthropic(
            "/v1/messages",
            &json!({"model": "claude-sonnet-4", "max_tokens": 100, "messages": []}),
        )
        .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
}

#[tokio::test]
async fn a_prompt_is_counted_only_when_its_bound_does_not_fit() {
    // 600 tokens of text in 1,200 bytes; a Budget of 700 tokens.
    let text = "a ".repeat(600);
    let body = chat("gpt-4o", &text, json!({"max_tokens": 10}));
    let counted = soma_metering::tokens::estimate_prompt("gpt-4o", &body);
    let bound = soma_metering::tokens::prompt_bound_with(&body, 0);
    assert!(counted + 10 <= 700 && bound > 700, "{counted} {bound}");
    let budget = |tokens: u64| {
        json!({"budget": "team",
            "budgets": [{"name": "team", "limits": {"tokens": tokens}, "period": {"rolling": "1h"}}]})
    };
    // Room for the bound: reserved on it, the provider's count settles it.
    let roomy = Harness::start("openai", budget(1_000_000)).await;
    assert_eq!(roomy.post("/v1/chat/completions", &body).await.status, 200);
    let row = &roomy.rows().await[0];
    assert_eq!(row["prompt_estimate"].as_u64(), Some(bound));
    assert_eq!(row["estimated"], false);
    // No room for the bound: counted, and the count fits.
    let tight = Harness::start("openai", budget(700)).await;
    let r = tight.post("/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        tight.rows().await[0]["prompt_estimate"].as_u64(),
        Some(counted)
    );
    // Room for neither: refused, with the counted request in the refusal.
    let r = tight.post("/v1/chat/completions", &body).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(
        r.json()["soma_budget"]["requested"].as_u64(),
        Some(counted + 10)
    );
    assert_eq!(tight.upstream.received().len(), 1);
}

#[tokio::test]
async fn parent_budgets_cap_too_and_brown_out_switches_to_the_cheaper_model() {
    let h = Harness::start("openai", json!({
        "budget": "team",
        "budgets": [
            {"name": "team", "limits": {"costMicros": 1_000_000}, "period": {"calendar": "month"}, "parentRef": {"name": "tenant"},
             "onExhausted": {"action": "BrownOut", "brownOutModel": "gpt-4o-mini"}},
            {"name": "tenant", "limits": {"costMicros": 1_500}, "period": {"calendar": "month"}},
        ],
    })).await;
    // gpt-4o's worst case (~1,050) fits once; then the tenant refuses it, but the team's
    // brown-out sends gpt-4o-mini (~65) instead, which still fits.
    let body = chat("gpt-4o", "hi", json!({"max_tokens": 100}));
    assert_eq!(h.post("/v1/chat/completions", &body).await.status, 200);
    let r = h.post("/v1/chat/completions", &body).await;
    // The tenant refused, and the tenant has no brown-out: refused.
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["soma_budget"]["budget"], "research/tenant");

    let h = Harness::start(
        "openai",
        json!({
            "budget": "team",
            "budgets": [
                {"name": "team", "limits": {"costMicros": 1_500}, "period": {"calendar": "month"},
                 "onExhausted": {"action": "BrownOut", "brownOutModel": "gpt-4o-mini"}},
            ],
        }),
    )
    .await;
    assert_eq!(h.post("/v1/chat/completions", &body).await.status, 200);
    let r = h.post("/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let sent: Value = serde_json::from_slice(&h.upstream.received()[1].body).unwrap();
    assert_eq!(sent["model"], "gpt-4o-mini");
    let rows = h.rows().await;
    assert_eq!(rows[1]["model"], "gpt-4o-mini");
}

#[tokio::test]
async fn a_budget_without_a_definition_fails_closed() {
    let h = Harness::start("openai", json!({"budget": "missing"})).await;
    let r = h
        .post("/v1/chat/completions", &chat("gpt-4o", "hi", json!({})))
        .await;
    assert_eq!(r.status, 503);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"missing\"")
    );
    assert!(h.upstream.received().is_empty());
}

#[tokio::test]
async fn many_concurrent_clients_never_overspend_one_sidecar() {
    let cap = 200_000u64;
    let h = std::sync::Arc::new(Harness::start("openai", json!({
        "budget": "team",
        "budgets": [{"name": "team", "limits": {"costMicros": cap}, "period": {"calendar": "day"}}],
    })).await);
    let mut tasks = Vec::new();
    for c in 0..64u64 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let mut observed = 0u64;
            for i in 0..20u64 {
                let n = 1 + (c * 31 + i * 17) % 120;
                let stream = (c + i) % 2 == 0;
                let body = chat("gpt-4o", &"word ".repeat(n as usize), json!({"max_tokens": n, "stream": stream, "stream_options": {"include_usage": true}}));
                let r = h.post("/v1/chat/completions", &body).await;
                match r.status.as_u16() {
                    200 => {
                        // The client's own view of usage, from the provider's numbers.
                        let usage: Value = if stream {
                            let line = r.text().lines().find(|l| l.contains("\"choices\":[],")).unwrap().to_owned();
                            serde_json::from_str::<Value>(line.trim_start_matches("data: ")).unwrap()["usage"].clone()
                        } else {
                            r.json()["usage"].clone()
                        };
                        observed += cost("gpt-4o", usage["prompt_tokens"].as_u64().unwrap(), 0, usage["completion_tokens"].as_u64().unwrap());
                    }
                    429 => {}
                    s => panic!("unexpected {s}: {}", r.text()),
                }
            }
            observed
        }));
    }
    let mut observed = 0;
    for t in tasks {
        observed += t.await.unwrap();
    }
    let totals = h.proxy.state.outbox.totals().await.unwrap();
    assert_eq!(totals.open, 0);
    assert!(totals.micros <= cap, "overspent: {} > {cap}", totals.micros);
    assert_eq!(
        totals.micros, observed,
        "the outbox disagrees with what the clients saw"
    );
    assert!(
        totals.micros > cap / 2,
        "the budget was barely used: {}",
        totals.micros
    );
}

#[tokio::test]
async fn a_restart_settles_interrupted_requests_and_remembers_spend() {
    let upstream = soma_proxy::fake_upstream::FakeUpstream::start(KEY)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_json(
        &upstream.url(),
        "openai",
        dir.path(),
        json!({
            "budget": "team",
            "budgets": [{"name": "team", "limits": {"costMicros": 5_000}, "period": {"calendar": "day"}}],
        }),
    );
    let p = start_proxy(&cfg).await;
    let r = send(
        &http(),
        "POST",
        &format!("http://{}/v1/chat/completions", p.proxy_addr),
        &[
            ("authorization", &format!("Bearer {TOKEN}")),
            ("content-type", "application/json"),
        ],
        chat("gpt-4o", "hi", json!({"max_tokens": 50})).to_string(),
    )
    .await;
    assert_eq!(r.status, 200);
    // A request that was in flight when the process died: an open row.
    p.state
        .outbox
        .begin(&soma_proxy::outbox::OpenRecord {
            id: "crashed-1".into(),
            namespace: "research".into(),
            agent: "assistant".into(),
            budgets: "research/team".into(),
            endpoint: "chat_completions",
            model: "gpt-4o".into(),
            started_at: jiff::Timestamp::now(),
            prompt_estimate: 10,
            max_output_tokens: 100,
            reserved: soma_metering::Amount {
                tokens: 110,
                micros: 1_025,
            },
        })
        .unwrap();
    let before = p.state.outbox.totals().await.unwrap();
    p.stop().await;

    let p = start_proxy(&cfg).await;
    let after = p.state.outbox.totals().await.unwrap();
    assert_eq!((after.open, after.rows), (0, 2));
    assert_eq!(
        after.micros,
        before.micros + 1_025,
        "interrupted request charged at its worst case"
    );
    let left = p.state.authority.remaining_micros(jiff::Timestamp::now());
    assert_eq!(
        left,
        vec![(
            BudgetKey::new("research", "team"),
            Some(5_000 - after.micros)
        )],
        "spend was forgotten across the restart"
    );
    let rows = p.state.outbox.rows().await.unwrap();
    let crashed = rows.iter().find(|r| r["id"] == "crashed-1").unwrap();
    assert_eq!(
        (crashed["outcome"].as_str(), crashed["estimated"].as_bool()),
        (Some("interrupted"), Some(true))
    );
}

#[tokio::test]
async fn healthz_and_metrics() {
    let h = Harness::start("openai", json!({})).await;
    h.post(
        "/v1/chat/completions",
        &chat("gpt-4o", "hi", json!({"max_tokens": 3})),
    )
    .await;
    h.post("/v1/chat/completions", &json!({"model": 1})).await;
    let admin = format!("http://{}", h.proxy.admin_addr);
    let hz = send(
        &h.client,
        "GET",
        &format!("{admin}/healthz"),
        &[],
        String::new(),
    )
    .await;
    assert_eq!((hz.status.as_u16(), hz.text().as_str()), (200, "ok"));
    let m = send(
        &h.client,
        "GET",
        &format!("{admin}/metrics"),
        &[],
        String::new(),
    )
    .await
    .text();
    for needle in [
        "soma_proxy_requests_total{endpoint=\"chat_completions\",model=\"gpt-4o\",status=\"200\"} 1",
        "soma_proxy_tokens_total{namespace=\"research\",agent=\"assistant\",model=\"gpt-4o\",kind=\"output\"} 3",
        "soma_proxy_cost_micros_total{namespace=\"research\",agent=\"assistant\",model=\"gpt-4o\"}",
        "soma_proxy_errors_total{reason=\"no_model\"} 1",
        "soma_proxy_upstream_latency_seconds_bucket",
        "soma_proxy_added_latency_seconds_bucket",
        "soma_proxy_in_flight_requests",
    ] {
        assert!(m.contains(needle), "missing {needle} in\n{m}");
    }
    // A refused request is counted once.
    let refused: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("soma_proxy_requests_total{") && l.contains("status=\"400\""))
        .collect();
    assert_eq!(
        refused,
        ["soma_proxy_requests_total{endpoint=\"chat_completions\",model=\"\",status=\"400\"} 1"]
    );
}

#[tokio::test]
async fn beyond_max_in_flight_a_request_gets_503_at_once_and_the_bound_recovers() {
    let h = Harness::start(
        "openai",
        json!({"maxInFlight": 2, "timeouts": {"responseHeadersMs": 1500}}),
    )
    .await;
    // Two calls whose provider holds its headers back occupy both places.
    let stalled = chat("gpt-4o", "SCENARIO:headers-stall", json!({"max_tokens": 3}));
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (client, url, body) = (
                h.client.clone(),
                h.proxy_url("/v1/chat/completions"),
                stalled.to_string(),
            );
            tokio::spawn(async move {
                send(
                    &client,
                    "POST",
                    &url,
                    &[
                        ("authorization", &format!("Bearer {TOKEN}")),
                        ("content-type", "application/json"),
                    ],
                    body,
                )
                .await
            })
        })
        .collect();
    for _ in 0..500 {
        if h.upstream.received().len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(
        h.upstream.received().len(),
        2,
        "both held calls reach the provider"
    );

    let ok = chat("gpt-4o", "hi", json!({"max_tokens": 3}));
    let refused = h.post("/v1/chat/completions", &ok).await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(refused.json()["error"]["code"], "overloaded");
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit of 2")
    );
    // The refused request never reached the provider and opened no outbox row.
    assert_eq!(h.upstream.received().len(), 2);
    assert_eq!(h.rows().await.len(), 2);

    // Once the held calls end (504 after responseHeadersMs), the places are free again.
    for t in held {
        assert_eq!(t.await.unwrap().status, 504);
    }
    let again = h.post("/v1/chat/completions", &ok).await;
    assert_eq!(again.status, 200);
    // A bound of zero is a configuration error, not a sidecar that refuses everything.
    let zero = json!({"maxInFlight": 0});
    let err = soma_proxy::Config::parse(
        &config_json(&h.upstream.url(), "openai", h.dir.path(), zero).to_string(),
    )
    .unwrap_err();
    assert!(
        format!("{:?}", std::error::Error::source(&err)).contains("nonzero"),
        "{err:?}"
    );
    let m = send(
        &h.client,
        "GET",
        &format!("http://{}/metrics", h.proxy.admin_addr),
        &[],
        String::new(),
    )
    .await
    .text();
    for needle in [
        "soma_proxy_in_flight_requests 0",
        "soma_proxy_errors_total{reason=\"overloaded\"} 1",
        "soma_proxy_requests_total{endpoint=\"chat_completions\",model=\"\",status=\"503\"} 1",
    ] {
        assert!(m.contains(needle), "missing {needle} in\n{m}");
    }
}
