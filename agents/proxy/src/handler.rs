//! The request path, in the order a request meets it:
//!
//! ```text
//! auth ─► endpoint served? ─► JSON body ─► model priced? ─► estimate (BPE) ─► reserve worst case
//!   ─► outbox row (open) ─► provider ─► usage (body or SSE) ─► settle ─► response completes
//! ```
//!
//! Each request runs in its own task, so a client that disconnects while the provider is
//! still working does not cancel metering: the call finishes and is settled.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::Value;
use soma_metering::budget::ExhaustedAction;
use soma_metering::wire;
use soma_metering::{Amount, Price, Usage, tokens};
use tracing::Instrument;

use crate::authority::Reserve;
use crate::endpoint::Endpoint;
use crate::error::ProxyError;
use crate::genai_span;
use crate::outbox::OpenRecord;
use crate::relay;
use crate::state::{AppState, Charge};
use crate::upstream;

/// Serves one request to `endpoint`.
pub async fn handle(state: Arc<AppState>, endpoint: Endpoint, req: Request) -> Response {
    let t0 = Instant::now();
    let span = genai_span::open(
        endpoint,
        &state.config.provider,
        state.config.budget.as_deref(),
    );
    state.metrics.in_flight().inc();
    let task_state = state.clone();
    let task_span = span.clone();
    let result = tokio::spawn(
        async move {
            let result = serve(&task_state, endpoint, req, t0, &task_span).await;
            if let Err(e) = &result {
                if let ProxyError::Budget(refusal) = e {
                    task_span.record(
                        "soma.budget.refused_by",
                        refusal.budget.to_string().as_str(),
                    );
                }
                genai_span::record_refusal(&task_span, e.label(), e.status().as_u16());
            }
            result
        }
        .instrument(span),
    )
    .await;
    state.metrics.in_flight().dec();
    match result {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            state.metrics.error(e.label());
            // ProxyError's Display never includes the key, and its sources are library errors
            // about connections and files, which do not carry request headers.
            let source = std::error::Error::source(&e).map(|s| s.to_string());
            tracing::warn!(endpoint = endpoint.label(), reason = e.label(), error = %e, source, "request failed");
            let resp = e.into_wire(endpoint.dialect());
            state
                .metrics
                .request(endpoint.label(), "", resp.status().as_u16());
            resp
        }
        Err(join) => {
            tracing::error!(error = %join, "request task failed");
            ProxyError::Internal("request task failed".into()).into_wire(endpoint.dialect())
        }
    }
}

fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    [bearer, api_key]
        .into_iter()
        .flatten()
        .any(|t| constant_time_eq(t.trim().as_bytes(), state.client_token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
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

fn price_of(state: &AppState, model: &str) -> Result<Option<Price>, ProxyError> {
    match &state.config.prices {
        None => Ok(None),
        Some(table) => table
            .get(model)
            .copied()
            .map(Some)
            .ok_or_else(|| ProxyError::UnknownModel(model.to_owned())),
    }
}

async fn serve(
    state: &Arc<AppState>,
    endpoint: Endpoint,
    req: Request,
    t0: Instant,
    span: &tracing::Span,
) -> Result<Response, ProxyError> {
    if !authorized(state, req.headers()) {
        return Err(ProxyError::Unauthorized);
    }
    let kind = state.config.provider.kind;
    if !endpoint.served_by(kind) {
        return Err(ProxyError::WrongProvider {
            path: endpoint.path().into(),
            provider: match kind {
                crate::config::ProviderKind::Anthropic => "anthropic",
                crate::config::ProviderKind::Openai => "openai",
                crate::config::ProviderKind::OpenaiCompatible => "openaiCompatible",
            },
        });
    }
    let (parts, body) = req.into_parts();
    let limit = state.config.body_limit_bytes;
    if !endpoint.metered() {
        let bytes = if parts.method == axum::http::Method::GET {
            Bytes::new()
        } else {
            if !is_json(&parts.headers) {
                return Err(ProxyError::ContentType);
            }
            read_body(body, limit).await?
        };
        return forward_unmetered(state, endpoint, &parts, bytes, span).await;
    }
    if !is_json(&parts.headers) {
        return Err(ProxyError::ContentType);
    }
    let bytes = read_body(body, limit).await?;
    let mut json: Value =
        serde_json::from_slice(&bytes).map_err(|e| ProxyError::Json(e.to_string()))?;
    if !json.is_object() {
        return Err(ProxyError::Json("expected an object".into()));
    }
    let mut model = json
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .ok_or(ProxyError::NoModel)?
        .to_owned();
    let stream = json.get("stream") == Some(&Value::Bool(true));
    genai_span::record_request(
        span,
        endpoint,
        &model,
        tokens::max_output_tokens(&json),
        stream,
    );
    let mut price = price_of(state, &model)?;
    let prompt = tokens::estimate_prompt_with(&model, &json, state.config.image_tokens);
    let max_out = if endpoint.input_only() {
        0
    } else {
        tokens::max_output_tokens(&json).unwrap_or(state.config.default_max_tokens)
    };
    let mut rewritten = false;
    let now = jiff::Timestamp::now();
    let mut worst = Amount::worst_case(prompt, max_out, price.as_ref());
    let reservations = match state.authority.reserve(now, worst).await {
        Reserve::Taken(r) => r,
        Reserve::Undefined(name) => return Err(ProxyError::BudgetUndefined(name)),
        Reserve::Unavailable(reason) => {
            state.metrics.request(endpoint.label(), &model, 503);
            return Err(ProxyError::BudgetUnavailable(reason));
        }
        Reserve::Refused(refusal) => {
            let brown_out = state
                .authority
                .def(&refusal.budget)
                .filter(|d| d.on_exhausted.action == ExhaustedAction::BrownOut)
                .and_then(|d| d.on_exhausted.brown_out_model)
                .filter(|m| *m != model);
            let retried = match brown_out {
                Some(cheaper) => {
                    let cheaper_price = price_of(state, &cheaper)?;
                    let cheaper_worst = Amount::worst_case(prompt, max_out, cheaper_price.as_ref());
                    match state.authority.reserve(now, cheaper_worst).await {
                        Reserve::Taken(r) => {
                            tracing::info!(from = %model, to = %cheaper, budget = %refusal.budget, "brown-out");
                            state.authority.count_refusal(&refusal.budget, true);
                            json["model"] = Value::String(cheaper.clone());
                            model = cheaper;
                            price = cheaper_price;
                            worst = cheaper_worst;
                            rewritten = true;
                            Some(r)
                        }
                        _ => None,
                    }
                }
                None => None,
            };
            match retried {
                Some(r) => r,
                None => {
                    // The Budget's refusal count means "its period cap is used up"; rate-limit
                    // refusals are the sidecar's own metric (`limit` label) only.
                    if matches!(
                        refusal.limit,
                        soma_metering::budget::LimitKind::Tokens
                            | soma_metering::budget::LimitKind::CostMicros
                    ) {
                        state.authority.count_refusal(&refusal.budget, false);
                    }
                    state
                        .metrics
                        .refusal(&refusal.budget, refusal.limit.field());
                    state.metrics.request(endpoint.label(), &model, 429);
                    return Err(ProxyError::Budget(refusal));
                }
            }
        }
    };
    let charge = Charge {
        id: uuid::Uuid::now_v7().to_string(),
        reservations,
        model: model.clone(),
        price,
        prompt_estimate: prompt,
        span: span.clone(),
    };
    let record = OpenRecord {
        id: charge.id.clone(),
        namespace: state.config.agent.namespace.clone(),
        agent: state.config.agent.name.clone(),
        budgets: state.authority.chain_label(),
        endpoint: endpoint.label(),
        model: model.clone(),
        started_at: now,
        prompt_estimate: prompt,
        max_output_tokens: max_out,
        reserved: worst,
    };
    if let Err(e) = state.outbox.begin(&record).await {
        state.authority.release(now, charge.reservations);
        return Err(ProxyError::Outbox(e));
    }

    let inject = stream
        && endpoint.needs_include_usage()
        && json.pointer("/stream_options/include_usage") != Some(&Value::Bool(true));
    if inject {
        match json
            .get_mut("stream_options")
            .and_then(Value::as_object_mut)
        {
            Some(o) => {
                o.insert("include_usage".into(), Value::Bool(true));
            }
            None => json["stream_options"] = serde_json::json!({"include_usage": true}),
        }
    }
    let out_body = if inject || rewritten {
        Bytes::from(serde_json::to_vec(&json).map_err(|e| ProxyError::Internal(e.to_string()))?)
    } else {
        bytes
    };
    forward_metered(state, endpoint, &parts, out_body, charge, inject, t0).await
}

async fn forward_metered(
    state: &Arc<AppState>,
    endpoint: Endpoint,
    parts: &axum::http::request::Parts,
    body: Bytes,
    charge: Charge,
    strip_usage: bool,
    t0: Instant,
) -> Result<Response, ProxyError> {
    let dialect = endpoint.dialect();
    let label = endpoint.label();
    let request = match build(state, endpoint, parts, body) {
        Ok(r) => r,
        Err(e) => {
            charge
                .settle(state, Usage::default(), false, "internal", 500)
                .await;
            return Err(e);
        }
    };
    let sent = Instant::now();
    let pre = sent - t0;
    let upstream = match tokio::time::timeout(
        state.response_headers_timeout(),
        state.client.request(request),
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            charge
                .settle(state, Usage::default(), false, "upstream_unreachable", 502)
                .await;
            return Err(ProxyError::Upstream(e));
        }
        Err(_) => {
            charge
                .settle(state, Usage::default(), false, "upstream_timeout", 504)
                .await;
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
    let model = charge.model.clone();

    if !status.is_success() {
        // Nothing was generated: release, and pass the provider's error on, key scrubbed.
        let body = match upstream::read_all(rbody, state.idle()).await {
            Ok(b) => b,
            Err((_, partial)) => partial,
        };
        charge
            .settle(
                state,
                Usage::default(),
                false,
                "upstream_error",
                status.as_u16(),
            )
            .await;
        state.metrics.request(label, &model, status.as_u16());
        return Ok(respond(status, headers, state.key.scrub(body)));
    }

    let event_stream = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if event_stream {
        state
            .metrics
            .added_latency(label, (pre + headers_at.elapsed()).as_secs_f64());
        state.metrics.request(label, &model, status.as_u16());
        return Ok(relay::relay(
            state.clone(),
            charge,
            dialect,
            strip_usage,
            status,
            headers,
            rbody,
        ));
    }

    match upstream::read_all(rbody, state.idle()).await {
        Ok(body) => {
            let value = serde_json::from_slice::<Value>(&body).ok();
            if let Some(v) = &value
                && !charge.span.is_disabled()
            {
                genai_span::record_response(&charge.span, &wire::ResponseInfo::from_body(v));
            }
            let parsed = value
                .as_ref()
                .and_then(|v| wire::usage_from_body(dialect, v));
            let (usage, estimated) = match parsed {
                Some(u) => (u, false),
                None => (estimate_from_body(&charge, &body), true),
            };
            let body_done = Instant::now();
            charge
                .settle(state, usage, estimated, "ok", status.as_u16())
                .await;
            state
                .metrics
                .added_latency(label, (pre + body_done.elapsed()).as_secs_f64());
            state.metrics.request(label, &model, status.as_u16());
            Ok(respond(status, headers, body))
        }
        Err((kind, partial)) => {
            // The provider generated something and the body broke: meter the prompt (the
            // client received nothing).
            let usage = Usage {
                input_tokens: charge.prompt_estimate,
                ..Usage::default()
            };
            drop(partial);
            let (outcome, err) = match kind {
                upstream::ReadError::Idle => ("upstream_timeout", ProxyError::UpstreamTimeout),
                upstream::ReadError::Broken => (
                    "upstream_cut",
                    ProxyError::Internal("the provider's response broke off".into()),
                ),
            };
            charge.settle(state, usage, true, outcome, 502).await;
            Err(err)
        }
    }
}

/// A 2xx body without usage (some OpenAI-compatible servers): the prompt estimate plus every
/// token of the body's text, which over-counts rather than under-counts.
fn estimate_from_body(charge: &Charge, body: &[u8]) -> Usage {
    Usage {
        input_tokens: charge.prompt_estimate,
        output_tokens: tokens::count_text(&charge.model, &String::from_utf8_lossy(body)),
        ..Usage::default()
    }
}

fn build(
    state: &AppState,
    endpoint: Endpoint,
    parts: &axum::http::request::Parts,
    body: Bytes,
) -> Result<axum::http::Request<http_body_util::Full<Bytes>>, ProxyError> {
    let uri = upstream::upstream_uri(
        &state.config.provider.upstream,
        endpoint.path(),
        parts.uri.query(),
    )?;
    upstream::request(
        parts.method.clone(),
        uri,
        &parts.headers,
        body,
        state.config.provider.kind,
        &state.key,
        &state.config.anthropic_version,
    )
}

async fn forward_unmetered(
    state: &Arc<AppState>,
    endpoint: Endpoint,
    parts: &axum::http::request::Parts,
    body: Bytes,
    span: &tracing::Span,
) -> Result<Response, ProxyError> {
    let request = build(state, endpoint, parts, body)?;
    let upstream = tokio::time::timeout(
        state.response_headers_timeout(),
        state.client.request(request),
    )
    .await
    .map_err(|_| ProxyError::UpstreamTimeout)?
    .map_err(ProxyError::Upstream)?;
    let (rparts, rbody) = upstream.into_parts();
    let body = upstream::read_all(rbody, state.idle())
        .await
        .map_err(|_| ProxyError::UpstreamTimeout)?;
    state
        .metrics
        .request(endpoint.label(), "", rparts.status.as_u16());
    genai_span::record_status(span, rparts.status.as_u16());
    let body = if rparts.status.is_success() {
        body
    } else {
        state.key.scrub(body)
    };
    Ok(respond(
        rparts.status,
        upstream::response_headers(&rparts.headers),
        body,
    ))
}

fn respond(status: StatusCode, headers: HeaderMap, body: Bytes) -> Response {
    let mut resp = (status, body).into_response();
    *resp.headers_mut() = headers;
    resp
}
