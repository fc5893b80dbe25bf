//! `soma-proxy --config PATH`: reads the file the operator writes, takes the client token from
//! the variable it names, and serves until SIGTERM or Ctrl-C.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Soma's metering sidecar.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The configuration file (JSON or YAML).
    #[arg(
        long,
        env = "SOMA_PROXY_CONFIG",
        default_value = "/etc/soma/proxy/config.yaml"
    )]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Logs, and GenAI spans over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set (the operator
    // sets it, with OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, when it has a collector).
    let _telemetry = soma_telemetry::init("soma-proxy")?;
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let mut config = soma_proxy::Config::parse(&text)
        .with_context(|| format!("parsing {}", args.config.display()))?;
    soma_proxy::config::apply_env(&mut config, |name| std::env::var(name).ok())
        .with_context(|| format!("reading {}", args.config.display()))?;
    let token = std::env::var(&config.client_token_env).unwrap_or_default();
    let running = soma_proxy::start(config, token, Some(args.config.clone())).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    running.stop().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
