//! The span of one call, following the OpenTelemetry GenAI semantic conventions (inference
//! client span): named `{gen_ai.operation.name} {gen_ai.request.model}`, kind CLIENT, with
//! the request's model and limits, the provider's response id, model, finish reasons and usage,
//! the upstream's address, `error.type` on failure, and Soma's own `soma.*` attributes.
//!
//! ```text
//!  handle ── span opens ──► serve (model, max_tokens, stream) ──► provider
//!                               └─► settle (usage, cost, outcome) ── span closes
//!  streaming: the relay task holds the span, so it closes after the stream is metered
//! ```
//!
//! The span's target is [`soma_telemetry::EXPORT_ONLY`]: it is exported over OTLP and never
//! formatted into log lines, and without an OTLP endpoint it is disabled at its call site, so
//! every `record` below is a no-op and nothing is formatted or allocated for it. Nothing here
//! records a credential or any prompt or response text: only names, numbers and ids.

use soma_metering::Usage;
use soma_metering::wire::ResponseInfo;
use tracing::Span;
use tracing::field::{Empty, display};

use crate::config::{ProviderConfig, ProviderKind};
use crate::endpoint::Endpoint;

/// `gen_ai.operation.name` for `endpoint`: the well-known values where one applies; the two
/// endpoints that generate nothing get their own names.
pub fn operation_name(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::ChatCompletions
        | Endpoint::Responses
        | Endpoint::ResponsesCompact
        | Endpoint::Messages => "chat",
        Endpoint::Completions => "text_completion",
        Endpoint::Embeddings => "embeddings",
        Endpoint::Models => "list_models",
        Endpoint::CountTokens => "count_tokens",
    }
}

/// `gen_ai.provider.name` (and the older `gen_ai.system`) for the configured provider.
pub fn provider_name(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Openai => "openai",
        ProviderKind::Anthropic => "anthropic",
        // Not a well-known value: any server speaking OpenAI's API (vLLM, a gateway, ...).
        ProviderKind::OpenaiCompatible => "openai_compatible",
    }
}

/// The upstream's host and port (`server.address`, `server.port`), the port defaulted from
/// the scheme.
pub fn server_address(upstream: &str) -> Option<(String, u16)> {
    let uri: axum::http::Uri = upstream.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("http") => 80,
        _ => 443,
    });
    Some((host.to_owned(), port))
}

/// Opens the span of one call to `endpoint`.
pub fn open(endpoint: Endpoint, provider: &ProviderConfig, budget: Option<&str>) -> Span {
    let operation = operation_name(endpoint);
    let provider_name = provider_name(provider.kind);
    let span = tracing::info_span!(
        target: soma_telemetry::EXPORT_ONLY,
        "gen_ai.request",
        otel.name = operation,
        otel.kind = "client",
        otel.status_code = Empty,
        gen_ai.operation.name = operation,
        gen_ai.provider.name = provider_name,
        gen_ai.system = provider_name,
        gen_ai.request.model = Empty,
        gen_ai.request.max_tokens = Empty,
        gen_ai.request.stream = Empty,
        gen_ai.response.id = Empty,
        gen_ai.response.model = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        gen_ai.usage.cache_read.input_tokens = Empty,
        server.address = Empty,
        server.port = Empty,
        http.response.status_code = Empty,
        error.type = Empty,
        soma.budget = budget,
        soma.budget.refused_by = Empty,
        soma.cost_micros = Empty,
        soma.usage.estimated = Empty,
        soma.outcome = Empty,
    );
    if !span.is_disabled()
        && let Some((host, port)) = server_address(&provider.upstream)
    {
        span.record("server.address", host.as_str());
        span.record("server.port", i64::from(port));
    }
    span
}

/// The request as parsed: its model (which also names the span), `max_tokens` if the client
/// set one, and whether it asked for a stream.
pub fn record_request(
    span: &Span,
    endpoint: Endpoint,
    model: &str,
    max_tokens: Option<u64>,
    stream: bool,
) {
    if span.is_disabled() {
        return;
    }
    span.record(
        "otel.name",
        display(format_args!("{} {model}", operation_name(endpoint))),
    );
    span.record("gen_ai.request.model", model);
    if let Some(n) = max_tokens {
        span.record("gen_ai.request.max_tokens", int(n));
    }
    span.record("gen_ai.request.stream", stream);
}

/// What the provider said about its response: id, model, finish reasons.
pub fn record_response(span: &Span, info: &ResponseInfo) {
    if span.is_disabled() {
        return;
    }
    if let Some(id) = &info.id {
        span.record("gen_ai.response.id", id.as_str());
    }
    if let Some(model) = &info.model {
        span.record("gen_ai.response.model", model.as_str());
    }
    soma_telemetry::set_string_array(span, "gen_ai.response.finish_reasons", &info.finish_reasons);
}

/// How the call was settled. `outcome` is the outbox's (`ok`, `upstream_error`, ...). A
/// provider's error status becomes the `error.type` here, as the client receives it as a
/// response; failures the client sees as a sidecar error or a broken stream are recorded by
/// their callers with [`record_error`], once.
pub fn record_settlement(
    span: &Span,
    usage: &Usage,
    cost_micros: u64,
    estimated: bool,
    outcome: &'static str,
    http_status: u16,
) {
    if span.is_disabled() {
        return;
    }
    span.record("gen_ai.usage.input_tokens", int(usage.input_tokens));
    span.record("gen_ai.usage.output_tokens", int(usage.output_tokens));
    if usage.cached_input_tokens > 0 {
        span.record(
            "gen_ai.usage.cache_read.input_tokens",
            int(usage.cached_input_tokens),
        );
    }
    span.record("soma.cost_micros", int(cost_micros));
    span.record("soma.usage.estimated", estimated);
    span.record("soma.outcome", outcome);
    if http_status != 0 {
        span.record("http.response.status_code", i64::from(http_status));
    }
    if outcome == "upstream_error" {
        record_error(span, display(http_status));
    }
}

/// Counts as OpenTelemetry integers (`i64`; a `u64` field would be exported as a string).
fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The status the client received (`http.response.status_code`), for calls that are not
/// settled (the unmetered endpoints).
pub fn record_status(span: &Span, status: u16) {
    span.record("http.response.status_code", i64::from(status));
    if !(200..300).contains(&status) {
        record_error(span, display(status));
    }
}

/// Marks a call the sidecar itself answered with an error: `error.type` is the error's label
/// (`budget`, `unauthorized`, ...) and `http.response.status_code` the status the client got.
pub fn record_refusal(span: &Span, label: &'static str, status: u16) {
    span.record("http.response.status_code", i64::from(status));
    record_error(span, label);
}

/// Marks the call failed with `error_type` (a sidecar refusal's label, an upstream status).
pub fn record_error(span: &Span, error_type: impl tracing::Value) {
    span.record("error.type", error_type);
    span.record("otel.status_code", "error");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_and_providers_use_the_conventions_values() {
        let cases = [
            (Endpoint::ChatCompletions, "chat"),
            (Endpoint::Responses, "chat"),
            (Endpoint::Messages, "chat"),
            (Endpoint::Completions, "text_completion"),
            (Endpoint::Embeddings, "embeddings"),
        ];
        for (endpoint, want) in cases {
            assert_eq!(operation_name(endpoint), want, "{endpoint:?}");
        }
        assert_eq!(provider_name(ProviderKind::Openai), "openai");
        assert_eq!(provider_name(ProviderKind::Anthropic), "anthropic");
    }

    #[test]
    fn server_address_defaults_the_port_from_the_scheme() {
        let cases = [
            ("https://api.openai.com", Some(("api.openai.com", 443))),
            ("http://vllm.models:8000/v1", Some(("vllm.models", 8000))),
            ("http://[::1]/v1", Some(("::1", 80))),
            ("not a url", None),
        ];
        for (upstream, want) in cases {
            let got = server_address(upstream);
            assert_eq!(
                got.as_ref().map(|(h, p)| (h.as_str(), *p)),
                want,
                "{upstream}"
            );
        }
    }
}
