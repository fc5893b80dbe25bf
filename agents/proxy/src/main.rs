//! `soma-proxy --config PATH`: reads the file the operator writes, takes the client token from
//! the variable it names, and serves until SIGTERM or Ctrl-C.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// mimalloc rather than the system allocator: a request allocates a few hundred times (headers,
/// JSON values, bodies), and glibc's malloc and free were 16 % of the sidecar's instructions
/// per request (`bench/proxy-profile`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let mut config = soma_proxy::Config::parse(&text)
        .with_context(|| format!("parsing {}", args.config.display()))?;
    soma_proxy::config::apply_env(&mut config, |name| std::env::var(name).ok())
        .with_context(|| format!("reading {}", args.config.display()))?;
    // One worker: the runtime runs every task on this thread, so serving a request never
    // wakes another thread. More: tokio's work-stealing scheduler over that many threads.
    let runtime = match config.worker_threads.get() {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    runtime.block_on(serve(args, config))
}

async fn serve(args: Args, config: soma_proxy::Config) -> anyhow::Result<()> {
    // Logs, and GenAI spans over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set (the operator
    // sets it, with OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, when it has a collector).
    let _telemetry = soma_telemetry::init("soma-proxy")?;
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
