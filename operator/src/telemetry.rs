//! Structured logs (JSON, or text with `SOMA_LOG_FORMAT=text`) filtered by `RUST_LOG`, and
//! OpenTelemetry trace export over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set: HTTP/protobuf
//! by default, gRPC with `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` (the standard variables; the
//! exporter reads the endpoint itself, appending `/v1/traces` for HTTP).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the trace exporter alive; flushes spans when dropped.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber. Must run inside the Tokio runtime (the exporter uses it).
pub fn init(service_name: &str) -> anyhow::Result<Telemetry> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    let fmt = match std::env::var("SOMA_LOG_FORMAT").as_deref() {
        Ok("text") => tracing_subscriber::fmt::layer().with_target(false).boxed(),
        _ => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .boxed(),
    };
    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => {
            let exporter = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
                Ok("grpc") => opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .build()?,
                _ => opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .build()?,
            };
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(service_name.to_owned())
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        _ => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service_name.to_owned())));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()?;
    Ok(Telemetry { provider })
}
