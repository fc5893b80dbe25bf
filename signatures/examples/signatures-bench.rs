//! `bench/signatures`: Soma's cosign verification cold (a fresh verifier: new connection, manifest
//! and signature fetched and checked) and cached, against the cosign CLI's `verify` of the same
//! artifact in the same run. The registry is a real docker-registry on 127.0.0.1; the artifact
//! is pushed with oras and signed with `cosign sign --key`.
//!
//! Usage: signatures-bench [--runs 30] [--cached-calls 200000]
//! Ends with one line `RESULT signatures verify_cold_ms=.. verify_cached_us=.. cosign_cli_ms=.. ...`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use soma_signatures::{OciRef, Policy};

struct Args {
    runs: usize,
    cached_calls: usize,
}

fn args() -> Result<Args> {
    let mut args = Args {
        runs: 30,
        cached_calls: 200_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--runs" => args.runs = value.parse().context("--runs")?,
            "--cached-calls" => args.cached_calls = value.parse().context("--cached-calls")?,
            other => bail!("unknown flag {other} (expected --runs N, --cached-calls N)"),
        }
    }
    if args.runs == 0 || args.cached_calls == 0 {
        bail!("--runs and --cached-calls must be at least 1");
    }
    Ok(args)
}

/// The q-quantile (nearest rank) of sorted durations.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = args()?;
    let tools = support::tools().context(
        "cosign, oras and docker-registry are needed (scripts/test-deps/signing-tools.sh)",
    )?;
    let registry = support::Registry::start(&tools)?;
    let work = support::Workdir::new(&tools)?;
    let pem = work.key_pair("bench")?;
    let repo = "capsules/bench";
    let content = serde_json::json!({
        "blocks": (0..64).map(|i| serde_json::json!({"id": format!("b{i}"), "text": "x".repeat(512)})).collect::<Vec<_>>()
    })
    .to_string();
    let digest = work.push(&registry.addr, repo, "v1", &content)?;
    work.sign("bench", &registry.addr, repo, &digest)?;
    let artifact = OciRef::new(&registry.addr, repo, &digest)?;
    let policy = Policy::public_key_pem(&pem)?;
    let target = artifact.to_string();
    println!(
        "artifact {target} ({} bytes), signed with cosign sign --key",
        content.len()
    );

    // Warm-up: the first process start and the registry's first reads are not measured.
    support::verifier(&registry.addr)
        .verify_oci(&artifact, &policy)
        .await?;
    let cosign_verify = [
        "verify",
        "--key",
        "bench.pub",
        "--insecure-ignore-tlog",
        "--allow-http-registry",
        "--allow-insecure-registry",
        "--output",
        "json",
        &target,
    ];
    work.cosign(&cosign_verify)?;

    // Cold and cosign interleaved, so both see the same machine load.
    let mut cold = Vec::with_capacity(args.runs);
    let mut cli = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let verifier = support::verifier(&registry.addr);
        let start = Instant::now();
        let verified = verifier.verify_oci(&artifact, &policy).await?;
        cold.push(start.elapsed());
        if verified.digest != digest {
            bail!("verified {} instead of {digest}", verified.digest);
        }
        let start = Instant::now();
        work.cosign(&cosign_verify)
            .context("cosign verify of the same artifact")?;
        cli.push(start.elapsed());
    }

    let verifier = support::verifier(&registry.addr);
    verifier.verify_oci(&artifact, &policy).await?;
    let mut cached = Vec::with_capacity(args.cached_calls);
    for _ in 0..args.cached_calls {
        let start = Instant::now();
        let verified = verifier.verify_oci(&artifact, &policy).await?;
        cached.push(start.elapsed());
        std::hint::black_box(verified);
    }

    cold.sort_unstable();
    cli.sort_unstable();
    cached.sort_unstable();
    let (cold50, cold99) = (quantile(&cold, 0.5), quantile(&cold, 0.99));
    let (cli50, cli99) = (quantile(&cli, 0.5), quantile(&cli, 0.99));
    let (c50, c99) = (quantile(&cached, 0.5), quantile(&cached, 0.99));
    println!("{:<34} {:>12} {:>12}", "measure", "p50", "p99");
    println!(
        "{:<34} {:>10.2}ms {:>10.2}ms",
        format!("soma cold ({} runs)", args.runs),
        ms(cold50),
        ms(cold99)
    );
    println!(
        "{:<34} {:>10.2}us {:>10.2}us",
        format!("soma cached ({} calls)", args.cached_calls),
        us(c50),
        us(c99)
    );
    println!(
        "{:<34} {:>10.2}ms {:>10.2}ms",
        format!("cosign verify CLI ({} runs)", args.runs),
        ms(cli50),
        ms(cli99)
    );
    let cold_speedup = cli50.as_secs_f64() / cold50.as_secs_f64();
    let cached_speedup = cli50.as_secs_f64() / c50.as_secs_f64();
    println!(
        "soma cold is {cold_speedup:.1}x faster than the cosign CLI (p50); cached {cached_speedup:.0}x"
    );
    println!(
        "RESULT signatures verify_cold_ms={:.3} verify_cold_p99_ms={:.3} verify_cached_us={:.3} verify_cached_p99_us={:.3} \
         cosign_cli_ms={:.3} cosign_cli_p99_ms={:.3} cold_speedup_vs_cosign={cold_speedup:.2} cached_speedup_vs_cosign={cached_speedup:.0} \
         runs={} cached_calls={} aim_cached_us=50",
        ms(cold50),
        ms(cold99),
        us(c50),
        us(c99),
        ms(cli50),
        ms(cli99),
        args.runs,
        args.cached_calls
    );
    Ok(())
}
