//! Forward and meter: the call goes to the provider with the key injected; a provider error is
//! passed on (key scrubbed) and releases the reservation; a stream goes to the relay
//! (`relay.rs`), which meters it as it passes; a body is metered from the provider's usage, or
//! estimated when it has none, and settled before the response is returned.

use std::sync::Arc;
use std::time::Instant;

use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::Value;
use soma_metering::wire::{self, Metered};
use soma_metering::{Usage, tokens};

use crate::endpoint::Endpoint;
use crate::error::ProxyError;
use crate::genai_span;
use crate::request::Call;
use crate::state::{AppState, Charge};
use crate::upstream::ProviderKey;
use crate::{relay, upstream};

/// The request to the provider, with `key` (the request's own snapshot) injected.
fn build(
    state: &AppState,
    endpoint: Endpoint,
    parts: &Parts,
    body: Bytes,
    key: &ProviderKey,
) -> Result<axum::http::Request<http_body_util::Full<Bytes>>, ProxyError> {
    let uri = state.upstream.uri(endpoint.path(), parts.uri.query())?;
    upstream::request(
        parts.method.clone(),
        uri,
        &parts.headers,
        body,
        state.config.provider.kind,
        key,
        &state.config.anthropic_version,
    )
}

fn respond(status: StatusCode, headers: HeaderMap, body: Bytes) -> Response {
    let mut resp = (status, body).into_response();
    *resp.headers_mut() = headers;
    resp
}

/// The body to send: the client's bytes, unless the request must be rewritten (a brown-out
/// model, or usage asked for on a stream whose client did not ask for it).
fn outgoing(endpoint: Endpoint, call: &mut Call) -> Result<(Bytes, bool), ProxyError> {
    let inject = call.stream
        && endpoint.needs_include_usage()
        && call.json.pointer("/stream_options/include_usage") != Some(&Value::Bool(true));
    if inject {
        match call
            .json
            .get_mut("stream_options")
            .and_then(Value::as_object_mut)
        {
            Some(o) => {
                o.insert("include_usage".into(), Value::Bool(true));
            }
            None => call.json["stream_options"] = serde_json::json!({"include_usage": true}),
        }
    }
    let body = if inject || call.rewritten {
        Bytes::from(
            serde_json::to_vec(&call.json).map_err(|e| ProxyError::Internal(e.to_string()))?,
        )
    } else {
        call.bytes.clone()
    };
    Ok((body, inject))
}

/// Forwards a metered call and meters it; the charge is settled on every path.
pub async fn metered(
    state: &Arc<AppState>,
    endpoint: Endpoint,
    parts: &Parts,
    mut call: Call,
    charge: Charge,
    t0: Instant,
) -> Result<Response, ProxyError> {
    let label = endpoint.label();
    // The key this request uses to its end, even if a rotation swaps another in meanwhile.
    let key = match state.keys.current() {
        Ok(k) => k,
        Err(p) => {
            charge.settle(
                state,
                Metered::default(),
                false,
                "credentials_unavailable",
                503,
            );
            return Err(ProxyError::CredentialsUnavailable(p));
        }
    };
    let request = match outgoing(endpoint, &mut call)
        .and_then(|(body, inject)| Ok((build(state, endpoint, parts, body, &key)?, inject)))
    {
        Ok(r) => r,
        Err(e) => {
            charge.settle(state, Metered::default(), false, "internal", 500);
            return Err(e);
        }
    };
    let (request, strip_usage) = request;
    let sent = Instant::now();
    let pre = sent - t0;
    let upstream = match tokio::time::timeout(
        state.response_headers_timeout(),
        state.client.request(&state.upstream.origin, request),
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            charge.settle(
                state,
                Metered::default(),
                false,
                "upstream_unreachable",
                502,
            );
            return Err(ProxyError::Upstream(e));
        }
        Err(_) => {
            charge.settle(state, Metered::default(), false, "upstream_timeout", 504);
            return Err(ProxyError::UpstreamTimeout);
        }
    };
    let headers_at = Instant::now();
    state
        .metrics
        .upstream_latency(label, (headers_at - sent).as_secs_f64());
    let (rparts, rbody) = upstream.into_parts();
    let status = rparts.status;
    let headers = upstream::response_headers(&rparts.headers);
    key_verdict(state, &key, status);

    if !status.is_success() {
        // Nothing was generated: release, and pass the provider's error on, key scrubbed.
        let body = match upstream::read_all(rbody, state.idle()).await {
            Ok(b) => b,
            Err((_, partial)) => partial,
        };
        charge.settle(
            state,
            Metered::default(),
            false,
            "upstream_error",
            status.as_u16(),
        );
        return Ok(respond(status, headers, key.scrub(body)));
    }

    let event_stream = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if event_stream {
        state
            .metrics
            .added_latency(label, (pre + headers_at.elapsed()).as_secs_f64());
        return Ok(relay::relay(
            state.clone(),
            charge,
            endpoint.dialect(),
            strip_usage,
            status,
            headers,
            rbody,
        ));
    }

    match upstream::read_all(rbody, state.idle()).await {
        Ok(body) => {
            let parsed = meter_body(&charge.span, endpoint, &body);
            let (metered, estimated) = match parsed {
                Some(m) => (m, false),
                None => (Metered::from(estimate_from_body(&charge, &body)), true),
            };
            let body_done = Instant::now();
            charge.settle(state, metered, estimated, "ok", status.as_u16());
            state
                .metrics
                .added_latency(label, (pre + body_done.elapsed()).as_secs_f64());
            Ok(respond(status, headers, body))
        }
        Err((kind, _partial)) => {
            // The provider generated something and the body broke: meter the prompt (the
            // client received nothing).
            let usage = Usage {
                input_tokens: charge.prompt.count(&charge.model),
                ..Usage::default()
            };
            let (outcome, err) = match kind {
                upstream::ReadError::Idle => ("upstream_timeout", ProxyError::UpstreamTimeout),
                upstream::ReadError::Broken => ("upstream_cut", ProxyError::UpstreamCut),
            };
            charge.settle(state, Metered::from(usage), true, outcome, 502);
            Err(err)
        }
    }
}

/// The provider's usage in a complete body. Untraced, only the members carrying usage are
/// parsed (the generated text is skipped); traced, the whole body, whose id, model and finish
/// reasons go on the call's span.
fn meter_body(span: &tracing::Span, endpoint: Endpoint, body: &[u8]) -> Option<Metered> {
    if span.is_disabled() {
        return wire::metered_from_bytes(endpoint.dialect(), body);
    }
    let value = serde_json::from_slice::<Value>(body).ok()?;
    genai_span::record_response(span, &wire::ResponseInfo::from_body(&value));
    wire::metered_from_body(endpoint.dialect(), &value)
}

/// What the provider's status says about the key: 401 refuses it (the sidecar goes not-ready
/// and re-reads the key from Vault), a success accepts it.
fn key_verdict(state: &AppState, key: &Arc<ProviderKey>, status: StatusCode) {
    if status == StatusCode::UNAUTHORIZED && !key.is_none() {
        if matches!(
            state.config.credentials,
            crate::config::Credentials::Vault(_)
        ) {
            state.keys.rejected(key);
        }
        tracing::warn!(
            status = status.as_u16(),
            "the provider refused the provider key"
        );
    } else if status.is_success() {
        state.keys.accepted(key);
    }
}

/// A 2xx body without usage (some OpenAI-compatible servers): the prompt estimate plus every
/// token of the body's text, which over-counts rather than under-counts.
fn estimate_from_body(charge: &Charge, body: &[u8]) -> Usage {
    Usage {
        input_tokens: charge.prompt.count(&charge.model),
        output_tokens: tokens::count_text(&charge.model, &String::from_utf8_lossy(body)),
        ..Usage::default()
    }
}

/// Forwards an unmetered call (model lists, token counts) and returns the provider's answer
/// (an error's body with the key scrubbed).
pub async fn unmetered(
    state: &Arc<AppState>,
    endpoint: Endpoint,
    parts: &Parts,
    body: Bytes,
) -> Result<Response, ProxyError> {
    let key = state
        .keys
        .current()
        .map_err(ProxyError::CredentialsUnavailable)?;
    let request = build(state, endpoint, parts, body, &key)?;
    let upstream = tokio::time::timeout(
        state.response_headers_timeout(),
        state.client.request(&state.upstream.origin, request),
    )
    .await
    .map_err(|_| ProxyError::UpstreamTimeout)?
    .map_err(ProxyError::Upstream)?;
    let (rparts, rbody) = upstream.into_parts();
    let body = upstream::read_all(rbody, state.idle())
        .await
        .map_err(|_| ProxyError::UpstreamTimeout)?;
    genai_span::record_status(&tracing::Span::current(), rparts.status.as_u16());
    key_verdict(state, &key, rparts.status);
    let body = if rparts.status.is_success() {
        body
    } else {
        key.scrub(body)
    };
    Ok(respond(
        rparts.status,
        upstream::response_headers(&rparts.headers),
        body,
    ))
}
