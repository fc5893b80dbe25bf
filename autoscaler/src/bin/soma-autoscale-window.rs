//! `soma-autoscale-window`: one window of a trace (or the synthetic ramp), replayed `c` times
//! faster, as the closed-loop benchmark replays it (`bench/autoscaler-closed-loop`): writes
//! the schedule the load generator sends (arrival, tokens, the provider's service time) and
//! prints the simulator's prediction for the same schedule and the same autoscaler settings
//! as one JSON object.
//!
//! ```text
//!  CSV trace ─► window [from, to) ─► compressed ×c ─┬─► --schedule FILE (arrival_s, input_tokens,
//!  (or ramp)                                         │      output_tokens, service_s)
//!                                                    └─► simulate(Soma, settings as the operator
//!                                                         has them; pod start, SLO, interval,
//!                                                         "minute" all ÷ c) ─► JSON on stdout
//! ```
//!
//! Times in the settings (`--soma-config`, `--interval-s`) are what the operator runs with,
//! i.e. already compressed; `--start-delay` and `--slo-wait` are the trace's (uncompressed)
//! and are divided by `c` here. Replica-minutes and violation minutes are reported in the
//! trace's own time (a compressed replica-second counts `c` seconds).

use std::path::PathBuf;

use clap::Parser;
use serde_json::json;
use soma_autoscaler::AutoscalerConfig;
use soma_autoscaler::peers::{SignalView, SomaScaler};
use soma_autoscaler::sim::{RunResult, ServiceModel, SimConfig, Trace, simulate};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(Debug, Parser)]
#[command(
    about = "A compressed window of a trace: the closed loop's schedule and the simulator's prediction"
)]
struct Args {
    /// CSV trace (as `soma-autoscale-sim --trace`); without it, the synthetic ramp.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Window start, minutes of the trace.
    #[arg(long, default_value_t = 0.0)]
    from_min: f64,
    /// Window end, minutes of the trace.
    #[arg(long, default_value_t = 20.0)]
    to_min: f64,
    /// Replay this many times faster than the trace.
    #[arg(long, default_value_t = 5.0)]
    compress: f64,
    /// The ramp (without --trace): arrival rate before and after it, req/s of trace time.
    #[arg(long, default_value_t = 0.3)]
    ramp_base_rps: f64,
    /// The ramp's peak arrival rate, req/s of trace time.
    #[arg(long, default_value_t = 6.0)]
    ramp_peak_rps: f64,
    /// Minutes the ramp rises (and, after the peak, falls).
    #[arg(long, default_value_t = 4.0)]
    ramp_min: f64,
    /// Minutes at the peak.
    #[arg(long, default_value_t = 2.0)]
    ramp_hold_min: f64,
    /// Minutes at the base rate after the ramp (where the scale-down shows).
    #[arg(long, default_value_t = 6.0)]
    ramp_tail_min: f64,
    /// Seed of the ramp's arrivals and token sizes.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Pod start, seconds of trace time (divided by --compress).
    #[arg(long, default_value_t = 30.0)]
    start_delay: f64,
    /// SLO: per-minute P95 wait, seconds of trace time (divided by --compress).
    #[arg(long, default_value_t = 2.0)]
    slo_wait: f64,
    /// The operator's scaling interval, seconds as it runs (compressed).
    #[arg(long, default_value_t = 3.0)]
    interval_s: f64,
    /// The autoscaler's settings as the operator builds them from the Agent's spec.scaling
    /// (JSON over the crate's defaults, camelCase, compressed seconds).
    #[arg(long)]
    soma_config: Option<String>,
    /// Write the schedule here as CSV: arrival_s,input_tokens,output_tokens,service_s.
    #[arg(long)]
    schedule: Option<PathBuf>,
}

fn run_json(r: &RunResult, c: f64, cfg: &SimConfig) -> serde_json::Value {
    json!({
        "replica_min": r.replica_hours * 60.0 * c,
        "violation_min": r.violation_minutes,
        "minutes_with_traffic": r.minutes_with_traffic,
        "reversals": r.reversals,
        "scale_events": r.scale_events,
        "peak_pods": r.peak_pods,
        "p95_wait_s": r.p95_wait_s,
        "unserved": r.unserved,
        "timeline": r.timeline.iter().map(|(t, n)| json!([t, n])).collect::<Vec<_>>(),
        "minute_p95_wait_s": r.minute_p95_wait_s,
        "minute_s": cfg.minute_s,
    })
}

fn main() -> Result<()> {
    let a = Args::parse();
    if !(a.compress.is_finite() && a.compress > 0.0) {
        return Err("--compress must be a positive number".into());
    }
    if a.to_min <= a.from_min {
        return Err("--to-min must be after --from-min".into());
    }
    let c = a.compress;
    let source = match &a.trace {
        Some(path) => Trace::from_csv(path)?.window(a.from_min * 60.0, a.to_min * 60.0),
        None => Trace::ramp(
            a.seed,
            a.ramp_base_rps,
            a.ramp_peak_rps,
            a.ramp_min * 60.0,
            a.ramp_hold_min * 60.0,
            a.ramp_tail_min * 60.0,
        ),
    };
    if source.requests.is_empty() {
        return Err(format!("no request in {}", source.name).into());
    }
    let trace = source.compressed(c);
    let sim = SimConfig {
        start_delay_s: a.start_delay / c,
        service: ServiceModel::default().compressed(c),
        slo_wait_s: a.slo_wait / c,
        minute_s: 60.0 / c,
        ..SimConfig::default()
    };
    let soma: AutoscalerConfig = match &a.soma_config {
        Some(j) => serde_json::from_str(j)?,
        None => AutoscalerConfig::default(),
    };
    soma.validate()?;

    if let Some(path) = &a.schedule {
        let mut csv = String::from("arrival_s,input_tokens,output_tokens,service_s\n");
        for r in &trace.requests {
            csv.push_str(&format!(
                "{:.6},{},{},{:.6}\n",
                r.arrival_s,
                r.input_tokens,
                r.output_tokens,
                sim.service.service_time(r)
            ));
        }
        std::fs::write(path, csv)?;
    }

    let mut runs = serde_json::Map::new();
    for (name, view) in [
        ("queue", SignalView::Queue),
        ("sidecar", SignalView::Sidecar),
        ("reported", SignalView::Reported),
    ] {
        let mut scaler = SomaScaler::new(soma, a.interval_s, sim.initial_replicas)?.with_view(view);
        runs.insert(
            name.to_owned(),
            run_json(&simulate(&trace, &mut scaler, &sim), c, &sim),
        );
    }
    let service: Vec<f64> = trace
        .requests
        .iter()
        .map(|r| sim.service.service_time(r))
        .collect();
    let mean_service = service.iter().sum::<f64>() / service.len() as f64;
    println!(
        "{}",
        json!({
            "trace": source.name,
            "requests": trace.requests.len(),
            "compress": c,
            "duration_s": trace.duration_s(),
            "mean_service_s": mean_service,
            "offered_erlangs": service.iter().sum::<f64>() / trace.duration_s().max(1e-9),
            "sim": {"start_delay_s": sim.start_delay_s, "slo_wait_s": sim.slo_wait_s,
                    "minute_s": sim.minute_s, "interval_s": a.interval_s},
            "soma": serde_json::to_value(soma)?,
            "runs": runs,
        })
    );
    Ok(())
}
