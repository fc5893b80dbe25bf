//! Logs and traces for Soma's binaries (the operator and the `soma-proxy` sidecar).
//!
//! ```text
//!  tracing spans/events ──► registry ─┬─► fmt layer (JSON, or text with SOMA_LOG_FORMAT=text)
//!                                     │     filtered by RUST_LOG; skips EXPORT_ONLY spans
//!                                     └─► OpenTelemetry layer ──OTLP──► collector
//!                                           only when OTEL_EXPORTER_OTLP_ENDPOINT is set;
//!                                           filtered by RUST_LOG, plus every EXPORT_ONLY span
//! ```
//!
//! The standard OpenTelemetry variables apply: `OTEL_EXPORTER_OTLP_ENDPOINT` (the exporter
//! appends `/v1/traces` for HTTP), `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc`, or HTTP/protobuf by
//! default), `OTEL_SERVICE_NAME` (wins over the name the binary passes) and
//! `OTEL_RESOURCE_ATTRIBUTES` (read by the SDK's resource detectors). Without an endpoint no
//! exporter is built and no OpenTelemetry layer is installed, so [`EXPORT_ONLY`] spans are
//! disabled at their call sites and cost nothing.
//!
//! The OpenTelemetry layer exports integer fields recorded as `i64` as integers; `u64` fields
//! arrive as strings (tracing-opentelemetry has no `u64` mapping), so record counts as `i64`.
#![forbid(unsafe_code)]

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Key, StringValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::{FilterExt, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Target of spans that exist for trace export only (the sidecar's per-call GenAI span):
/// exported whatever `RUST_LOG` says, never formatted into log lines, and disabled entirely
/// when no OTLP endpoint is configured. Create them with `info_span!(target: EXPORT_ONLY, ..)`.
pub const EXPORT_ONLY: &str = "soma::otel";

/// The log filter when `RUST_LOG` is unset.
const DEFAULT_FILTER: &str = "info,kube=warn";

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (a malformed endpoint, for one).
    #[error("building the OTLP span exporter")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    /// A global subscriber was already installed.
    #[error("installing the global tracing subscriber")]
    Install(#[source] tracing_subscriber::util::TryInitError),
}

/// Keeps the trace exporter alive; flushes spans when dropped.
#[derive(Debug)]
#[must_use = "dropping Telemetry shuts the exporter down"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported (an OTLP endpoint was configured).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
}

/// The resource spans are exported under: what the SDK's detectors read from
/// `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`, with `service_name` only when neither
/// names the service.
pub fn resource(service_name: &str) -> Resource {
    let detected = Resource::builder().build();
    if names_service(&detected) {
        detected
    } else {
        Resource::builder()
            .with_service_name(service_name.to_owned())
            .build()
    }
}

/// Whether `resource` has a `service.name` other than the SDK's `unknown_service` fallback.
fn names_service(resource: &Resource) -> bool {
    resource
        .get(&Key::from_static_str("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"))
}

/// Installs the global subscriber. Must run inside the Tokio runtime (the exporter uses it).
pub fn init(service_name: &str) -> Result<Telemetry, TelemetryError> {
    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.trim().is_empty() => {
            let exporter = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
                Ok("grpc") => opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .build(),
                _ => opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .build(),
            }
            .map_err(TelemetryError::Exporter)?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource(service_name))
                    .build(),
            )
        }
        _ => None,
    };
    let text = std::env::var("SOMA_LOG_FORMAT").as_deref() == Ok("text");
    subscriber(env_filter, text, provider.as_ref(), service_name)
        .try_init()
        .map_err(TelemetryError::Install)?;
    Ok(Telemetry { provider })
}

/// The layers [`init`] installs: logs filtered by `filter()` without [`EXPORT_ONLY`] spans, and
/// with a `provider` the OpenTelemetry layer, filtered by `filter()` plus every
/// [`EXPORT_ONLY`] span. (`filter` is called once per layer: an `EnvFilter` is not `Clone`.)
fn subscriber(
    filter: impl Fn() -> EnvFilter,
    text: bool,
    provider: Option<&SdkTracerProvider>,
    service_name: &str,
) -> impl tracing::Subscriber + Send + Sync {
    let logged = filter_fn(|meta| meta.target() != EXPORT_ONLY);
    let fmt = if text {
        tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_filter(filter().and(logged))
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_filter(filter().and(logged))
            .boxed()
    };
    // A Vec rather than an Option: an absent `Option` layer still claims interest in every
    // call site (tracing-subscriber 0.3), which would keep EXPORT_ONLY spans alive for nothing.
    let mut layers = vec![fmt];
    layers.extend(provider.map(|p| {
        let exported = filter_fn(|meta| meta.target() == EXPORT_ONLY);
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service_name.to_owned()))
            // Spans stay builders until they close, so fields recorded late (the sidecar's
            // `otel.name`, once the model is known) still apply; nothing here propagates the
            // OpenTelemetry context, which is what activation is for.
            .with_context_activation(false)
            // Per-span thread names and busy/idle timings cost time on every poll of every
            // request; the exported spans do not need them.
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_target(false)
            .with_filter(filter().or(exported))
            .boxed()
    }));
    tracing_subscriber::registry().with(layers)
}

/// Sets a string-array attribute (such as `gen_ai.response.finish_reasons`) on `span`'s
/// OpenTelemetry span; `tracing` fields cannot carry arrays. A no-op when the span is disabled
/// or nothing exports.
pub fn set_string_array(span: &tracing::Span, key: &'static str, values: &[String]) {
    if span.is_disabled() || values.is_empty() {
        return;
    }
    let values: Vec<StringValue> = values.iter().map(|v| v.clone().into()).collect();
    span.set_attribute(key, Value::Array(values.into()));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a span with `target` at INFO is enabled under the layers for `directives`.
    fn enabled(directives: &str, exporting: bool, target: &str) -> bool {
        let provider = exporting.then(|| SdkTracerProvider::builder().build());
        let sub = subscriber(|| EnvFilter::new(directives), true, provider.as_ref(), "t");
        tracing::subscriber::with_default(sub, || {
            // One call site per target: interest is cached per call site.
            let span = match target {
                EXPORT_ONLY => tracing::info_span!(target: "soma::otel", "gen_ai.request"),
                _ => tracing::info_span!(target: "soma_proxy", "reconcile"),
            };
            !span.is_disabled()
        })
    }

    #[test]
    fn export_only_spans_exist_only_when_exporting_whatever_the_log_filter() {
        let cases = [
            // (RUST_LOG, exporting, target, enabled)
            ("info", false, EXPORT_ONLY, false),
            ("trace", false, EXPORT_ONLY, false),
            ("info", true, EXPORT_ONLY, true),
            ("warn", true, EXPORT_ONLY, true),
            ("info", false, "soma_proxy", true),
            ("warn", false, "soma_proxy", false),
            ("warn", true, "soma_proxy", false),
        ];
        for (directives, exporting, target, want) in cases {
            assert_eq!(
                enabled(directives, exporting, target),
                want,
                "RUST_LOG={directives} exporting={exporting} target={target}"
            );
        }
    }

    #[test]
    fn the_sdk_fallback_name_does_not_count_as_naming_the_service() {
        let cases = [
            (Resource::builder_empty().build(), false),
            (
                Resource::builder_empty()
                    .with_service_name("unknown_service:soma-proxy")
                    .build(),
                false,
            ),
            (
                Resource::builder_empty()
                    .with_service_name("checkout-agent")
                    .build(),
                true,
            ),
        ];
        for (resource, want) in cases {
            assert_eq!(names_service(&resource), want, "{resource:?}");
        }
    }

    #[test]
    fn the_binary_name_fills_in_when_the_environment_names_no_service() {
        // The test process sets neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES (the
        // e2e test covers both being set).
        if std::env::var_os("OTEL_SERVICE_NAME").is_some()
            || std::env::var_os("OTEL_RESOURCE_ATTRIBUTES").is_some()
        {
            return;
        }
        let r = resource("soma-proxy");
        assert_eq!(
            r.get(&Key::from_static_str("service.name"))
                .map(|v| v.as_str().into_owned()),
            Some("soma-proxy".to_owned())
        );
    }
}
