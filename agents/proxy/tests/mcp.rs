//! The MCP tool `capsule_recall` on a running sidecar, spoken to over HTTP as an MCP client
//! does (streamable HTTP: JSON-RPC `initialize`, `tools/list`, `tools/call` by POST): it
//! answers what `POST /v1/recall` answers, metered the same, behind the same token; a revoked
//! Capsule is a tool error carrying the reason; a message that is not JSON-RPC gets a
//! JSON-RPC error.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::{Value, json};
use support::capsules::{DIMS, MODEL, deliver};
use support::*;

async fn pod(revoked: bool) -> (Harness, String, tempfile::TempDir) {
    let capsules = tempfile::tempdir().unwrap();
    let digest = deliver(capsules.path(), "kb", MODEL, DIMS);
    let mut extra = json!({
        "capsules": [{"name": "kb", "digest": digest}],
        "recall": {"capsulesDir": capsules.path()},
    });
    if revoked {
        extra["revokedCapsules"] = json!([{"name": "kb", "digest": digest,
            "reason": "Capsule research/kb is revoked (spec.revoked)"}]);
    }
    let h = Harness::start_with_prices(
        "openai",
        extra,
        json!({MODEL: {"inputPerMTok": 20_000, "outputPerMTok": 0}}),
    )
    .await;
    (h, digest, capsules)
}

/// POSTs one JSON-RPC message (raw body) to `/mcp` as an MCP client does.
async fn mcp_raw(h: &Harness, body: String, token: bool) -> Reply {
    let auth = format!("Bearer {TOKEN}");
    let mut headers = vec![
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
        ("mcp-protocol-version", "2025-06-18"),
    ];
    if token {
        headers.push(("authorization", auth.as_str()));
    }
    send(&h.client, "POST", &h.proxy_url("/mcp"), &headers, body).await
}

async fn rpc(h: &Harness, id: i64, method: &str, params: Value) -> Value {
    let r = mcp_raw(
        h,
        json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string(),
        true,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.headers["content-type"].to_str().unwrap(),
        "application/json"
    );
    let v = r.json();
    assert_eq!(v["jsonrpc"], "2.0");
    assert_eq!(v["id"], id);
    v
}

#[tokio::test]
async fn the_tool_answers_what_recall_answers_and_is_metered_the_same() {
    let (h, digest, _c) = pod(false).await;
    let init = rpc(
        &h,
        1,
        "initialize",
        json!({"protocolVersion": "2025-06-18", "capabilities": {},
               "clientInfo": {"name": "test-agent", "version": "0"}}),
    )
    .await;
    assert_eq!(init["result"]["protocolVersion"], "2025-06-18");
    assert!(
        init["result"]["capabilities"]["tools"].is_object(),
        "{init}"
    );
    assert_eq!(init["result"]["serverInfo"]["name"], "soma-proxy");
    let note = mcp_raw(
        &h,
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string(),
        true,
    )
    .await;
    assert_eq!(note.status, 202);
    assert!(note.body.is_empty());

    let list = rpc(&h, 2, "tools/list", json!({})).await;
    let tools = list["result"]["tools"].as_array().unwrap();
    assert_eq!(tools.len(), 1);
    assert_eq!(tools[0]["name"], "capsule_recall");
    assert_eq!(tools[0]["inputSchema"]["type"], "object");
    assert!(tools[0]["inputSchema"]["properties"]["query"].is_object());

    let args = json!({"query": "how long do refunds to my card take", "k": 3});
    let called = rpc(
        &h,
        3,
        "tools/call",
        json!({"name": "capsule_recall", "arguments": args}),
    )
    .await;
    let result = &called["result"];
    assert_eq!(result["isError"], false, "{called}");
    let answer = &result["structuredContent"];
    assert_eq!(answer["data"][0]["chunk"], "billing.md#0", "{answer}");
    for d in answer["data"].as_array().unwrap() {
        assert_eq!(d["capsule"], "kb");
        assert_eq!(d["version"], "1.2.0");
        assert_eq!(d["digest"], digest.as_str());
    }
    let text: Value = serde_json::from_str(result["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(&text, answer, "the text content is the same answer");

    // The same request over plain HTTP answers the same.
    let plain = h.post("/v1/recall", &args).await;
    assert_eq!(plain.status, 200);
    assert_eq!(&plain.json(), answer);
    // Both embedded the query through the metered call: two embeddings on the record.
    let rows = h.settled_rows().await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r["endpoint"] == "embeddings"));
    assert!(
        h.metrics()
            .await
            .lines()
            .any(|l| l.contains("endpoint=\"recall\"")
                && l.contains("status=\"200\"")
                && l.ends_with(" 2")),
        "both counted as recalls"
    );

    // A recall the checks refuse is a tool error with recall's own status and error.
    let bad = rpc(
        &h,
        4,
        "tools/call",
        json!({"name": "capsule_recall", "arguments": {"query": "refunds", "k": 0}}),
    )
    .await;
    assert_eq!(bad["result"]["isError"], true, "{bad}");
    assert_eq!(bad["result"]["structuredContent"]["status"], 400);
    assert_eq!(
        bad["result"]["structuredContent"]["error"]["code"],
        "invalid_request"
    );
    assert!(
        bad["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("between 1 and 100")
    );
    assert_eq!(h.rows().await.len(), 2, "a refused recall records nothing");
}

#[tokio::test]
async fn a_revoked_capsule_is_a_tool_error_carrying_the_reason() {
    let (h, digest, _c) = pod(true).await;
    let called = rpc(
        &h,
        7,
        "tools/call",
        json!({"name": "capsule_recall", "arguments": {"query": "refunds", "capsules": ["kb"]}}),
    )
    .await;
    let result = &called["result"];
    assert_eq!(result["isError"], true, "{called}");
    assert_eq!(result["structuredContent"]["status"], 410);
    assert_eq!(
        result["structuredContent"]["error"]["code"],
        "capsule_revoked"
    );
    let text = result["content"][0]["text"].as_str().unwrap();
    assert!(
        text.contains("spec.revoked") && text.contains(&digest),
        "{text}"
    );
    assert!(h.upstream.received().is_empty(), "nothing embedded");
}

#[tokio::test]
async fn bad_json_rpc_gets_a_json_rpc_error_and_no_token_is_refused() {
    let (h, _, _c) = pod(false).await;
    let cases: [(String, u16, i64, &str); 8] = [
        ("{not json".into(), 400, -32700, "not JSON"),
        ("[]".into(), 400, -32600, "batches"),
        (json!({"id": 1, "method": "ping"}).to_string(), 400, -32600, "jsonrpc"),
        (json!({"jsonrpc": "2.0", "id": {"x": 1}, "method": "ping"}).to_string(), 400, -32600, "id"),
        (json!({"jsonrpc": "2.0", "id": 5, "method": "resources/list"}).to_string(), 200, -32601, "resources/list"),
        (json!({"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "shell"}}).to_string(), 200, -32602, "unknown tool"),
        (json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "capsule_recall", "arguments": [1]}}).to_string(), 200, -32602, "must be an object"),
        (json!({"jsonrpc": "2.0", "id": 8, "method": "tools/list", "params": 3}).to_string(), 200, -32602, "params"),
    ];
    for (body, status, code, says) in cases {
        let r = mcp_raw(&h, body.clone(), true).await;
        assert_eq!(r.status.as_u16(), status, "{body}: {}", r.text());
        let v = r.json();
        assert_eq!(v["jsonrpc"], "2.0", "{body}");
        assert_eq!(v["error"]["code"], code, "{body}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{body}: {v}"
        );
    }
    let ping = rpc(&h, 9, "ping", json!({})).await;
    assert_eq!(ping["result"], json!({}));

    // The same token as every agent call.
    let r = mcp_raw(
        &h,
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).to_string(),
        false,
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], -32001);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("token")
    );
    // No event stream is offered.
    let r = send(
        &h.client,
        "GET",
        &h.proxy_url("/mcp"),
        &[
            ("authorization", &format!("Bearer {TOKEN}")),
            ("accept", "text/event-stream"),
        ],
        String::new(),
    )
    .await;
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "POST");
    assert!(h.rows().await.is_empty());
    assert!(h.upstream.received().is_empty());
}
