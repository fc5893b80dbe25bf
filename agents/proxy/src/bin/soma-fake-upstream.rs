//! `soma-fake-upstream --listen 127.0.0.1:0 --key KEY`: the deterministic provider stand-in
//! (`soma_proxy::fake_upstream`) as a process, for benchmarks. Prints `listening on ADDR`.

use clap::Parser;

/// A deterministic OpenAI/Anthropic stand-in for tests and benchmarks.
#[derive(Parser, Debug)]
struct Args {
    /// Address (127.0.0.1 only in tests).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// The key it accepts.
    #[arg(long, env = "SOMA_FAKE_UPSTREAM_KEY", default_value = "sk-fake")]
    key: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let up = soma_proxy::fake_upstream::FakeUpstream::start_on(&args.listen, &args.key).await?;
    println!("listening on {}", up.addr);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
