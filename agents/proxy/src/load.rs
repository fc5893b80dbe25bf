//! The load this sidecar reports to the operator's autoscaler (`GET /load` on the admin port,
//! the contract's [`LoadReport`]) and to Prometheus (`soma_proxy_load_*`).
//!
//! ```text
//!  reserve ─► arrive() ─► Arrival ─(settle)─► complete(usage) ─► counters + P95 sketch
//!  admit refused (maxInFlight) / brown-out shed / Budget rate cap ─► arrivals too (demand the replica saw)
//!  agent PUT /v1/queue ─► queue_reported(waiting, ttl) (queue.rs)
//!  GET /load, /metrics ─► report(): atomics read, sketch summed over the last 60 s
//! ```
//!
//! The request path touches atomics only: counters, two `f64` sums kept as bits in `u64`s
//! (a compare-and-swap loop), and one bucket of a fixed ring of per-second log-scale
//! histograms. No lock, no allocation. Counters are cumulative since the process started,
//! so a missed or repeated poll loses nothing (the operator takes differences,
//! [`LoadReport::since`]).
//!
//! The sketch is approximate by design: a bucket's upper bound (`2^(1/4)`, 19 % apart) is
//! reported, and a second's histogram is cleared by the first request of a new second, so a
//! request recorded concurrently with that clearing may be lost from the P95 (never from the
//! counters).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use soma_contract::load::{LoadReport, Priority};
use soma_metering::Usage;

/// Seconds of history the P95 covers.
pub const P95_WINDOW_S: u64 = 60;
/// Buckets per second: bucket `i` holds service times up to `1 ms · 2^(i/4)`; the last
/// (about 220 s) also holds everything longer.
const BUCKETS: usize = 72;
const BUCKETS_PER_DOUBLING: f64 = 4.0;

/// One second of the ring.
#[derive(Debug)]
struct Second {
    /// Which second (since the meter started, plus one: 0 is "never used") this slot holds.
    tag: AtomicU64,
    counts: [AtomicU32; BUCKETS],
}

/// Counters and the P95 sketch of one sidecar.
#[derive(Debug)]
pub struct LoadMeter {
    started: Instant,
    started_at_ms: i64,
    requests: AtomicU64,
    completed: AtomicU64,
    in_flight: AtomicU64,
    latency_sum_bits: AtomicU64,
    latency_sq_sum_bits: AtomicU64,
    input_tokens: AtomicU64,
    output_tokens: AtomicU64,
    shed: AtomicU64,
    downgraded: AtomicU64,
    /// Arrivals by priority ([`Priority::ALL`] order), for brown-out's lowest-first split.
    by_priority: [AtomicU64; 3],
    /// The agent's last report of its own queue ([`LoadMeter::queue_reported`]) and until
    /// when it counts (milliseconds since the meter started).
    queue_waiting: AtomicU64,
    queue_until_ms: AtomicU64,
    ring: Box<[Second]>,
}

/// A request counted as arrived and not yet completed; dropping it without
/// [`LoadMeter::complete`] (a request that failed before settling) only ends its in-flight.
#[derive(Debug)]
pub struct Arrival {
    meter: Arc<LoadMeter>,
    at: Instant,
}

impl Drop for Arrival {
    fn drop(&mut self) {
        self.meter.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn add_f64(cell: &AtomicU64, x: f64) {
    let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
        Some((f64::from_bits(bits) + x).to_bits())
    });
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn bucket_of(secs: f64) -> usize {
    let ms = secs * 1000.0;
    if ms.is_nan() || ms <= 1.0 {
        return 0;
    }
    let i = (ms.log2() * BUCKETS_PER_DOUBLING).ceil();
    if i >= (BUCKETS - 1) as f64 {
        BUCKETS - 1
    } else {
        i as usize
    }
}

/// The upper bound of bucket `i`, seconds.
fn bucket_bound(i: usize) -> f64 {
    0.001 * (i as f64 / BUCKETS_PER_DOUBLING).exp2()
}

impl LoadMeter {
    /// A meter starting now.
    pub fn new() -> Arc<LoadMeter> {
        let ring = (0..P95_WINDOW_S)
            .map(|_| Second {
                tag: AtomicU64::new(0),
                counts: std::array::from_fn(|_| AtomicU32::new(0)),
            })
            .collect();
        Arc::new(LoadMeter {
            started: Instant::now(),
            started_at_ms: jiff::Timestamp::now().as_millisecond(),
            requests: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            latency_sum_bits: AtomicU64::new(0.0_f64.to_bits()),
            latency_sq_sum_bits: AtomicU64::new(0.0_f64.to_bits()),
            input_tokens: AtomicU64::new(0),
            output_tokens: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            downgraded: AtomicU64::new(0),
            by_priority: std::array::from_fn(|_| AtomicU64::new(0)),
            queue_waiting: AtomicU64::new(0),
            queue_until_ms: AtomicU64::new(0),
            ring,
        })
    }

    /// A request this replica sets out to serve (its reservation was taken), admitted at `at`.
    pub fn arrive(self: &Arc<Self>, at: Instant, priority: Priority) -> Arrival {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.by_priority[priority.index()].fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Arrival {
            meter: self.clone(),
            at,
        }
    }

    /// Demand this replica turned away without serving (`maxInFlight` reached, shed by a
    /// brown-out, or over a Budget's rate cap): an arrival that never completes.
    pub fn refused(&self, priority: Priority, shed: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.by_priority[priority.index()].fetch_add(1, Ordering::Relaxed);
        if shed {
            self.shed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A request sent to the brown-out model instead of the one it named.
    pub fn downgraded(&self) {
        self.downgraded.fetch_add(1, Ordering::Relaxed);
    }

    /// Arrivals by priority since start ([`Priority::ALL`] order).
    pub fn arrivals_by_priority(&self) -> [u64; 3] {
        std::array::from_fn(|i| self.by_priority[i].load(Ordering::Relaxed))
    }

    /// The request settled now with `usage`: its service time runs from admission.
    pub fn complete(&self, arrival: Arrival, usage: &Usage) {
        let now = Instant::now();
        let secs = now.saturating_duration_since(arrival.at).as_secs_f64();
        self.completed.fetch_add(1, Ordering::Relaxed);
        add_f64(&self.latency_sum_bits, secs);
        add_f64(&self.latency_sq_sum_bits, secs * secs);
        self.input_tokens
            .fetch_add(usage.input_tokens, Ordering::Relaxed);
        self.output_tokens
            .fetch_add(usage.output_tokens, Ordering::Relaxed);
        self.record(now, secs);
        drop(arrival);
    }

    /// The agent reports `waiting` requests in front of it; the report counts for `ttl`.
    pub fn queue_reported(&self, waiting: u64, ttl: Duration) {
        let until = self.millis(Instant::now()).saturating_add(duration_ms(ttl));
        self.queue_waiting.store(waiting, Ordering::Relaxed);
        self.queue_until_ms.store(until, Ordering::Relaxed);
    }

    /// The agent's queue as last reported, 0 once the report has expired.
    fn waiting(&self, at: Instant) -> u64 {
        if self.millis(at) < self.queue_until_ms.load(Ordering::Relaxed) {
            self.queue_waiting.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    fn millis(&self, at: Instant) -> u64 {
        duration_ms(at.saturating_duration_since(self.started))
    }

    fn second(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.started).as_secs() + 1
    }

    fn record(&self, at: Instant, secs: f64) {
        let tag = self.second(at);
        let slot = &self.ring[(tag % P95_WINDOW_S) as usize];
        let old = slot.tag.load(Ordering::Acquire);
        if old != tag
            && slot
                .tag
                .compare_exchange(old, tag, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            for c in &slot.counts {
                c.store(0, Ordering::Relaxed);
            }
        }
        slot.counts[bucket_of(secs)].fetch_add(1, Ordering::Relaxed);
    }

    /// P95 of the service times completed in the last [`P95_WINDOW_S`] seconds before `at`
    /// (the upper bound of the bucket holding it), when any completed.
    fn p95(&self, at: Instant) -> Option<f64> {
        let now = self.second(at);
        let mut sum = [0u64; BUCKETS];
        for slot in self.ring.iter() {
            let tag = slot.tag.load(Ordering::Acquire);
            if tag == 0 || tag > now || now - tag >= P95_WINDOW_S {
                continue;
            }
            for (s, c) in sum.iter_mut().zip(&slot.counts) {
                *s += u64::from(c.load(Ordering::Relaxed));
            }
        }
        let total: u64 = sum.iter().sum();
        if total == 0 {
            return None;
        }
        // The smallest bucket with at least 95 % of the samples at or below it.
        let rank = total - total / 20;
        let mut seen = 0;
        sum.iter().enumerate().find_map(|(i, c)| {
            seen += c;
            (seen >= rank).then(|| bucket_bound(i))
        })
    }

    /// What this sidecar has seen since it started.
    pub fn report(&self) -> LoadReport {
        let now = Instant::now();
        LoadReport {
            started_at_ms: self.started_at_ms,
            at_ms: self.started_at_ms + i64::try_from(self.millis(now)).unwrap_or(i64::MAX / 2),
            requests: self.requests.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            latency_sum_s: f64::from_bits(self.latency_sum_bits.load(Ordering::Relaxed)),
            latency_sq_sum_s2: f64::from_bits(self.latency_sq_sum_bits.load(Ordering::Relaxed)),
            input_tokens: self.input_tokens.load(Ordering::Relaxed),
            output_tokens: self.output_tokens.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            waiting: self.waiting(now),
            p95_window_s: P95_WINDOW_S as f64,
            latency_p95_s: self.p95(now),
            shed: self.shed.load(Ordering::Relaxed),
            downgraded: self.downgraded.load(Ordering::Relaxed),
        }
    }
}

/// `soma_proxy_load_*`: the [`LoadReport`] as Prometheus reads it, made at each scrape.
#[derive(Debug)]
pub struct LoadCollector(pub Arc<LoadMeter>);

impl Collector for LoadCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = self.0.report();
        let counters: [(&str, &str, u64); 6] = [
            (
                "load_arrivals",
                "Requests this replica set out to serve or turned away (maxInFlight, brown-out, a Budget rate cap): its demand",
                r.requests,
            ),
            (
                "load_completions",
                "Requests served and settled",
                r.completed,
            ),
            (
                "load_input_tokens",
                "Prompt tokens of the completions",
                r.input_tokens,
            ),
            (
                "load_output_tokens",
                "Generated tokens of the completions",
                r.output_tokens,
            ),
            ("load_shed", "Requests shed by brown-out", r.shed),
            (
                "load_downgraded",
                "Requests sent to the brown-out model",
                r.downgraded,
            ),
        ];
        for (name, help, value) in counters {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let sums: [(&str, &str, f64); 2] = [
            (
                "load_service_seconds",
                "Sum of the completions' service times (admission to settlement)",
                r.latency_sum_s,
            ),
            (
                "load_service_seconds_squared",
                "Sum of the squares of the completions' service times",
                r.latency_sq_sum_s2,
            ),
        ];
        for (name, help, value) in sums {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let in_flight = ConstGauge::new(i64::try_from(r.in_flight).unwrap_or(i64::MAX));
        in_flight.encode(encoder.encode_descriptor(
            "load_in_flight",
            "Requests arrived and not yet completed",
            None,
            in_flight.metric_type(),
        )?)?;
        let waiting = ConstGauge::new(i64::try_from(r.waiting).unwrap_or(i64::MAX));
        waiting.encode(encoder.encode_descriptor(
            "load_waiting",
            "Requests waiting in front of the agent, as it last reported them (PUT /v1/queue; 0 once the report expires)",
            None,
            waiting.metric_type(),
        )?)?;
        let p95 = ConstGauge::new(r.latency_p95_s.unwrap_or(0.0));
        p95.encode(encoder.encode_descriptor(
            "load_service_p95_seconds",
            "P95 of the service times completed in the last 60 s (0 when none)",
            None,
            p95.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    fn usage(input: u64, output: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            ..Usage::default()
        }
    }

    #[test]
    fn buckets_are_a_quarter_doubling_apart_and_bounded() {
        assert_eq!(bucket_of(0.0), 0);
        assert_eq!(bucket_of(0.001), 0);
        assert_eq!(bucket_of(0.002), 4);
        assert_eq!(bucket_of(1.0e9), BUCKETS - 1);
        assert_eq!(bucket_of(f64::NAN), 0);
        for secs in [0.0015, 0.05, 0.7, 3.0, 42.0] {
            let b = bucket_of(secs);
            assert!(
                bucket_bound(b) >= secs && bucket_bound(b) < secs * 1.2,
                "{secs}"
            );
        }
    }

    #[test]
    fn counters_add_up_and_in_flight_ends_on_drop() {
        let m = LoadMeter::new();
        let t0 = Instant::now();
        let a = m.arrive(t0, Priority::Normal);
        let b = m.arrive(t0, Priority::Low);
        let c = m.arrive(t0, Priority::High);
        m.refused(Priority::Low, true);
        m.refused(Priority::Normal, false);
        assert_eq!(m.report().in_flight, 3);
        m.complete(a, &usage(10, 5));
        m.complete(b, &usage(1, 2));
        drop(c);
        let r = m.report();
        assert_eq!((r.requests, r.completed, r.in_flight, r.shed), (5, 2, 0, 1));
        assert_eq!((r.input_tokens, r.output_tokens), (11, 7));
        assert!(r.latency_sum_s >= 0.0 && r.latency_sq_sum_s2 >= 0.0);
        assert_eq!(m.arrivals_by_priority(), [2, 2, 1]);
        assert!(r.latency_p95_s.is_some());
        assert!(r.at_ms >= r.started_at_ms);
    }

    #[test]
    fn the_agents_queue_report_counts_until_it_expires() {
        let m = LoadMeter::new();
        assert_eq!(m.report().waiting, 0, "nothing reported");
        m.queue_reported(7, Duration::from_secs(60));
        assert_eq!(m.report().waiting, 7);
        m.queue_reported(3, Duration::from_secs(60));
        assert_eq!(m.report().waiting, 3, "the last report wins");
        let later = Instant::now() + Duration::from_secs(61);
        assert_eq!(m.waiting(later), 0, "expired");
        m.queue_reported(5, Duration::ZERO);
        assert_eq!(
            m.report().waiting,
            0,
            "a report that has already expired counts for nothing"
        );
    }

    #[test]
    fn the_p95_is_the_bucket_holding_the_95th_percentile_of_the_window() {
        let m = LoadMeter::new();
        let now = m.started + Duration::from_secs(100);
        // 95 fast requests and 5 slow ones: the P95 is a fast one's bucket; one more slow
        // one moves it.
        for _ in 0..95 {
            m.record(now, 0.010);
        }
        for _ in 0..5 {
            m.record(now, 2.0);
        }
        let p = m.p95(now).unwrap();
        assert!((0.010..0.012).contains(&p), "{p}");
        m.record(now, 2.0);
        let p = m.p95(now).unwrap();
        assert!((2.0..2.4).contains(&p), "{p}");
        // A minute later those seconds have left the window.
        assert_eq!(m.p95(now + Duration::from_secs(P95_WINDOW_S)), None);
        // A new second in the same slot clears it before counting.
        let later = now + Duration::from_secs(P95_WINDOW_S);
        m.record(later, 0.5);
        let p = m.p95(later).unwrap();
        assert!((0.5..0.6).contains(&p), "{p}");
    }
}
