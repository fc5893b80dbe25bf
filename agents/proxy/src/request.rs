//! Parse and estimate: the request body read (within `bodyLimitBytes`), checked to be a JSON
//! object naming a model, and its worst case estimated: prompt tokens first by a bound from the
//! prompt's bytes ([`Prompt`]), output by `max_tokens` (or `defaultMaxTokens`). The prompt is
//! counted by the model's BPE only when the bound is refused or a fallback needs the count; a
//! large body is counted off the async workers (the BPE of a multi-megabyte prompt takes
//! milliseconds), carrying the request's span.

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
    /// What is known of the prompt's tokens.
    pub prompt: Prompt,
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

/// What is known of a prompt's size in tokens before the call.
///
/// Counting a prompt by the model's BPE costs more than anything else the sidecar does for a
/// call (about 50 ns per byte of text not seen before), and the count only matters when a
/// Budget is close to its cap or the provider does not report usage. So a call first reserves
/// on a bound that costs a walk of the body ([`tokens::prompt_bound_with`]: each string's
/// bytes, which no byte-level BPE count exceeds); it is counted when a Budget refuses the
/// bound ([`Call::count_prompt`], then reserved again) or when settling needs the count
/// ([`Prompt::count`]).
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Bounded, not counted; the body is kept to count it if settling needs the count.
    Bound {
        /// The bound.
        tokens: u64,
        /// The request body, as received.
        body: Bytes,
        /// Tokens per image part.
        image_tokens: u64,
    },
    /// Counted by the model's BPE.
    Counted(u64),
}

impl Prompt {
    /// The tokens reserved on: the bound, or the count once known.
    pub fn reserved(&self) -> u64 {
        match self {
            Prompt::Bound { tokens, .. } => *tokens,
            Prompt::Counted(n) => *n,
        }
    }

    /// The prompt's BPE count for `model`, counted now if only the bound is known. Used on
    /// the paths that settle without the provider's prompt count (a body without usage, a
    /// stream or body cut before it), so it is rare and runs where it is called.
    pub fn count(&self, model: &str) -> u64 {
        match self {
            Prompt::Counted(n) => *n,
            Prompt::Bound {
                tokens,
                body,
                image_tokens,
            } => serde_json::from_slice::<Value>(body).map_or(*tokens, |json| {
                tokens::estimate_prompt_with(model, &json, *image_tokens)
            }),
        }
    }
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
    // Checked as UTF-8 once, then read as text: the reader does not check each string again.
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        ProxyError::Json(format!(
            "the body is not UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    let json: Value = serde_json::from_str(text).map_err(|e| ProxyError::Json(e.to_string()))?;
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
    let max_out = if endpoint.input_only() {
        0
    } else {
        requested_max.unwrap_or(state.config.default_max_tokens)
    };
    Ok(Call::new(
        state, bytes, json, model, stream, max_out, priority,
    ))
}

impl Call {
    /// A call of `model` with its body, reserved first on its prompt's bound.
    pub fn new(
        state: &AppState,
        bytes: Bytes,
        json: Value,
        model: String,
        stream: bool,
        max_out: u64,
        priority: Priority,
    ) -> Call {
        let image_tokens = state.config.image_tokens;
        let prompt = Prompt::Bound {
            tokens: tokens::prompt_bound_with(&json, image_tokens),
            body: bytes.clone(),
            image_tokens,
        };
        let worst = soma_metering::worst_usage(
            &json,
            prompt.reserved(),
            max_out,
            &state.config.server_tools,
        );
        Call {
            bytes,
            json,
            model,
            stream,
            prompt,
            max_out,
            worst,
            rewritten: false,
            priority,
        }
    }

    /// Counts the prompt by the model's BPE if only its bound is known, and sizes the worst
    /// case by the count. Returns whether the worst case shrank (so a refused reservation is
    /// worth asking again).
    pub async fn count_prompt(&mut self, state: &AppState) -> Result<bool, ProxyError> {
        let Prompt::Bound {
            tokens: bound,
            image_tokens,
            ..
        } = self.prompt
        else {
            return Ok(false);
        };
        let json = std::mem::take(&mut self.json);
        let (json, counted) = if self.bytes.len() > ESTIMATE_INLINE_BYTES {
            let span = tracing::Span::current();
            let model = self.model.clone();
            tokio::task::spawn_blocking(move || {
                let _entered = span.enter();
                let n = tokens::estimate_prompt_with(&model, &json, image_tokens);
                (json, n)
            })
            .instrument(tracing::Span::current())
            .await
            .map_err(|e| ProxyError::Internal(e.to_string()))?
        } else {
            let n = tokens::estimate_prompt_with(&self.model, &json, image_tokens);
            (json, n)
        };
        self.json = json;
        self.prompt = Prompt::Counted(counted);
        self.worst = soma_metering::worst_usage(
            &self.json,
            counted,
            self.max_out,
            &state.config.server_tools,
        );
        Ok(counted < bound)
    }
}
