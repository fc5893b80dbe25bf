//! The load a sidecar reports to the operator's autoscaler, and the brown-out the operator
//! asks of the sidecars: the two halves of the scaling loop that cross the pod boundary.
//!
//! ```text
//!  sidecar GET /load ─► LoadReport (cumulative since the sidecar started, plus a sliding P95)
//!  operator: report_now.since(report_before) per pod ─► merge ─► LoadSignal ─► Autoscaler::step
//!  operator ─► BrownOut (the live part of the sidecar's configuration, and the ledger) ─► sidecars
//! ```
//!
//! Counters are cumulative, so a missed or repeated poll loses nothing and a second reader
//! (a person with `curl`) takes nothing away from the operator; a restarted sidecar is
//! recognised by its `startedAtMs` and counted from zero.

use serde::{Deserialize, Serialize};
pub use soma_autoscaler::{BrownOutAction, LoadSignal};

/// The admin-port path a sidecar serves its [`LoadReport`] on.
pub const LOAD_PATH: &str = "/load";

/// The path on the sidecar's agent-facing port where the agent reports the work queued in
/// front of it (`PUT`, a [`QueueReport`], the pod's client token as for every call).
pub const QUEUE_PATH: &str = "/v1/queue";

/// What the agent reports of its own queue: the requests (or tasks, each making one model
/// call) it has accepted and not yet started. The sidecar sees only the calls an agent makes,
/// not the work waiting in front of the agent; without this report the autoscaler learns of a
/// backlog only as the throughput of the replicas already running. Each replica reports its
/// own queue (for one queue shared by several replicas, each reports its share, so that the
/// shares add up to the queue); a report counts for `queueReportTtlMs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueueReport {
    /// Requests accepted by the agent and not yet started.
    pub waiting: u64,
}

/// What a sidecar has seen since it started (`GET /load` on its admin port).
///
/// Arrivals are the requests the sidecar set out to forward (a reservation was taken) plus
/// those it refused because `maxInFlight` were already being served, a brown-out shed them or
/// a Budget's rate cap (`requestsPerMinute`, `tokensPerMinute`) turned them away: the demand on
/// this replica. Completions are forwarded requests that were settled; their service time runs
/// from arrival to settlement (the sidecar does not queue, so it is also the end-to-end time).
/// `waiting` is the agent's own queue, as it last reported it ([`QUEUE_PATH`]). Requests
/// refused before forwarding (bad input, a Budget) are neither arrivals nor completions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadReport {
    /// When this sidecar process started (Unix ms): a different value means a new process.
    pub started_at_ms: i64,
    /// When the report was made (Unix ms).
    pub at_ms: i64,
    /// Arrivals since start.
    pub requests: u64,
    /// Completions since start.
    pub completed: u64,
    /// Sum of the completions' service times, seconds.
    pub latency_sum_s: f64,
    /// Sum of their squares, seconds².
    pub latency_sq_sum_s2: f64,
    /// Prompt tokens of the completions.
    pub input_tokens: u64,
    /// Generated tokens of the completions.
    pub output_tokens: u64,
    /// Requests being served now.
    pub in_flight: u64,
    /// Requests waiting in front of the agent now, as the agent last reported them
    /// ([`QueueReport`]); 0 when it has not reported within `queueReportTtlMs`. The sidecar
    /// itself never queues (beyond `maxInFlight` it refuses).
    #[serde(default)]
    pub waiting: u64,
    /// The window the P95 covers, seconds.
    pub p95_window_s: f64,
    /// P95 of the service times completed in the last `p95WindowS` (the upper bound of the
    /// sketch bucket holding it), when any completed.
    pub latency_p95_s: Option<f64>,
    /// Requests shed by brown-out since start.
    pub shed: u64,
    /// Requests downgraded by brown-out since start.
    pub downgraded: u64,
}

impl LoadReport {
    /// The traffic between `before` and this report, as the autoscaler reads it. A report
    /// from another process (a restart) or from the future counts from zero.
    pub fn since(&self, before: Option<&LoadReport>) -> LoadSignal {
        let base = before
            .filter(|b| b.started_at_ms == self.started_at_ms && b.at_ms <= self.at_ms)
            .cloned()
            .unwrap_or(LoadReport {
                started_at_ms: self.started_at_ms,
                at_ms: self.started_at_ms,
                ..LoadReport::default()
            });
        let window_s = ((self.at_ms - base.at_ms).max(0) as f64) / 1000.0;
        LoadSignal {
            window_s,
            requests: self.requests.saturating_sub(base.requests),
            in_flight: self.in_flight,
            waiting: self.waiting,
            completed: self.completed.saturating_sub(base.completed),
            latency_sum_s: (self.latency_sum_s - base.latency_sum_s).max(0.0),
            latency_sq_sum_s2: (self.latency_sq_sum_s2 - base.latency_sq_sum_s2).max(0.0),
            latency_p95_s: self.latency_p95_s,
            input_tokens: self.input_tokens.saturating_sub(base.input_tokens),
            output_tokens: self.output_tokens.saturating_sub(base.output_tokens),
        }
    }
}

/// The load of a whole Agent from its replicas' signals: counts and sums add up, the window
/// is the longest, and the P95 is the largest replica P95 (an upper bound of the merged one).
pub fn merge(signals: &[LoadSignal]) -> LoadSignal {
    signals
        .iter()
        .fold(LoadSignal::default(), |a, s| LoadSignal {
            window_s: a.window_s.max(s.window_s),
            requests: a.requests + s.requests,
            in_flight: a.in_flight + s.in_flight,
            waiting: a.waiting + s.waiting,
            completed: a.completed + s.completed,
            latency_sum_s: a.latency_sum_s + s.latency_sum_s,
            latency_sq_sum_s2: a.latency_sq_sum_s2 + s.latency_sq_sum_s2,
            latency_p95_s: match (a.latency_p95_s, s.latency_p95_s) {
                (Some(x), Some(y)) => Some(x.max(y)),
                (x, y) => x.or(y),
            },
            input_tokens: a.input_tokens + s.input_tokens,
            output_tokens: a.output_tokens + s.output_tokens,
        })
}

/// The request header a client sets to say how much a request matters under brown-out:
/// `low`, `normal` (the default) or `high`. Brown-out takes the lowest first; `high` is
/// never shed or downgraded.
pub const PRIORITY_HEADER: &str = "x-soma-priority";

/// A request's priority under brown-out ([`PRIORITY_HEADER`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Priority {
    /// Taken first.
    Low,
    /// Taken once all `low` traffic is.
    #[default]
    Normal,
    /// Never taken.
    High,
}

impl Priority {
    /// All priorities, lowest first (the index of each in per-priority arrays).
    pub const ALL: [Priority; 3] = [Priority::Low, Priority::Normal, Priority::High];

    /// The header's value: `low`, `normal` or `high` (any case); `None` for anything else,
    /// which the sidecar refuses with 400 rather than guess.
    pub fn parse(value: &[u8]) -> Option<Priority> {
        Priority::ALL
            .into_iter()
            .find(|p| value.eq_ignore_ascii_case(p.as_str().as_bytes()))
    }

    /// The header's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    /// Index in [`Priority::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A brown-out the operator asks the sidecars of an Agent to enforce: the share of arriving
/// traffic, lowest priority first, to shed (refuse with 503 and `Retry-After`) or to
/// downgrade (send to `model`). Part of the live configuration: applied within seconds,
/// without restarting the pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BrownOut {
    /// Share of arriving traffic to shed or downgrade, in `[0, 1]`.
    pub fraction: f64,
    /// Shed or downgrade.
    pub action: BrownOutAction,
    /// The model downgraded requests are sent to (required to downgrade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Why, in the autoscaler's words; shed requests carry it in their error message.
    #[serde(default)]
    pub message: String,
}

impl BrownOut {
    /// Checks the fields a sidecar cannot act on.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.fraction) {
            return Err(format!(
                "brownOut.fraction must be within [0, 1], not {}",
                self.fraction
            ));
        }
        if self.action == BrownOutAction::Downgrade
            && self.model.as_deref().unwrap_or("").is_empty()
        {
            return Err("brownOut.action downgrade needs brownOut.model".to_owned());
        }
        Ok(())
    }

    /// The probability with which a request of each priority (indexed as
    /// [`Priority::ALL`]) is taken, so that `fraction` of all traffic is, lowest priority
    /// first: with `shares` the recent share of arrivals of each priority, `low` is taken
    /// entirely before any `normal` is, and `high` never. When `low` and `normal` together
    /// are less than `fraction`, all of both are taken (the rest cannot be).
    pub fn take_probabilities(&self, shares: [f64; 3]) -> [f64; 3] {
        let mut left = if self.fraction.is_finite() {
            self.fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let mut out = [0.0; 3];
        for (i, share) in shares.iter().enumerate().take(2) {
            if left <= 0.0 {
                break;
            }
            let share = if share.is_finite() {
                share.max(0.0)
            } else {
                0.0
            };
            if share <= 0.0 {
                continue;
            }
            let p = (left / share).min(1.0);
            out[i] = p;
            left -= p * share;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(started: i64, at: i64, requests: u64, completed: u64, sum: f64) -> LoadReport {
        LoadReport {
            started_at_ms: started,
            at_ms: at,
            requests,
            completed,
            latency_sum_s: sum,
            latency_sq_sum_s2: sum * 2.0,
            in_flight: 3,
            ..LoadReport::default()
        }
    }

    #[test]
    fn a_signal_is_the_difference_of_two_reports() {
        let before = report(1_000, 11_000, 100, 90, 45.0);
        let now = report(1_000, 26_000, 160, 150, 75.0);
        let s = now.since(Some(&before));
        assert_eq!(s.window_s, 15.0);
        assert_eq!((s.requests, s.completed, s.in_flight), (60, 60, 3));
        assert_eq!((s.latency_sum_s, s.latency_sq_sum_s2), (30.0, 60.0));
    }

    #[test]
    fn a_restarted_sidecar_counts_from_zero() {
        let before = report(1_000, 11_000, 100, 90, 45.0);
        let restarted = report(20_000, 26_000, 7, 5, 2.0);
        let s = restarted.since(Some(&before));
        assert_eq!((s.window_s, s.requests, s.completed), (6.0, 7, 5));
        // No earlier report: since the sidecar started.
        assert_eq!(restarted.since(None), s);
    }

    #[test]
    fn replicas_merge_by_sum_and_the_largest_p95() {
        let a = LoadSignal {
            window_s: 15.0,
            requests: 10,
            latency_p95_s: Some(1.5),
            ..LoadSignal::default()
        };
        let b = LoadSignal {
            window_s: 14.0,
            requests: 5,
            latency_p95_s: Some(2.5),
            ..LoadSignal::default()
        };
        let m = merge(&[a, b, LoadSignal::default()]);
        assert_eq!(
            (m.window_s, m.requests, m.latency_p95_s),
            (15.0, 15, Some(2.5))
        );
    }

    #[test]
    fn brown_outs_the_sidecar_cannot_act_on_are_refused() {
        let shed = BrownOut {
            fraction: 0.25,
            action: BrownOutAction::Shed,
            model: None,
            message: String::new(),
        };
        assert!(shed.validate().is_ok());
        let too_much = BrownOut {
            fraction: 1.5,
            ..shed.clone()
        };
        assert!(too_much.validate().unwrap_err().contains("[0, 1]"));
        let nowhere = BrownOut {
            action: BrownOutAction::Downgrade,
            ..shed
        };
        assert!(nowhere.validate().unwrap_err().contains("brownOut.model"));
        let nan = BrownOut {
            fraction: f64::NAN,
            action: BrownOutAction::Shed,
            model: None,
            message: String::new(),
        };
        assert!(nan.validate().is_err());
    }

    #[test]
    fn the_lowest_priority_is_taken_first_and_high_never() {
        let b = |fraction| BrownOut {
            fraction,
            action: BrownOutAction::Shed,
            model: None,
            message: String::new(),
        };
        // 20 % low, 50 % normal, 30 % high.
        let shares = [0.2, 0.5, 0.3];
        let table: [(f64, [f64; 3]); 5] = [
            (0.0, [0.0, 0.0, 0.0]),
            (0.1, [0.5, 0.0, 0.0]),
            (0.2, [1.0, 0.0, 0.0]),
            (0.45, [1.0, 0.5, 0.0]),
            (0.9, [1.0, 1.0, 0.0]),
        ];
        for (fraction, want) in table {
            let got = b(fraction).take_probabilities(shares);
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-9, "{fraction}: {got:?} != {want:?}");
            }
        }
        // No low traffic at all: normal carries the whole fraction.
        assert_eq!(b(0.25).take_probabilities([0.0, 1.0, 0.0])[1], 0.25);
    }

    #[test]
    fn priorities_parse_from_the_header_and_refuse_anything_else() {
        assert_eq!(Priority::parse(b"LOW"), Some(Priority::Low));
        assert_eq!(Priority::parse(b"normal"), Some(Priority::Normal));
        assert_eq!(Priority::parse(b"High"), Some(Priority::High));
        assert_eq!(Priority::parse(b"urgent"), None);
        assert_eq!(Priority::default(), Priority::Normal);
    }
}
