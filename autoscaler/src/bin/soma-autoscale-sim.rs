//! `soma-autoscale-sim`: replays request traces against Soma's autoscaler, an HPA emulation
//! and a KEDA emulation; prints the comparison at each scaler's default setting and the
//! cost–SLO frontiers of each scaler swept over its main knob.
//!
//! The last line of output is `RESULT autoscaler ...`: the default-setting comparison on the
//! first trace, and where Soma's default sits against HPA's frontier on every real trace.

use std::path::{Path, PathBuf};

use anyhow_free::Result;
use clap::Parser;
use soma_autoscaler::sim::frontier::Point;
use soma_autoscaler::sim::report::{
    FrontierReport, TraceReport, frontier_keys, frontier_summary, frontier_table, result_line,
    table,
};
use soma_autoscaler::sim::{Comparison, SimConfig, Sweep, Trace};

/// `anyhow` is not worth a dependency for one `main`: a boxed error does the same here.
mod anyhow_free {
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;
}

/// The shipped real traces, relative to the repository root (`shared/` sits beside the
/// repo), with their labels in the RESULT line.
const SHIPPED: [(&str, &str); 2] = [
    ("code", "../shared/data/azure-llm-inference-2023-code.csv"),
    ("conv", "../shared/data/azure-llm-inference-2023-conv.csv"),
];

#[derive(Debug, Parser)]
#[command(about = "Compare Soma's autoscaler with HPA and KEDA emulations on request traces")]
struct Args {
    /// CSV trace (a timestamp, prompt tokens and generated tokens, found by header name —
    /// Azure's and BurstGPT's layouts work — or else the first three columns), as `FILE` or
    /// `LABEL=FILE`; repeatable. Default: both Azure LLM inference 2023 traces (code, conv) at
    /// ../shared/data/ relative to the repository root.
    #[arg(long)]
    trace: Vec<String>,
    /// Replay only the requests of each `--trace` from this minute of it (a window of a
    /// long trace, e.g. one hour of a week-long one: `--from-min 600 --to-min 660`).
    #[arg(long, value_name = "MINUTE")]
    from_min: Option<f64>,
    /// ... up to this minute (exclusive); the window is re-based to start at minute 0.
    #[arg(long, value_name = "MINUTE")]
    to_min: Option<f64>,
    /// Seed for the synthetic traces and the robustness variants.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Skip the synthetic traces.
    #[arg(long)]
    no_synthetic: bool,
    /// Skip the frontier sweeps (defaults only).
    #[arg(long)]
    no_frontier: bool,
    /// Skip the robustness variants of the real traces (fast, heavy, bursty).
    #[arg(long)]
    no_variants: bool,
    /// Seconds from pod creation to Ready.
    #[arg(long, default_value_t = 30.0)]
    start_delay: f64,
    /// SLO: per-minute P95 wait target, seconds (also Soma's default wait target).
    #[arg(long, default_value_t = 2.0)]
    slo_wait: f64,
    /// Most replicas any autoscaler may use.
    #[arg(long, default_value_t = 64)]
    max_replicas: u32,
    /// The cap of the "uncapped" sweeps: high enough that no run reaches it (checked).
    #[arg(long, default_value_t = 10_000)]
    uncapped_replicas: u32,
    /// Soma settings as JSON over the defaults, e.g. '{"reversalHoldS": 60}' (for
    /// exploring; the benchmark uses the defaults).
    #[arg(long)]
    soma_config: Option<String>,
    /// Write every swept point as CSV
    /// (trace,cap,scaler,setting,default,replica_hours,violation_minutes,peak_pods) here.
    #[arg(long)]
    frontier_csv: Option<PathBuf>,
    /// Write each default run's replica timeline as CSV (trace,scaler,time_s,replicas) here.
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// Write each default run's per-minute P95 wait as CSV (trace,scaler,minute,p95_wait_s).
    #[arg(long)]
    minutes: Option<PathBuf>,
}

fn repo_relative(path: &str) -> PathBuf {
    let from_cwd = PathBuf::from(path);
    if from_cwd.exists() {
        return from_cwd;
    }
    // Also work when run from elsewhere: the crate sits one level below the repo root.
    Path::new(
        &std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()),
    )
    .join("..")
    .join(path)
}

/// `(label, path)` of each real trace.
fn real_traces(args: &[String]) -> Vec<(String, PathBuf)> {
    if args.is_empty() {
        return SHIPPED
            .iter()
            .map(|(label, path)| ((*label).to_owned(), repo_relative(path)))
            .collect();
    }
    args.iter()
        .map(|a| match a.split_once('=') {
            Some((label, path)) if !label.contains('/') => (label.to_owned(), PathBuf::from(path)),
            _ => {
                let path = PathBuf::from(a);
                let stem = path
                    .file_stem()
                    .map_or_else(|| a.clone(), |s| s.to_string_lossy().into_owned());
                let label = stem
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect();
                (label, path)
            }
        })
        .collect()
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

fn sweep_both_caps(
    cmp: &Comparison,
    uncapped_replicas: u32,
    trace: &Trace,
    label: &str,
    sweep: &Sweep,
) -> Result<[FrontierReport; 2]> {
    let mut out = Vec::with_capacity(2);
    for (max_replicas, uncapped) in [(cmp.max_replicas, false), (uncapped_replicas, true)] {
        let c = Comparison {
            max_replicas,
            ..*cmp
        };
        let rep = FrontierReport {
            trace: trace.name.clone(),
            label: label.to_owned(),
            max_replicas,
            uncapped,
            points: c.sweep(trace, sweep)?,
        };
        if uncapped && rep.cap_reached() {
            return Err(format!(
                "{}: a run reached the 'uncapped' cap of {max_replicas}; raise --uncapped-replicas",
                trace.name
            )
            .into());
        }
        out.push(rep);
    }
    let [a, b]: [FrontierReport; 2] = out.try_into().map_err(|_| "two caps")?;
    Ok([a, b])
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
    let window = match (args.from_min, args.to_min) {
        (None, None) => None,
        (from, to) => {
            let (from, to) = (from.unwrap_or(0.0), to.unwrap_or(f64::INFINITY));
            if !(from >= 0.0 && to > from) {
                return Err(format!(
                    "--from-min {from} --to-min {to}: the window needs 0 <= from < to"
                )
                .into());
            }
            Some((from * 60.0, to * 60.0))
        }
    };
    let mut real = Vec::new();
    for (label, path) in real_traces(&args.trace) {
        let mut trace = Trace::from_csv(&path)?;
        if let Some((from_s, to_s)) = window {
            trace = trace.window(from_s, to_s);
            if trace.requests.is_empty() {
                return Err(format!(
                    "{}: no request in the window {}",
                    path.display(),
                    trace.name
                )
                .into());
            }
        }
        real.push((label, path.clone(), trace));
    }
    let mut synthetic = Vec::new();
    if !args.no_synthetic {
        for kind in Trace::SYNTHETIC {
            if let Some(t) = Trace::synthetic(kind, args.seed) {
                synthetic.push(t);
            }
        }
    }

    let mut reports: Vec<TraceReport> = Vec::new();
    for (_, _, t) in &real {
        reports.push(cmp.run(t)?);
    }
    for t in &synthetic {
        reports.push(cmp.run(t)?);
    }

    let sweep = Sweep::default();
    let mut real_fronts: Vec<FrontierReport> = Vec::new();
    let mut robust_fronts: Vec<FrontierReport> = Vec::new();
    if !args.no_frontier {
        for (label, _, t) in &real {
            real_fronts.extend(sweep_both_caps(
                &cmp,
                args.uncapped_replicas,
                t,
                label,
                &sweep,
            )?);
            if !args.no_variants {
                for kind in Trace::VARIANTS {
                    if let Some(v) = t.variant(kind, args.seed) {
                        let l = format!("{label}_{kind}");
                        robust_fronts.extend(sweep_both_caps(
                            &cmp,
                            args.uncapped_replicas,
                            &v,
                            &l,
                            &sweep,
                        )?);
                    }
                }
            }
        }
        for t in &synthetic {
            let l = t.name.replace('-', "_");
            robust_fronts.extend(sweep_both_caps(
                &cmp,
                args.uncapped_replicas,
                t,
                &l,
                &sweep,
            )?);
        }
    }

    if let Some(path) = &args.frontier_csv {
        let mut csv = String::from(
            "trace,cap,scaler,setting,default,replica_hours,violation_minutes,peak_pods\n",
        );
        for rep in real_fronts.iter().chain(&robust_fronts) {
            for Point {
                scaler,
                setting,
                default,
                replica_hours,
                violation_minutes,
                peak_pods,
            } in &rep.points
            {
                csv.push_str(&format!(
                    "{},{},{scaler},\"{setting}\",{default},{replica_hours:.4},{violation_minutes},{peak_pods}\n",
                    rep.trace,
                    rep.cap_label()
                ));
            }
        }
        std::fs::write(path, csv)?;
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
         pod start {}s; SLO per-minute P95 wait <= {}s; max {} replicas (uncapped sweeps: {}); seed {}",
        cmp.sim.service.slots,
        cmp.sim.service.throughput.overhead_s,
        cmp.sim.service.throughput.prefill_tps,
        cmp.sim.service.throughput.decode_tps,
        cmp.sim.start_delay_s,
        cmp.sim.slo_wait_s,
        cmp.max_replicas,
        args.uncapped_replicas,
        args.seed
    );
    println!(
        "soma: rho_max {} wait-target {}s wait-headroom {} floor-hold {}s alpha {:.6} beta {:.6} \
         tau {}s step {}s idle-to-zero {:?}s reversal-hold {}s",
        soma.rho_max,
        soma.wait_target_s,
        soma.wait_headroom,
        soma.floor_hold_s,
        soma.conductance.alpha,
        soma.conductance.beta,
        soma.conductance.tau_s,
        cmp.soma_interval_s,
        soma.idle_to_zero_s,
        soma.reversal_hold_s
    );
    for (label, path, t) in &real {
        let stem = path
            .file_name()
            .map(|s| s.to_string_lossy())
            .unwrap_or_default();
        let credit = if stem.starts_with("azure-llm-inference-2023") {
            " Azure LLM inference trace 2023, Azure Public Dataset, CC-BY 4.0; Patel et al., \
             \"Splitwise: Efficient generative LLM inference using phase splitting\", ISCA 2024."
        } else {
            ""
        };
        println!(
            "real trace {label}: {} ({} requests over {:.1} min).{credit}",
            path.display(),
            t.requests.len(),
            t.duration_s() / 60.0
        );
    }
    println!();
    println!("== default settings, max {} replicas ==", cmp.max_replicas);
    print!("{}", table(&reports));
    if !args.no_frontier {
        println!();
        println!(
            "== cost-SLO frontiers: hpa/keda target {:?}, soma rhoMax {:?} x waitTargetS {:?} ==",
            sweep.peer_targets, sweep.soma_rho_max, sweep.soma_wait_target_s
        );
        for rep in &real_fronts {
            println!();
            print!("{}", frontier_table(rep));
        }
        println!();
        println!(
            "== Soma's default against the frontiers (viol/rh: the frontier's violation minutes at Soma's replica-hours, and its replica-hours at Soma's violation minutes) =="
        );
        print!("{}", frontier_summary(&real_fronts));
        if !robust_fronts.is_empty() {
            println!();
            println!("robustness checks (variants of the real traces, synthetic traces):");
            print!("{}", frontier_summary(&robust_fronts));
        }
    }
    println!();
    let mut line = result_line(&reports[0]);
    line.push_str(&frontier_keys(&real_fronts));
    if !robust_fronts.is_empty() {
        let held = robust_fronts
            .iter()
            .filter(|r| {
                r.soma_default_against("hpa")
                    .is_some_and(|p| p.position.holds())
            })
            .count();
        line.push_str(&format!(
            " robust_on_or_below_hpa={held}/{}",
            robust_fronts.len()
        ));
    }
    println!("{line}");
    Ok(())
}
