//! Cost–SLO frontiers: each autoscaler swept over its main knob, and where one setting sits
//! against another scaler's frontier.
//!
//! A run is a point `(replica-hours, violation minutes)`. Sweeping a scaler's knob gives a
//! cloud of points; its **frontier** is the lower-left staircase of that cloud, joined by
//! straight lines:
//!
//! ```text
//!  violation   ●                     ● swept settings of one scaler
//!  minutes      ╲                    ─ frontier: the points no other setting beats on both
//!                ●───●                 axes, sorted by cost and joined by straight lines;
//!                     ╲   ●            flat to the right of the dearest one, undefined to
//!                      ●──────────     the left of the cheapest one
//!              ───────────────────►  replica-hours
//! ```
//!
//! A point `(x, v)` is **below** the frontier `f` when `v < f(x)`, **on** it when
//! `v = f(x)` (within [`ON_TOLERANCE`] of a minute), and **above** it when `v > f(x)`. A
//! point cheaper than every point of the frontier cannot be matched at its cost by that
//! scaler: it is below when it has no more violations than the cheapest frontier point
//! (it dominates it), and above otherwise (it buys its saving with violations, and the
//! frontier says nothing about that trade).
//!
//! "On or below" is therefore exactly "not beaten": no setting of the other scaler, nor any
//! straight-line mix of two neighbouring settings, has both fewer violation minutes and no
//! more replica-hours.

use std::fmt;

/// Violation minutes within which a point counts as on the frontier (interpolation of
/// integer minutes is exact to far better than this).
pub const ON_TOLERANCE: f64 = 1e-6;

/// One run of one scaler at one setting.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// `soma`, `hpa` or `keda`.
    pub scaler: String,
    /// The setting, e.g. `target=0.7` or `rhoMax=0.7 waitTargetS=2`.
    pub setting: String,
    /// Whether this is the scaler's default setting.
    pub default: bool,
    /// Pod-hours paid for.
    pub replica_hours: f64,
    /// Minutes with traffic whose P95 wait exceeded the SLO.
    pub violation_minutes: u32,
    /// Most pods alive at once (shows whether the replica cap bound).
    pub peak_pods: u32,
}

/// Where a point sits against a frontier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// Fewer violation minutes than the frontier at the same replica-hours.
    Below,
    /// Exactly on the frontier.
    On,
    /// More violation minutes than the frontier at the same replica-hours.
    Above,
}

impl Position {
    /// `below`, `on` or `above`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Below => "below",
            Self::On => "on",
            Self::Above => "above",
        }
    }

    /// On or below: not beaten by the frontier.
    pub fn holds(self) -> bool {
        self != Self::Above
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The lower-left staircase of a set of `(replica-hours, violation minutes)` points.
#[derive(Debug, Clone, PartialEq)]
pub struct Frontier {
    /// Pareto-efficient points, by increasing replica-hours and strictly decreasing
    /// violation minutes.
    corners: Vec<(f64, f64)>,
}

/// Where a point sits, and by how much.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    /// Below, on or above.
    pub position: Position,
    /// The frontier's violation minutes at the point's replica-hours (`None` left of the
    /// frontier's cheapest point).
    pub frontier_violations: Option<f64>,
    /// The frontier's replica-hours at the point's violation minutes (`None` when the
    /// frontier never gets that low).
    pub frontier_replica_hours: Option<f64>,
}

impl Frontier {
    /// The frontier of `points` (`(replica-hours, violation minutes)`); `None` when empty.
    pub fn new(points: impl IntoIterator<Item = (f64, f64)>) -> Option<Self> {
        let mut pts: Vec<(f64, f64)> = points
            .into_iter()
            .filter(|(x, v)| x.is_finite() && v.is_finite())
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
        let mut corners: Vec<(f64, f64)> = Vec::new();
        for (x, v) in pts {
            if corners.last().is_none_or(|&(_, best)| v < best) {
                corners.push((x, v));
            }
        }
        (!corners.is_empty()).then_some(Self { corners })
    }

    /// The frontier of the named scaler's points.
    pub fn of(points: &[Point], scaler: &str) -> Option<Self> {
        Self::new(
            points
                .iter()
                .filter(|p| p.scaler == scaler)
                .map(|p| (p.replica_hours, f64::from(p.violation_minutes))),
        )
    }

    /// Its Pareto-efficient points, cheapest first.
    pub fn corners(&self) -> &[(f64, f64)] {
        &self.corners
    }

    /// Violation minutes on the frontier at `x` replica-hours: linear between corners, flat
    /// past the dearest, `None` before the cheapest.
    pub fn violations_at(&self, x: f64) -> Option<f64> {
        let &(x0, v0) = self.corners.first()?;
        if x < x0 {
            return None;
        }
        for w in self.corners.windows(2) {
            let ((xa, va), (xb, vb)) = (w[0], w[1]);
            if x <= xb {
                return Some(if xb > xa {
                    va + (vb - va) * (x - xa) / (xb - xa)
                } else {
                    vb
                });
            }
        }
        Some(self.corners.last().map_or(v0, |c| c.1))
    }

    /// Replica-hours the frontier needs to get down to `v` violation minutes (the inverse of
    /// [`Self::violations_at`]); `None` when it never does.
    pub fn replica_hours_at(&self, v: f64) -> Option<f64> {
        let &(x0, v0) = self.corners.first()?;
        if v >= v0 {
            return Some(x0);
        }
        for w in self.corners.windows(2) {
            let ((xa, va), (xb, vb)) = (w[0], w[1]);
            if v >= vb {
                return Some(xa + (xb - xa) * (va - v) / (va - vb));
            }
        }
        None
    }

    /// Where `(x, v)` sits against this frontier (see the module docs).
    pub fn place(&self, x: f64, v: f64) -> Placement {
        let frontier_violations = self.violations_at(x);
        let position = match frontier_violations {
            Some(f) if v < f - ON_TOLERANCE => Position::Below,
            Some(f) if v <= f + ON_TOLERANCE => Position::On,
            Some(_) => Position::Above,
            None => {
                let cheapest = self.corners.first().map_or(f64::INFINITY, |c| c.1);
                if v <= cheapest + ON_TOLERANCE {
                    Position::Below
                } else {
                    Position::Above
                }
            }
        };
        Placement {
            position,
            frontier_violations,
            frontier_replica_hours: self.replica_hours_at(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frontier() -> Frontier {
        // (10, 8) (12, 4) (20, 2) are efficient; (15, 5) and (25, 2) are beaten.
        Frontier::new([
            (12.0, 4.0),
            (10.0, 8.0),
            (15.0, 5.0),
            (20.0, 2.0),
            (25.0, 2.0),
        ])
        .expect("non-empty")
    }

    #[test]
    fn keeps_only_the_efficient_points() {
        assert_eq!(
            frontier().corners(),
            &[(10.0, 8.0), (12.0, 4.0), (20.0, 2.0)]
        );
        assert!(Frontier::new([]).is_none());
    }

    #[test]
    fn interpolates_linearly_flat_to_the_right_undefined_to_the_left() {
        let f = frontier();
        assert_eq!(f.violations_at(11.0), Some(6.0));
        assert_eq!(f.violations_at(16.0), Some(3.0));
        assert_eq!(f.violations_at(20.0), Some(2.0));
        assert_eq!(f.violations_at(99.0), Some(2.0));
        assert_eq!(f.violations_at(9.0), None);
        assert_eq!(f.replica_hours_at(6.0), Some(11.0));
        assert_eq!(f.replica_hours_at(3.0), Some(16.0));
        assert_eq!(f.replica_hours_at(9.0), Some(10.0));
        assert_eq!(f.replica_hours_at(1.0), None);
    }

    #[test]
    fn table_of_placements() {
        let f = frontier();
        let cases = [
            // (x, v, expected)
            (16.0, 2.0, Position::Below), // f(16) = 3
            (16.0, 3.0, Position::On),
            (16.0, 4.0, Position::Above),
            (12.0, 4.0, Position::On), // a corner itself
            (30.0, 1.0, Position::Below),
            (30.0, 2.0, Position::On), // flat part: no cheaper way to 2
            (30.0, 3.0, Position::Above),
            (8.0, 8.0, Position::Below), // cheaper than all, no worse than the cheapest
            (8.0, 9.0, Position::Above), // cheaper than all, but worse: not comparable → above
        ];
        for (x, v, want) in cases {
            assert_eq!(f.place(x, v).position, want, "({x}, {v})");
        }
    }

    #[test]
    fn a_point_of_the_frontier_is_never_above_it() {
        // Property over a deterministic cloud: every input point is on or above its own
        // frontier, and every corner is on it.
        let mut s: u64 = 99;
        let mut pts = vec![];
        for _ in 0..200 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            let x = 10.0 + (s >> 40) as f64 / (1u64 << 24) as f64 * 30.0;
            let v = ((s >> 20) % 20) as f64;
            pts.push((x, v));
        }
        let f = Frontier::new(pts.clone()).expect("non-empty");
        for &(x, v) in f.corners() {
            assert_eq!(f.place(x, v).position, Position::On);
        }
        for (x, v) in pts {
            assert_ne!(f.place(x, v).position, Position::Below, "({x}, {v})");
        }
    }
}
