//! Parse and estimate: the request body read (within `bodyLimitBytes`), checked to be a JSON
//! object naming a model, and its worst case estimated: prompt tokens by the model's BPE, output
//! by `max_tokens` (or `defaultMaxTokens`). A large body is estimated off the async workers
//! (the BPE of a multi-megabyte prompt takes milliseconds), carrying the request's span.

use axum::body::Body;
use axum::http::header;
use axum::http::request::Parts;
use bytes::Bytes;
use serde_json::Value;
use soma_contract::load::{PRIORITY_HEADER, Priority};
use soma_metering::tokens;
use tracing::Instrument;

use crate::endpoint::Endpoint;
use crate::error::ProxyError;
use crate::genai_span;
use crate::state::AppState;

/// Bodies larger than this are estimated on the blocking pool.
const ESTIMATE_INLINE_BYTES: usize = 64 * 1024;

/// A metered request, read and estimated.
#[derive(Debug)]
pub struct Call {
    /// The body as received (forwarded unchanged unless it must be rewritten).
    pub bytes: Bytes,
    /// The body, parsed.
    pub json: Value,
    /// The model it names.
    pub model: String,
    /// Whether it asks for a stream.
    pub stream: bool,
    /// Estimated prompt tokens.
    pub prompt: u64,
    /// Output tokens assumed for the worst case.
    pub max_out: u64,
    /// The most the call can use: prompt and output bound, widened by the server tools and
    /// compaction it declares (`soma_metering::bound`).
    pub worst: soma_metering::Usage,
    /// Whether `json` now differs from `bytes` (a brown-out model, injected stream options).
    pub rewritten: bool,
    /// Its priority under brown-out (`x-soma-priority`, `normal` when absent).
    pub priority: Priority,
}

/// The request's `x-soma-priority`: `normal` when absent, refused when not a priority.
pub fn priority(parts: &Parts) -> Result<Priority, ProxyError> {
    match parts.headers.get(PRIORITY_HEADER) {
        None => Ok(Priority::Normal),
        Some(v) => Priority::parse(v.as_bytes()).ok_or(ProxyError::Priority),
    }
}

fn is_json(parts: &Parts) -> bool {
    parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, ProxyError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        // axum reports an exceeded limit as a length-limit error in the source chain.
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ProxyError::TooLarge { limit }
        } else {
            ProxyError::BodyRead(e)
        }
    })
}

/// The body of an unmetered call (model lists, token counts): empty for a GET, else JSON.
pub async fn read_unmetered(
    state: &AppState,
    parts: &Parts,
    body: Body,
) -> Result<Bytes, ProxyError> {
    if parts.method == axum::http::Method::GET {
        return Ok(Bytes::new());
    }
    if !is_json(parts) {
        return Err(ProxyError::ContentType);
    }
    read_body(body, state.config.body_limit_bytes).await
}

/// A JSON body within `bodyLimitBytes` (the sidecar's own endpoints, such as recall).
pub async fn read_json_body(
    state: &AppState,
    parts: &Parts,
    body: Body,
) -> Result<Bytes, ProxyError> {
    if !is_json(parts) {
        return Err(ProxyError::ContentType);
    }
    read_body(body, state.config.body_limit_bytes).await
}

/// Reads, checks and estimates a metered call.
pub async fn parse(
    state: &AppState,
    endpoint: Endpoint,
    parts: &Parts,
    body: Body,
) -> Result<Call, ProxyError> {
    if !is_json(parts) {
        return Err(ProxyError::ContentType);
    }
    let priority = priority(parts)?;
    let bytes = read_body(body, state.config.body_limit_bytes).await?;
    let json: Value =
        serde_json::from_slice(&bytes).map_err(|e| ProxyError::Json(e.to_string()))?;
    if !json.is_object() {
        return Err(ProxyError::Json("expected an object".into()));
    }
    let model = json
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .ok_or(ProxyError::NoModel)?
        .to_owned();
    let stream = json.get("stream") == Some(&Value::Bool(true));
    let requested_max = tokens::max_output_tokens(&json);
    genai_span::record_request(
        &tracing::Span::current(),
        endpoint,
        &model,
        requested_max,
        stream,
    );
    let image_tokens = state.config.image_tokens;
    let (json, prompt) = if bytes.len() > ESTIMATE_INLINE_BYTES {
        let span = tracing::Span::current();
        let m = model.clone();
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let prompt = tokens::estimate_prompt_with(&m, &json, image_tokens);
            (json, prompt)
        })
        .instrument(tracing::Span::current())
        .await
        .map_err(|e| ProxyError::Internal(e.to_string()))?
    } else {
        let prompt = tokens::estimate_prompt_with(&model, &json, image_tokens);
        (json, prompt)
    };
    let max_out = if endpoint.input_only() {
        0
    } else {
        requested_max.unwrap_or(state.config.default_max_tokens)
    };
    let worst = soma_metering::worst_usage(&json, prompt, max_out, &state.config.server_tools);
    Ok(Call {
        bytes,
        json,
        model,
        stream,
        prompt,
        max_out,
        worst,
        rewritten: false,
        priority,
    })
}
