//! Turning runs into the comparison table, Soma's ratios against its peers, and the
//! machine-readable `RESULT autoscaler ...` line.
//!
//! Ratios are Soma over peer. `0/0` is 1 (equally good), `x/0` for `x > 0` is infinite.

use std::fmt::Write as _;

use crate::sim::engine::RunResult;
use crate::sim::frontier::{Frontier, Placement, Point};

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

/// One trace's sweep at one replica cap.
#[derive(Debug, Clone, PartialEq)]
pub struct FrontierReport {
    /// Trace name.
    pub trace: String,
    /// Short label for the RESULT line (`code`, `conv`, ...).
    pub label: String,
    /// The replica cap every scaler had.
    pub max_replicas: u32,
    /// Whether the cap is meant not to bind (then no run may reach it).
    pub uncapped: bool,
    /// Every scaler at every setting.
    pub points: Vec<Point>,
}

impl FrontierReport {
    /// The default setting's point of `scaler`.
    pub fn default_point(&self, scaler: &str) -> Option<&Point> {
        self.points.iter().find(|p| p.scaler == scaler && p.default)
    }

    /// Where `point` sits against `peer`'s frontier.
    pub fn place(&self, point: &Point, peer: &str) -> Option<Placement> {
        let f = Frontier::of(&self.points, peer)?;
        Some(f.place(point.replica_hours, f64::from(point.violation_minutes)))
    }

    /// Where Soma's default sits against `peer`'s frontier.
    pub fn soma_default_against(&self, peer: &str) -> Option<Placement> {
        self.place(self.default_point("soma")?, peer)
    }

    /// `64` or `uncapped`, for tables and keys.
    pub fn cap_label(&self) -> String {
        if self.uncapped {
            "uncapped".to_owned()
        } else {
            self.max_replicas.to_string()
        }
    }

    /// Whether any run reached the cap.
    pub fn cap_reached(&self) -> bool {
        self.points.iter().any(|p| p.peak_pods >= self.max_replicas)
    }
}

fn fmt_opt(x: Option<f64>, prec: usize) -> String {
    x.map_or_else(|| "-".to_owned(), |v| format!("{v:.prec$}"))
}

/// Every setting's point on one trace and cap, with each Soma setting placed against the
/// HPA and KEDA frontiers.
pub fn frontier_table(rep: &FrontierReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "frontier: {} (max replicas {}{})",
        rep.trace,
        rep.cap_label(),
        if rep.uncapped {
            format!(", i.e. {}", rep.max_replicas)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "  {:<6} {:<30} {:>9} {:>8} {:>5}  {:<6} {:<6}",
        "scaler", "setting", "replica_h", "viol_min", "peak", "vs_hpa", "vs_keda"
    );
    for p in &rep.points {
        let (vh, vk) = if p.scaler == "soma" {
            (
                rep.place(p, "hpa").map_or("-", |x| x.position.label()),
                rep.place(p, "keda").map_or("-", |x| x.position.label()),
            )
        } else {
            ("", "")
        };
        let _ = writeln!(
            out,
            "  {:<6} {:<30} {:>9.2} {:>8} {:>5}  {:<6} {:<6}",
            p.scaler,
            format!("{}{}", p.setting, if p.default { " (default)" } else { "" }),
            p.replica_hours,
            p.violation_minutes,
            p.peak_pods,
            vh,
            vk
        );
    }
    out
}

/// One line per trace and cap: Soma's default point and the HPA and KEDA frontiers at its
/// replica-hours and at its violation minutes.
pub fn frontier_summary(reports: &[FrontierReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<40} {:>8} {:>9} {:>5} | {:>8} {:>9} {:<6} | {:>8} {:>9} {:<6} {:>4}",
        "soma default vs frontiers: trace",
        "cap",
        "replica_h",
        "viol",
        "hpa_viol",
        "hpa_rh",
        "hpa",
        "keda_viol",
        "keda_rh",
        "keda",
        "cap?"
    );
    for rep in reports {
        let Some(soma) = rep.default_point("soma") else {
            continue;
        };
        let (h, k) = (rep.place(soma, "hpa"), rep.place(soma, "keda"));
        let _ = writeln!(
            out,
            "{:<40} {:>8} {:>9.2} {:>5} | {:>8} {:>9} {:<6} | {:>8} {:>9} {:<6} {:>4}",
            rep.trace,
            rep.cap_label(),
            soma.replica_hours,
            soma.violation_minutes,
            fmt_opt(h.and_then(|p| p.frontier_violations), 2),
            fmt_opt(h.and_then(|p| p.frontier_replica_hours), 2),
            h.map_or("-", |p| p.position.label()),
            fmt_opt(k.and_then(|p| p.frontier_violations), 2),
            fmt_opt(k.and_then(|p| p.frontier_replica_hours), 2),
            k.map_or("-", |p| p.position.label()),
            if rep.cap_reached() { "hit" } else { "no" }
        );
    }
    out
}

/// `frontier_<label>[_uncapped]=on|below|above` for each report: where Soma's default sits
/// against HPA's frontier; then `frontier_rh_ratio_<label>[_uncapped]=`: Soma's replica-hours
/// over what HPA's frontier needs for Soma's violation minutes (`none` when no HPA setting
/// gets that low).
pub fn frontier_keys(reports: &[FrontierReport]) -> String {
    let mut out = String::new();
    for rep in reports {
        if let Some(p) = rep.soma_default_against("hpa") {
            let suffix = if rep.uncapped { "_uncapped" } else { "" };
            let _ = write!(
                out,
                " frontier_{}{suffix}={}",
                rep.label,
                p.position.label()
            );
        }
    }
    for rep in reports {
        let (Some(soma), Some(p)) = (rep.default_point("soma"), rep.soma_default_against("hpa"))
        else {
            continue;
        };
        let suffix = if rep.uncapped { "_uncapped" } else { "" };
        let ratio = p.frontier_replica_hours.map_or_else(
            || "none".to_owned(),
            |x| format!("{:.3}", soma.replica_hours / x),
        );
        let _ = write!(out, " frontier_rh_ratio_{}{suffix}={ratio}", rep.label);
    }
    out
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

    fn point(scaler: &str, setting: &str, default: bool, hours: f64, viol: u32) -> Point {
        Point {
            scaler: scaler.into(),
            setting: setting.into(),
            default,
            replica_hours: hours,
            violation_minutes: viol,
            peak_pods: 10,
        }
    }

    #[test]
    fn frontier_keys_place_somas_default_against_hpa() {
        let points = vec![
            point("hpa", "target=0.5", false, 30.0, 2),
            point("hpa", "target=0.7", true, 20.0, 6),
            point("keda", "target=0.7", true, 18.0, 4),
            point("soma", "rhoMax=0.7", true, 25.0, 3),
            point("soma", "rhoMax=0.9", false, 15.0, 9),
        ];
        let capped = FrontierReport {
            trace: "t".into(),
            label: "code".into(),
            max_replicas: 64,
            uncapped: false,
            points: points.clone(),
        };
        // HPA's frontier at 25 replica-hours: 4 violation minutes; Soma has 3.
        let p = capped.soma_default_against("hpa").expect("placed");
        assert_eq!(p.frontier_violations, Some(4.0));
        assert_eq!(p.frontier_replica_hours, Some(27.5));
        let mut uncapped = capped.clone();
        uncapped.uncapped = true;
        uncapped.max_replicas = 1000;
        uncapped.points[3].violation_minutes = 5;
        assert_eq!(
            frontier_keys(&[capped.clone(), uncapped]),
            " frontier_code=below frontier_code_uncapped=above \
             frontier_rh_ratio_code=0.909 frontier_rh_ratio_code_uncapped=1.111"
        );
        let table = frontier_table(&capped);
        assert!(table.contains("rhoMax=0.7 (default)"), "{table}");
        assert!(frontier_summary(&[capped]).contains("below"));
    }
}
