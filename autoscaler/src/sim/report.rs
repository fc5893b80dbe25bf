//! Turning runs into the comparison table, Soma's ratios against its peers, and the
//! machine-readable `RESULT autoscaler ...` line.
//!
//! Ratios are Soma over peer. `0/0` is 1 (equally good), `x/0` for `x > 0` is infinite.

use std::fmt::Write as _;

use crate::sim::engine::RunResult;

/// All runs on one trace.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceReport {
    /// Trace name.
    pub trace: String,
    /// Requests in the trace.
    pub requests: usize,
    /// One run per scaler; the one named `soma` is compared with the others.
    pub runs: Vec<RunResult>,
}

/// Soma's figures over a peer's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratios {
    /// Violation minutes, Soma / peer.
    pub violation_minutes: f64,
    /// Replica-hours, Soma / peer.
    pub replica_hours: f64,
}

/// Which of the aims Soma reached against HPA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aim {
    /// ≥ 50 % fewer violation minutes at equal or fewer replica-hours.
    FewerViolations,
    /// ≥ 25 % fewer replica-hours at equal or fewer violation minutes.
    FewerReplicaHours,
    /// Both of the above.
    Both,
    /// Neither.
    None,
}

impl Aim {
    /// Evaluates the aims from Soma-over-HPA ratios.
    pub fn against(r: Ratios) -> Self {
        let fewer_violations = r.violation_minutes <= 0.5 && r.replica_hours <= 1.0;
        let fewer_hours = r.replica_hours <= 0.75 && r.violation_minutes <= 1.0;
        match (fewer_violations, fewer_hours) {
            (true, true) => Self::Both,
            (true, false) => Self::FewerViolations,
            (false, true) => Self::FewerReplicaHours,
            (false, false) => Self::None,
        }
    }

    /// Short label for the RESULT line.
    pub fn label(self) -> &'static str {
        match self {
            Self::FewerViolations => "violations_halved_at_no_more_replica_hours",
            Self::FewerReplicaHours => "replica_hours_cut_25pct_at_no_more_violations",
            Self::Both => "both",
            Self::None => "none",
        }
    }
}

fn ratio(soma: f64, peer: f64) -> f64 {
    if peer == 0.0 {
        if soma == 0.0 { 1.0 } else { f64::INFINITY }
    } else {
        soma / peer
    }
}

impl TraceReport {
    /// The run of the scaler called `name`.
    pub fn run(&self, name: &str) -> Option<&RunResult> {
        self.runs.iter().find(|r| r.scaler == name)
    }

    /// Soma's ratios against the scaler called `peer`.
    pub fn ratios(&self, peer: &str) -> Option<Ratios> {
        let soma = self.run("soma")?;
        let peer = self.run(peer)?;
        Some(Ratios {
            violation_minutes: ratio(
                f64::from(soma.violation_minutes),
                f64::from(peer.violation_minutes),
            ),
            replica_hours: ratio(soma.replica_hours, peer.replica_hours),
        })
    }
}

/// The human-readable comparison table for all traces.
pub fn table(reports: &[TraceReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<34} {:<6} {:>8} {:>9} {:>10} {:>9} {:>7} {:>10} {:>5}",
        "trace",
        "scaler",
        "requests",
        "viol_min",
        "replica_h",
        "reversals",
        "scales",
        "p95_wait_s",
        "peak"
    );
    for rep in reports {
        for r in &rep.runs {
            let _ = writeln!(
                out,
                "{:<34} {:<6} {:>8} {:>5}/{:<3} {:>10.2} {:>9} {:>7} {:>10.2} {:>5}",
                rep.trace,
                r.scaler,
                r.requests,
                r.violation_minutes,
                r.minutes_with_traffic,
                r.replica_hours,
                r.reversals,
                r.scale_events,
                r.p95_wait_s,
                r.peak_pods
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<34} {:>14} {:>14} {:>15} {:>15}  aim vs hpa",
        "soma / peer", "viol_min/hpa", "replica_h/hpa", "viol_min/keda", "replica_h/keda"
    );
    for rep in reports {
        let (Some(h), Some(k)) = (rep.ratios("hpa"), rep.ratios("keda")) else {
            continue;
        };
        let _ = writeln!(
            out,
            "{:<34} {:>14.3} {:>14.3} {:>15.3} {:>15.3}  {}",
            rep.trace,
            h.violation_minutes,
            h.replica_hours,
            k.violation_minutes,
            k.replica_hours,
            Aim::against(h).label()
        );
    }
    out
}

/// The `RESULT autoscaler key=value ...` line for `rep` (the real or given trace).
pub fn result_line(rep: &TraceReport) -> String {
    let mut line = format!("RESULT autoscaler trace={}", rep.trace);
    if let (Some(h), Some(k)) = (rep.ratios("hpa"), rep.ratios("keda")) {
        let _ = write!(
            line,
            " violation_min_ratio_vs_hpa={:.3} replica_hours_ratio_vs_hpa={:.3} \
             violation_min_ratio_vs_keda={:.3} replica_hours_ratio_vs_keda={:.3} aim={}",
            h.violation_minutes,
            h.replica_hours,
            k.violation_minutes,
            k.replica_hours,
            Aim::against(h).label()
        );
    }
    for r in &rep.runs {
        let _ = write!(
            line,
            " {n}_violation_min={} {n}_replica_hours={:.3} {n}_reversals={}",
            r.violation_minutes,
            r.replica_hours,
            r.reversals,
            n = r.scaler
        );
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, viol: u32, hours: f64) -> RunResult {
        RunResult {
            scaler: name.into(),
            requests: 10,
            violation_minutes: viol,
            minutes_with_traffic: 60,
            replica_hours: hours,
            reversals: 0,
            scale_events: 0,
            p95_wait_s: 0.0,
            mean_wait_s: 0.0,
            peak_pods: 1,
            unserved: 0,
            timeline: vec![],
            minute_p95_wait_s: vec![],
        }
    }

    #[test]
    fn ratios_aims_and_result_line() {
        let rep = TraceReport {
            trace: "t".into(),
            requests: 10,
            runs: vec![
                run("soma", 2, 9.0),
                run("hpa", 8, 10.0),
                run("keda", 0, 6.0),
            ],
        };
        let h = rep.ratios("hpa").expect("both present");
        assert_eq!(h.violation_minutes, 0.25);
        assert_eq!(Aim::against(h), Aim::FewerViolations);
        let k = rep.ratios("keda").expect("both present");
        assert!(k.violation_minutes.is_infinite());
        let line = result_line(&rep);
        assert!(line.starts_with("RESULT autoscaler "));
        assert!(line.contains("violation_min_ratio_vs_hpa=0.250"));
        assert!(line.contains("replica_hours_ratio_vs_keda=1.500"));
        assert!(!line.contains('\n'));
        assert_eq!(
            Aim::against(Ratios {
                violation_minutes: 1.0,
                replica_hours: 0.7
            }),
            Aim::FewerReplicaHours
        );
        assert_eq!(
            Aim::against(Ratios {
                violation_minutes: 0.9,
                replica_hours: 0.9
            }),
            Aim::None
        );
    }
}
