//! A deterministic stand-in for the providers, speaking OpenAI's and Anthropic's documented
//! wire formats, for tests and benchmarks. It never calls out.
//!
//! Requests choose a behaviour by containing `SCENARIO:<name>` anywhere in the body:
//!
//! | scenario | behaviour |
//! | --- | --- |
//! | (none) | a normal answer; streams end with usage when asked (`include_usage` for OpenAI) |
//! | `cached` / `reasoning` | usage reports cached prompt tokens / reasoning tokens |
//! | `no-usage` | never reports usage |
//! | `error-500`, `error-429` | the provider's error JSON before anything else |
//! | `echo-key` | a 400 whose message contains the key it received (as some providers do) |
//! | `error-mid-stream` | a stream that sends an error event and ends, without usage |
//! | `cut` | half the answer, then the connection breaks |
//! | `stall` | the first chunk, then silence for a minute |
//! | `headers-stall` | no response headers for a minute |
//! | `slow` | 20 ms between stream chunks |
//! | `hold-<ms>` | the answer (headers and body) after `<ms>` milliseconds: a provider that takes that long to serve the request, chosen per request by a load generator |
//!
//! `/v1/embeddings` for a model named `soma-hash-<d>` answers the deterministic hashed
//! embedding of each input ([`soma_capsule::hashed`]); other models get a fixed vector.
//!
//! Usage is a function of the request, as a provider's would be: [`prompt_tokens`] counts the
//! prompt text with the model's BPE tokenizer plus 3 tokens per message; the answer has
//! `min(max_tokens or 8, 256)` words (`w0 w1 …`) and `completion_tokens` is that word count.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use serde_json::{Value, json};

/// One request the fake upstream received.
#[derive(Clone, Debug)]
pub struct Received {
    /// Path.
    pub path: String,
    /// Headers, lower-case names.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Bytes,
}

#[derive(Debug)]
struct Fake {
    /// Keys it accepts (a provider accepts the old and the new key during a rotation).
    keys: Mutex<Vec<String>>,
    received: Mutex<Vec<Received>>,
}

/// A running fake upstream.
#[derive(Clone, Debug)]
pub struct FakeUpstream {
    /// Its address (127.0.0.1).
    pub addr: SocketAddr,
    state: Arc<Fake>,
}

impl FakeUpstream {
    /// Starts on 127.0.0.1 at a free port, accepting `key`.
    pub async fn start(key: &str) -> std::io::Result<FakeUpstream> {
        Self::start_on("127.0.0.1:0", key).await
    }

    /// Starts on `addr`.
    pub async fn start_on(addr: &str, key: &str) -> std::io::Result<FakeUpstream> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Fake {
            keys: Mutex::new(vec![key.to_owned()]),
            received: Mutex::new(Vec::new()),
        });
        let app = router(state.clone());
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeUpstream { addr, state })
    }

    /// Base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Accepts `key` too from now on.
    pub fn accept_key(&self, key: &str) {
        self.state
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(key.to_owned());
    }

    /// Stops accepting `key` (the provider revoked it).
    pub fn revoke_key(&self, key: &str) {
        self.state
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|k| k != key);
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state
            .received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn router(state: Arc<Fake>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai))
        .route("/v1/completions", post(openai))
        .route("/v1/embeddings", post(openai))
        .route("/v1/responses", post(openai))
        .route("/v1/models", get(models))
        .route("/v1/messages", post(anthropic))
        .route("/v1/messages/count_tokens", post(anthropic))
        .with_state(state)
}

/// The request, parsed.
struct Call {
    path: String,
    body: Value,
    scenario: String,
    key_ok: bool,
    presented: String,
}

async fn take(fake: &Fake, req: Request, anthropic: bool) -> Call {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let presented = if anthropic {
        header_str(&parts.headers, "x-api-key").to_owned()
    } else {
        header_str(&parts.headers, "authorization")
            .strip_prefix("Bearer ")
            .unwrap_or_default()
            .to_owned()
    };
    fake.received
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Received {
            path: parts.uri.path().to_owned(),
            headers,
            body: bytes.clone(),
        });
    let text = String::from_utf8_lossy(&bytes);
    let scenario = text
        .split("SCENARIO:")
        .nth(1)
        .map(|s| {
            s.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect()
        })
        .unwrap_or_default();
    Call {
        path: parts.uri.path().to_owned(),
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        key_ok: fake
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&presented),
        presented,
        scenario,
    }
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// The prompt tokens the fake provider reports for a request body: the BPE count of the text
/// in `messages`, `prompt`, `input`, `system` and `instructions` (values only), plus 3 per
/// message, at least 1.
pub fn prompt_tokens(body: &Value) -> u64 {
    fn text(model: &str, v: &Value) -> u64 {
        match v {
            Value::String(s) => soma_metering::tokens::count_text(model, s),
            Value::Array(a) => a.iter().map(|x| text(model, x)).sum(),
            Value::Object(o) => o.values().map(|x| text(model, x)).sum(),
            _ => 0,
        }
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut n: u64 = ["messages", "prompt", "input", "system", "instructions"]
        .iter()
        .filter_map(|k| body.get(*k))
        .map(|v| text(model, v))
        .sum();
    n += 3 * body
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, |m| m.len() as u64);
    n.max(1)
}

impl Call {
    fn prompt_tokens(&self) -> u64 {
        prompt_tokens(&self.body)
    }
    fn words(&self) -> u64 {
        ["max_completion_tokens", "max_tokens", "max_output_tokens"]
            .iter()
            .find_map(|k| self.body.get(*k).and_then(Value::as_u64))
            .unwrap_or(8)
            .min(256)
    }
    fn word(i: u64) -> String {
        format!("w{i} ")
    }
    fn text(&self) -> String {
        (0..self.words()).map(Call::word).collect()
    }
    fn cached(&self) -> u64 {
        if self.scenario == "cached" {
            self.prompt_tokens() / 2
        } else {
            0
        }
    }
    fn reasoning(&self) -> u64 {
        if self.scenario == "reasoning" {
            self.words() / 2
        } else {
            0
        }
    }
    fn model(&self) -> String {
        self.body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned()
    }
    fn stream(&self) -> bool {
        self.body.get("stream") == Some(&Value::Bool(true))
    }
    fn usage_wanted(&self) -> bool {
        self.scenario != "no-usage"
    }
}

/// A stream step.
enum Step {
    Chunk(String),
    Sleep(Duration),
    Abort,
}

fn stream_response(content_type: &'static str, steps: Vec<Step>) -> Response {
    let stream = futures::stream::unfold(VecDeque::from(steps), |mut steps| async move {
        loop {
            match steps.pop_front()? {
                Step::Sleep(d) => tokio::time::sleep(d).await,
                Step::Chunk(c) => return Some((Ok(Bytes::from(c)), steps)),
                Step::Abort => {
                    return Some((Err(std::io::Error::other("upstream cut the stream")), steps));
                }
            }
        }
    });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

/// Turns event payloads into steps, applying the stream scenarios.
fn scenario_steps(call: &Call, events: Vec<String>, tail: Vec<String>) -> Vec<Step> {
    let mut steps = Vec::new();
    let n = events.len();
    for (i, e) in events.into_iter().enumerate() {
        match call.scenario.as_str() {
            "cut" if i == n / 2 => {
                // Let the head and the first chunks reach the client before the break.
                steps.push(Step::Sleep(Duration::from_millis(50)));
                steps.push(Step::Abort);
                return steps;
            }
            "stall" if i == 1 => steps.push(Step::Sleep(Duration::from_secs(60))),
            "slow" if i > 0 => steps.push(Step::Sleep(Duration::from_millis(20))),
            _ => {}
        }
        steps.push(Step::Chunk(e));
    }
    steps.extend(tail.into_iter().map(Step::Chunk));
    steps
}

fn openai_error(status: StatusCode, message: &str, kind: &str, code: &str) -> Response {
    (
        status,
        axum::Json(
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
        ),
    )
        .into_response()
}

/// `headers-stall`: hold the response headers back for a minute; `hold-<ms>`: for `<ms>`
/// milliseconds.
async fn stall_headers(call: &Call) {
    if let Some(d) = hold(&call.scenario) {
        tokio::time::sleep(d).await;
    }
}

/// How long the scenario holds the response back, if at all.
fn hold(scenario: &str) -> Option<Duration> {
    if scenario == "headers-stall" {
        return Some(Duration::from_secs(60));
    }
    let ms = scenario.strip_prefix("hold-")?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ms))
}

async fn models(State(fake): State<Arc<Fake>>, req: Request) -> Response {
    let call = take(&fake, req, false).await;
    if !call.key_ok {
        return openai_error(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided.",
            "invalid_request_error",
            "invalid_api_key",
        );
    }
    axum::Json(json!({"object": "list", "data": [
        {"id": "gpt-4o", "object": "model", "created": 1_700_000_000, "owned_by": "fake"},
        {"id": "gpt-4o-mini", "object": "model", "created": 1_700_000_000, "owned_by": "fake"},
    ]}))
    .into_response()
}

async fn openai(State(fake): State<Arc<Fake>>, req: Request) -> Response {
    let call = take(&fake, req, false).await;
    stall_headers(&call).await;
    if !call.key_ok {
        return openai_error(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided.",
            "invalid_request_error",
            "invalid_api_key",
        );
    }
    match call.scenario.as_str() {
        "error-500" => {
            return openai_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The server had an error while processing your request.",
                "server_error",
                "internal_error",
            );
        }
        "error-429" => {
            return openai_error(
                StatusCode::TOO_MANY_REQUESTS,
                "Rate limit reached.",
                "requests",
                "rate_limit_exceeded",
            );
        }
        "echo-key" => {
            return openai_error(
                StatusCode::BAD_REQUEST,
                &format!("Key {} is not allowed here.", call.presented),
                "invalid_request_error",
                "bad_key",
            );
        }
        _ => {}
    }
    let usage_chat = json!({
        "prompt_tokens": call.prompt_tokens(),
        "completion_tokens": call.words(),
        "total_tokens": call.prompt_tokens() + call.words(),
        "prompt_tokens_details": {"cached_tokens": call.cached()},
        "completion_tokens_details": {"reasoning_tokens": call.reasoning()},
    });
    let model = call.model();
    match call.path.as_str() {
        "/v1/embeddings" => {
            let mut body =
                json!({"object": "list", "data": embeddings(&call.body, &model), "model": model});
            if call.usage_wanted() {
                body["usage"] = json!({"prompt_tokens": call.prompt_tokens(), "total_tokens": call.prompt_tokens()});
            }
            axum::Json(body).into_response()
        }
        "/v1/responses" => responses(&call, &model),
        path => {
            let chat = path == "/v1/chat/completions";
            if !call.stream() {
                let choice = if chat {
                    json!({"index": 0, "message": {"role": "assistant", "content": call.text()}, "finish_reason": "stop"})
                } else {
                    json!({"index": 0, "text": call.text(), "finish_reason": "stop"})
                };
                let mut body = json!({"id": "chatcmpl-fake", "object": if chat { "chat.completion" } else { "text_completion" },
                    "created": 1_700_000_000, "model": model, "choices": [choice]});
                if call.usage_wanted() {
                    body["usage"] = usage_chat;
                }
                if call.scenario == "cut" {
                    let text = body.to_string();
                    return stream_response(
                        "application/json",
                        vec![Step::Chunk(text[..text.len() / 2].to_owned()), Step::Abort],
                    );
                }
                return axum::Json(body).into_response();
            }
            let include =
                call.body.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
            let object = if chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            };
            let chunk = |choice: Value| {
                let mut c = json!({"id": "chatcmpl-fake", "object": object, "created": 1_700_000_000, "model": model, "choices": [choice]});
                if include {
                    c["usage"] = Value::Null;
                }
                format!("data: {c}\n\n")
            };
            let mut events = Vec::new();
            if chat {
                events.push(chunk(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null})));
            }
            for i in 0..call.words() {
                events.push(chunk(if chat {
                    json!({"index": 0, "delta": {"content": Call::word(i)}, "finish_reason": null})
                } else {
                    json!({"index": 0, "text": Call::word(i), "finish_reason": null})
                }));
            }
            if call.scenario == "error-mid-stream" {
                events.push(format!("data: {}\n\n", json!({"error": {"message": "The server had an error while processing your request.", "type": "server_error"}})));
                return stream_response("text/event-stream", scenario_steps(&call, events, vec![]));
            }
            events.push(chunk(if chat {
                json!({"index": 0, "delta": {}, "finish_reason": "stop"})
            } else {
                json!({"index": 0, "text": "", "finish_reason": "stop"})
            }));
            let mut tail = Vec::new();
            if include && call.usage_wanted() {
                let u = json!({"id": "chatcmpl-fake", "object": object, "created": 1_700_000_000, "model": model, "choices": [], "usage": usage_chat});
                tail.push(format!("data: {u}\n\n"));
            }
            tail.push("data: [DONE]\n\n".to_owned());
            stream_response("text/event-stream", scenario_steps(&call, events, tail))
        }
    }
}

/// `data` of an embeddings answer: for a model named `soma-hash-<d>`, the
/// [`soma_capsule::hashed`] embedding of each input (a string or a list of strings), so tests
/// and benchmarks get vectors that agree with Capsules embedded by the same function; for any
/// other model, one fixed three-number vector.
fn embeddings(body: &Value, model: &str) -> Vec<Value> {
    let Some(dims) = soma_capsule::hashed::dims_of(model) else {
        return vec![json!({"object": "embedding", "index": 0, "embedding": [0.0, 0.5, 1.0]})];
    };
    let inputs: Vec<&str> = match body.get("input") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            json!({"object": "embedding", "index": i, "embedding": soma_capsule::hashed::embed(text, dims)})
        })
        .collect()
}

fn responses(call: &Call, model: &str) -> Response {
    let usage = json!({"input_tokens": call.prompt_tokens(), "input_tokens_details": {"cached_tokens": call.cached()},
        "output_tokens": call.words(), "output_tokens_details": {"reasoning_tokens": call.reasoning()},
        "total_tokens": call.prompt_tokens() + call.words()});
    let mut response = json!({"id": "resp_fake", "object": "response", "created_at": 1_700_000_000, "status": "completed", "model": model,
        "output": [{"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": call.text(), "annotations": []}]}]});
    if call.usage_wanted() {
        response["usage"] = usage;
    }
    if !call.stream() {
        return axum::Json(response).into_response();
    }
    let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut events = vec![ev(
        "response.created",
        json!({"type": "response.created", "sequence_number": 0, "response": {"id": "resp_fake", "status": "in_progress", "model": model}}),
    )];
    for i in 0..call.words() {
        events.push(ev("response.output_text.delta", json!({"type": "response.output_text.delta", "sequence_number": i + 1, "item_id": "msg_fake", "output_index": 0, "content_index": 0, "delta": Call::word(i)})));
    }
    let tail = vec![ev(
        "response.completed",
        json!({"type": "response.completed", "sequence_number": call.words() + 1, "response": response}),
    )];
    stream_response("text/event-stream", scenario_steps(call, events, tail))
}

fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"type": "error", "error": {"type": kind, "message": message}})),
    )
        .into_response()
}

async fn anthropic(State(fake): State<Arc<Fake>>, req: Request) -> Response {
    let call = take(&fake, req, true).await;
    stall_headers(&call).await;
    if !call.key_ok {
        return anthropic_error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid x-api-key",
        );
    }
    match call.scenario.as_str() {
        "error-500" => {
            return anthropic_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "Internal server error",
            );
        }
        "error-429" => {
            return anthropic_error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "Rate limited",
            );
        }
        "echo-key" => {
            return anthropic_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("Key {} is not allowed here.", call.presented),
            );
        }
        _ => {}
    }
    if call.path == "/v1/messages/count_tokens" {
        return axum::Json(json!({"input_tokens": call.prompt_tokens()})).into_response();
    }
    // Anthropic's input_tokens excludes cache reads and writes.
    let cached = call.cached();
    let input = call.prompt_tokens() - cached;
    let model = call.model();
    if !call.stream() {
        let mut body = json!({"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": call.text()}], "stop_reason": "end_turn", "stop_sequence": null});
        if call.usage_wanted() {
            body["usage"] = json!({"input_tokens": input, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached, "output_tokens": call.words()});
        }
        return axum::Json(body).into_response();
    }
    let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let start_usage = if call.usage_wanted() {
        json!({"input_tokens": input, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached, "output_tokens": 1})
    } else {
        Value::Null
    };
    let mut events = vec![
        ev(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": start_usage}}),
        ),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ev("ping", json!({"type": "ping"})),
    ];
    for i in 0..call.words() {
        events.push(ev("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": Call::word(i)}})));
    }
    if call.scenario == "error-mid-stream" {
        events.push(ev("error", json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})));
        return stream_response("text/event-stream", scenario_steps(&call, events, vec![]));
    }
    let mut tail = vec![ev(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    )];
    if call.usage_wanted() {
        tail.push(ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": call.words()}})));
    }
    tail.push(ev("message_stop", json!({"type": "message_stop"})));
    stream_response("text/event-stream", scenario_steps(&call, events, tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_scenarios_name_their_delay_and_nothing_else_holds() {
        let cases = [
            ("hold-250", Some(Duration::from_millis(250))),
            ("hold-0", Some(Duration::ZERO)),
            ("headers-stall", Some(Duration::from_secs(60))),
            ("hold-", None),
            ("hold-x", None),
            ("hold--5", None),
            ("slow", None),
            ("", None),
        ];
        for (scenario, want) in cases {
            assert_eq!(hold(scenario), want, "{scenario}");
        }
    }
}
