//! Streaming responses: the provider's SSE bytes go to the client as they arrive while a
//! [`StreamMeter`] reads the same events for usage.
//!
//! When the sidecar added `stream_options.include_usage` itself, the client did not ask for
//! usage, so the relay works event by event: the usage-only chunk is dropped and the
//! `,"usage":null` member OpenAI then adds to every other chunk is removed; all other bytes are
//! the provider's. Otherwise chunks are forwarded exactly as received.
//!
//! The usage record is settled before the client's body ends. A client that goes away stops
//! the relay (and the upstream call); a provider that goes silent or breaks the connection ends
//! the client's body with an error after settling. Either way what was delivered is metered.
//!
//! A stream the provider broke, left silent past `timeouts.idleMs`, or ended with an error
//! event (the client already had its 200) is counted in `soma_proxy_errors_total` by cause
//! (`stream_cut`, `stream_idle_timeout`, `stream_error_event`), logged once with the record's
//! id and the provider's response id, and marked on the call's span. Every stream's end is
//! counted in `soma_proxy_stream_endings_total` by outcome.
//!
//! The call's GenAI span travels in the [`Charge`], so it stays open until the stream has been
//! metered and settled, and carries the stream's response id, model and finish reasons.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use soma_metering::sse::{self, Framer};
use soma_metering::wire::{Dialect, Disposition, StreamMeter};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::genai_span;
use crate::state::{AppState, Charge};
use crate::upstream::replace_all;

const USAGE_NULL: &[u8] = b",\"usage\":null";

/// Starts relaying `body` and returns the client's response.
pub fn relay(
    state: Arc<AppState>,
    charge: Charge,
    dialect: Dialect,
    strip_usage: bool,
    status: StatusCode,
    headers: HeaderMap,
    body: Incoming,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(32);
    // The pump enters the call's span, so the span ends when the stream is metered, not when
    // the response headers went out.
    let span = charge.span.clone();
    tokio::spawn(pump(state, charge, dialect, strip_usage, status, body, tx).instrument(span));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// Events a chunk completed, as the client should see them.
fn forward_events(
    meter: &mut StreamMeter,
    events: Vec<Vec<u8>>,
    strip_usage: bool,
    out: &mut Vec<u8>,
) {
    for ev in events {
        let d = meter.observe(&sse::parse(&ev));
        if strip_usage {
            if d == Disposition::UsageOnly {
                continue;
            }
            out.extend_from_slice(&replace_all(&ev, USAGE_NULL, b""));
        }
    }
}

async fn pump(
    state: Arc<AppState>,
    charge: Charge,
    dialect: Dialect,
    strip_usage: bool,
    status: StatusCode,
    mut body: Incoming,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let idle = state.idle();
    let mut framer = Framer::default();
    let mut meter = StreamMeter::new(dialect);
    let outcome = loop {
        let frame = tokio::select! {
            _ = tx.closed() => break "client_disconnected",
            f = tokio::time::timeout(idle, body.frame()) => f,
        };
        let data = match frame {
            Err(_) => break "upstream_timeout",
            Ok(None) => break "ok",
            Ok(Some(Err(_))) => break "upstream_cut",
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(d) => d,
                Err(_) => continue, // trailers
            },
        };
        let events = framer.push(&data);
        let out = if strip_usage {
            let mut out = Vec::with_capacity(data.len());
            forward_events(&mut meter, events, true, &mut out);
            Bytes::from(out)
        } else {
            forward_events(&mut meter, events, false, &mut Vec::new());
            data
        };
        if !out.is_empty() && tx.send(Ok(out)).await.is_err() {
            break "client_disconnected";
        }
    };
    if outcome != "client_disconnected" {
        let mut tail = Vec::new();
        forward_events(&mut meter, framer.finish(), strip_usage, &mut tail);
        if strip_usage {
            tail.extend_from_slice(&framer.take_pending());
        }
        if !tail.is_empty() {
            let _ = tx.send(Ok(Bytes::from(tail))).await;
        }
    }
    // A stream the provider finished with an error event ended "ok" on the wire.
    let outcome = match (outcome, meter.error()) {
        ("ok", Some(_)) => "upstream_error_event",
        (o, _) => o,
    };
    let (metered, estimated) = meter.finish(&charge.model, || charge.prompt.count(&charge.model));
    let client_status = if outcome == "ok" { status.as_u16() } else { 0 };
    genai_span::record_response(&charge.span, meter.response());
    state.metrics.stream_ending(outcome);
    let failure = match outcome {
        "upstream_cut" => Some("stream_cut"),
        "upstream_timeout" => Some("stream_idle_timeout"),
        "upstream_error_event" => Some("stream_error_event"),
        _ => None,
    };
    if let Some(reason) = failure {
        state.metrics.error(reason);
        genai_span::record_error(&charge.span, meter.error().unwrap_or(reason));
        tracing::warn!(
            id = %charge.id,
            provider_response_id = meter.response().id.as_deref().unwrap_or(""),
            gen_ai.request.model = %charge.model,
            reason,
            provider_error = meter.error().unwrap_or(""),
            estimated,
            "a stream ended early; what was delivered is metered"
        );
    }
    charge.settle(&state, metered, estimated, outcome, client_status);
    if matches!(outcome, "upstream_cut" | "upstream_timeout") {
        // Abort the client's body so it sees an incomplete stream, as it would without us.
        let _ = tx
            .send(Err(std::io::Error::other(
                "the provider's stream ended early",
            )))
            .await;
    }
}
