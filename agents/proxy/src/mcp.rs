//! `POST /mcp`: the Model Context Protocol's streamable HTTP transport, serving one tool,
//! `capsule_recall`, for agents that speak MCP rather than plain HTTP.
//!
//! ```text
//!  agent ─POST /mcp {"jsonrpc":"2.0","id":1,"method":"tools/call",
//!                    "params":{"name":"capsule_recall","arguments":{<a recall request>}}}
//!    ─► authenticate (the per-pod token, as every agent call) ─► JSON-RPC checks
//!    ─► recall::answer(Asking::Tool(arguments))   (the one recall path: admission, checks,
//!       metered query embedding, search, errors, metrics)
//!    ─► 200 → result {structuredContent: <the recall answer>, isError: false}
//!       else → result {structuredContent: {status, error}, isError: true}
//! ```
//!
//! The tool answers exactly what `POST /v1/recall` answers: the arguments are the recall
//! request body and go through the same code, so limits, errors (a revoked Capsule's 410 and
//! reason), provenance and metering cannot differ. A recall that is refused is a tool error
//! (`isError: true`, MCP's "tool execution error", which the model sees); a message that is
//! not JSON-RPC, an unknown method or tool, or arguments that are not an object get a
//! JSON-RPC error.
//!
//! The transport is the stateless subset of streamable HTTP: every answer is one
//! `application/json` body (no SSE stream, so `GET` is 405), no `Mcp-Session-Id` is issued,
//! notifications and responses sent by the client are accepted with 202. The listener is the
//! sidecar's loopback port and every message needs the pod's token, so no browser page can
//! reach it (the transport's DNS-rebinding concern).
//!
//! Written directly rather than with the `rmcp` SDK: one stateless tool is a few JSON-RPC
//! methods, and `rmcp`'s server runs its own session manager and service stack, where the
//! sidecar needs the tool inside its own authentication, admission and metrics.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::error::ProxyError;
use crate::recall::{self, Asking};
use crate::state::AppState;

/// The path.
pub const PATH: &str = "/mcp";
/// The tool.
pub const TOOL: &str = "capsule_recall";
/// Protocol revisions this server speaks, newest first.
pub const PROTOCOL_VERSIONS: [&str; 3] = ["2025-06-18", "2025-03-26", "2024-11-05"];

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
/// Server-defined: the HTTP request itself was refused (token, content type, size).
const REFUSED: i64 = -32001;

fn rpc_error(status: StatusCode, id: Value, code: i64, message: impl Into<String>) -> Response {
    let body =
        json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message.into()}});
    (status, axum::Json(body)).into_response()
}

fn rpc_result(id: Value, result: Value) -> Response {
    (
        StatusCode::OK,
        axum::Json(json!({"jsonrpc": "2.0", "id": id, "result": result})),
    )
        .into_response()
}

/// The tool's description and input schema (the recall request body).
fn tool() -> Value {
    json!({
        "name": TOOL,
        "title": "Recall from the pod's Capsules",
        "description": "Top-k chunks of the signed knowledge Capsules this agent holds for a query, best first, each with its score and provenance (capsule, version, digest, chunk id, document, byte range). Give `query` (text, embedded by the sidecar's metered call) or `vector` (made by the Capsule's embedding model).",
        "inputSchema": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to recall (at most recall.maxQueryBytes, 8 KiB by default)"},
                "vector": {"type": "array", "items": {"type": "number"}, "description": "Instead of query: a query vector of the Capsule's dimension"},
                "k": {"type": "integer", "minimum": 1, "description": "How many chunks (default 5, at most recall.maxK)"},
                "capsules": {"type": "array", "items": {"type": "string"}, "description": "Capsule names to search; absent: every Capsule that may be served"}
            },
            "additionalProperties": false
        },
        "annotations": {"readOnlyHint": true, "openWorldHint": false}
    })
}

/// The tool's answer for a recall's HTTP answer: the same JSON, as structured content and
/// as text; anything but 200 is a tool error carrying the status and the error object.
async fn tool_result(response: Response) -> Result<Value, ProxyError> {
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .map_err(|e| ProxyError::Internal(e.to_string()))?;
    let body: Value = serde_json::from_slice(&bytes).unwrap_or_else(
        |_| json!({"error": {"message": String::from_utf8_lossy(&bytes), "code": Value::Null}}),
    );
    if status == StatusCode::OK {
        return Ok(json!({
            "content": [{"type": "text", "text": body.to_string()}],
            "structuredContent": body,
            "isError": false,
        }));
    }
    let message = body
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map_or_else(|| body.to_string(), str::to_owned);
    let code = body
        .pointer("/error/code")
        .and_then(Value::as_str)
        .unwrap_or("error");
    let mut structured = body.clone();
    if let Some(m) = structured.as_object_mut() {
        m.insert("status".to_owned(), json!(status.as_u16()));
    }
    Ok(json!({
        "content": [{"type": "text", "text": format!("{code} ({}): {message}", status.as_u16())}],
        "structuredContent": structured,
        "isError": true,
    }))
}

/// The protocol revision to answer `initialize` with: the client's when this server speaks
/// it, else the newest this server speaks (the client then decides whether to go on).
fn negotiate(params: &Value) -> &'static str {
    let asked = params.get("protocolVersion").and_then(Value::as_str);
    PROTOCOL_VERSIONS
        .iter()
        .find(|v| Some(**v) == asked)
        .copied()
        .unwrap_or(PROTOCOL_VERSIONS[0])
}

/// Answers one JSON-RPC request.
async fn call(state: &Arc<AppState>, id: Value, method: &str, params: Value) -> Response {
    match method {
        "initialize" => rpc_result(
            id,
            json!({
                "protocolVersion": negotiate(&params),
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": {"name": "soma-proxy", "version": env!("CARGO_PKG_VERSION")},
                "instructions": "capsule_recall searches the signed knowledge Capsules this agent holds; every result names its source.",
            }),
        ),
        "ping" => rpc_result(id, json!({})),
        "tools/list" => rpc_result(id, json!({"tools": [tool()]})),
        "tools/call" => {
            let name = params.get("name").and_then(Value::as_str);
            if name != Some(TOOL) {
                return rpc_error(
                    StatusCode::OK,
                    id,
                    INVALID_PARAMS,
                    format!(
                        "unknown tool {:?}: this server has one tool, {TOOL:?}",
                        name.unwrap_or_default()
                    ),
                );
            }
            let arguments = params.get("arguments").cloned().unwrap_or(json!({}));
            if !arguments.is_object() {
                return rpc_error(
                    StatusCode::OK,
                    id,
                    INVALID_PARAMS,
                    "params.arguments must be an object (the recall request)",
                );
            }
            let answer =
                recall::answer(state, Asking::Tool(Bytes::from(arguments.to_string()))).await;
            match tool_result(answer).await {
                Ok(result) => rpc_result(id, result),
                Err(e) => rpc_error(StatusCode::INTERNAL_SERVER_ERROR, id, -32603, e.message()),
            }
        }
        other => rpc_error(
            StatusCode::OK,
            id,
            METHOD_NOT_FOUND,
            format!(
                "method {other:?} is not served (initialize, ping, tools/list, tools/call are)"
            ),
        ),
    }
}

/// An HTTP-level refusal (token, content type, body) as a JSON-RPC error with its status.
fn refused(e: &ProxyError) -> Response {
    rpc_error(e.status(), Value::Null, REFUSED, e.message())
}

/// Serves `/mcp`.
pub async fn handle(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let response = serve(&state, req).await;
    if !response.status().is_success() {
        state.metrics.error("mcp");
    }
    response
}

async fn serve(state: &Arc<AppState>, req: Request) -> Response {
    if let Err(e) = crate::handler::authenticate(state, req.headers()) {
        return refused(&e);
    }
    let (parts, body) = req.into_parts();
    if parts.method != Method::POST {
        let mut r = rpc_error(
            StatusCode::METHOD_NOT_ALLOWED,
            Value::Null,
            REFUSED,
            format!(
                "{} {PATH}: this server offers no event stream; send JSON-RPC messages with POST",
                parts.method
            ),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    let bytes = match crate::request::read_json_body(state, &parts, body).await {
        Ok(b) => b,
        Err(e) => return refused(&e),
    };
    let message: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                Value::Null,
                PARSE_ERROR,
                format!("the body is not JSON: {e}"),
            );
        }
    };
    let Some(object) = message.as_object() else {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            Value::Null,
            INVALID_REQUEST,
            "expected one JSON-RPC message (an object); batches are not supported",
        );
    };
    let id = object.get("id").cloned();
    if let Some(id) = &id
        && !(id.is_string() || id.is_i64() || id.is_u64())
    {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            Value::Null,
            INVALID_REQUEST,
            "id must be a string or an integer",
        );
    }
    let id_or_null = id.clone().unwrap_or(Value::Null);
    if object.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            id_or_null,
            INVALID_REQUEST,
            "jsonrpc must be \"2.0\"",
        );
    }
    let method = object.get("method").and_then(Value::as_str);
    let is_response = object.contains_key("result") || object.contains_key("error");
    match (method, id) {
        // A notification (initialized, cancelled) or a response to a request of ours: taken.
        (Some(_), None) => StatusCode::ACCEPTED.into_response(),
        (None, Some(_)) if is_response => StatusCode::ACCEPTED.into_response(),
        (Some(method), Some(id)) => {
            let params = object.get("params").cloned().unwrap_or(json!({}));
            if !params.is_object() {
                return rpc_error(
                    StatusCode::OK,
                    id,
                    INVALID_PARAMS,
                    "params must be an object",
                );
            }
            call(state, id, method, params).await
        }
        (None, _) => rpc_error(
            StatusCode::BAD_REQUEST,
            id_or_null,
            INVALID_REQUEST,
            "method must be a string",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_revision_is_kept_when_spoken_else_the_newest() {
        assert_eq!(
            negotiate(&json!({"protocolVersion": "2025-03-26"})),
            "2025-03-26"
        );
        assert_eq!(
            negotiate(&json!({"protocolVersion": "1999-01-01"})),
            "2025-06-18"
        );
        assert_eq!(negotiate(&json!({})), "2025-06-18");
    }
}
