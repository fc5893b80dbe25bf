//! `soma-autoscale-sim`: replays a request trace (and seeded synthetic traces) against Soma's
//! autoscaler, an HPA emulation and a KEDA emulation, and prints the comparison.
//!
//! The last line of output is `RESULT autoscaler ...` for the real (or given) trace.

use std::path::{Path, PathBuf};

use anyhow_free::Result;
use clap::Parser;
use soma_autoscaler::sim::report::{TraceReport, result_line, table};
use soma_autoscaler::sim::{Comparison, SimConfig, Trace};

/// `anyhow` is not worth a dependency for one `main`: a boxed error does the same here.
mod anyhow_free {
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;
}

/// The shipped real trace, relative to the repository root (`shared/` sits beside the repo).
const DEFAULT_TRACE: &str = "../shared/data/azure-llm-inference-2023-code.csv";

#[derive(Debug, Parser)]
#[command(about = "Compare Soma's autoscaler with HPA and KEDA emulations on request traces")]
struct Args {
    /// CSV trace (timestamp, prompt tokens, generated tokens). Default: the Azure LLM
    /// inference code trace at ../shared/data/ relative to the repository root.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Seed for the synthetic traces.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Skip the synthetic traces.
    #[arg(long)]
    no_synthetic: bool,
    /// Seconds from pod creation to Ready.
    #[arg(long, default_value_t = 30.0)]
    start_delay: f64,
    /// SLO: per-minute P95 wait target, seconds (also Soma's wait target).
    #[arg(long, default_value_t = 2.0)]
    slo_wait: f64,
    /// Most replicas any autoscaler may use.
    #[arg(long, default_value_t = 64)]
    max_replicas: u32,
    /// Soma settings as JSON over the defaults, e.g. '{"reversalHoldS": 60}' (for
    /// exploring; the benchmark uses the defaults).
    #[arg(long)]
    soma_config: Option<String>,
    /// Write each run's replica timeline as CSV (trace,scaler,time_s,replicas) here.
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// Write each run's per-minute P95 wait as CSV (trace,scaler,minute,p95_wait_s) here.
    #[arg(long)]
    minutes: Option<PathBuf>,
}

fn find_default_trace() -> PathBuf {
    let from_cwd = PathBuf::from(DEFAULT_TRACE);
    if from_cwd.exists() {
        return from_cwd;
    }
    // Also work when run from elsewhere: the crate sits one level below the repo root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(DEFAULT_TRACE)
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let mut message = format!("soma-autoscale-sim: {e}");
            let mut source = e.source();
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("{message}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let soma: soma_autoscaler::AutoscalerConfig = match &args.soma_config {
        Some(json) => serde_json::from_str(json)?,
        None => soma_autoscaler::AutoscalerConfig::default(),
    };
    let cmp = Comparison {
        soma,
        sim: SimConfig {
            start_delay_s: args.start_delay,
            slo_wait_s: args.slo_wait,
            ..SimConfig::default()
        },
        max_replicas: args.max_replicas,
        ..Comparison::default()
    };
    let trace_path = args.trace.clone().unwrap_or_else(find_default_trace);
    let real = Trace::from_csv(&trace_path)?;

    let mut reports: Vec<TraceReport> = vec![cmp.run(&real)?];
    if !args.no_synthetic {
        for kind in Trace::SYNTHETIC {
            if let Some(t) = Trace::synthetic(kind, args.seed) {
                reports.push(cmp.run(&t)?);
            }
        }
    }

    if let Some(path) = &args.timeline {
        let mut csv = String::from("trace,scaler,time_s,replicas\n");
        for rep in &reports {
            for run in &rep.runs {
                for (t, n) in &run.timeline {
                    csv.push_str(&format!("{},{},{t:.1},{n}\n", rep.trace, run.scaler));
                }
            }
        }
        std::fs::write(path, csv)?;
    }

    if let Some(path) = &args.minutes {
        let mut csv = String::from("trace,scaler,minute,p95_wait_s\n");
        for rep in &reports {
            for run in &rep.runs {
                for (m, w) in run.minute_p95_wait_s.iter().enumerate() {
                    if let Some(w) = w {
                        csv.push_str(&format!("{},{},{m},{w:.3}\n", rep.trace, run.scaler));
                    }
                }
            }
        }
        std::fs::write(path, csv)?;
    }

    let soma = cmp.soma_config();
    println!(
        "model: 1 request per replica slot, {} slot(s)/replica, service = {}s + in/{} + out/{} tok/s; \
         pod start {}s; SLO per-minute P95 wait <= {}s; max {} replicas; seed {}",
        cmp.sim.service.slots,
        cmp.sim.service.throughput.overhead_s,
        cmp.sim.service.throughput.prefill_tps,
        cmp.sim.service.throughput.decode_tps,
        cmp.sim.start_delay_s,
        cmp.sim.slo_wait_s,
        cmp.max_replicas,
        args.seed
    );
    println!(
        "soma: rho_max {} wait-headroom {} floor-hold {}s alpha {:.6} beta {:.6} tau {}s step {}s \
         idle-to-zero {:?}s reversal-hold {}s",
        soma.rho_max,
        soma.wait_headroom,
        soma.floor_hold_s,
        soma.conductance.alpha,
        soma.conductance.beta,
        soma.conductance.tau_s,
        cmp.soma_interval_s,
        soma.idle_to_zero_s,
        soma.reversal_hold_s
    );
    println!(
        "real trace: {} ({} requests). Azure LLM inference trace 2023 (code), Azure Public \
         Dataset, CC-BY 4.0; Patel et al., \"Splitwise: Efficient generative LLM inference \
         using phase splitting\", ISCA 2024.",
        trace_path.display(),
        real.requests.len()
    );
    println!();
    print!("{}", table(&reports));
    println!();
    println!("{}", result_line(&reports[0]));
    Ok(())
}
