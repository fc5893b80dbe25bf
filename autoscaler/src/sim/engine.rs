//! The discrete-event simulation: a trace replayed against pods that an autoscaler sizes.
//!
//! ```text
//!   arrivals (trace) ─► shared FIFO queue ─► free slot on a Ready pod ─► completion
//!                                ▲                     ▲
//!   scaler tick every interval ──┴── scale(n): new pods become Ready after start_delay;
//!                                    removal takes Starting pods, then idle Ready pods,
//!                                    then busy ones, which drain their work first
//! ```
//!
//! Events at the same instant run in a fixed order (completions, pods becoming ready,
//! arrivals, ticks) and ties within a kind by creation order, so a run is a pure function of
//! the trace, the settings and the scaler. Replica-seconds count every pod from creation to
//! removal (Starting and Draining included: they are paid for), up to the end of the trace's
//! last minute.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

use crate::sim::service::ServiceModel;
use crate::sim::trace::Trace;

/// What a scaler sees at each tick: the window since its previous tick and the state now.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Observation {
    /// Time of this tick, seconds.
    pub now_s: f64,
    /// Length of the window, seconds.
    pub window_s: f64,
    /// Requests that arrived in the window.
    pub arrivals: u64,
    /// Requests that began service in the window (left the queue for a slot): what a
    /// sidecar inside the pod sees arrive when the queue is in front of the pods.
    pub started: u64,
    /// Requests that finished in the window.
    pub completed: u64,
    /// Summed service time (excluding queueing) of those completions, seconds.
    pub service_sum_s: f64,
    /// Summed squared service times of those completions, seconds².
    pub service_sq_sum_s2: f64,
    /// Prompt tokens of those completions.
    pub input_tokens: u64,
    /// Generated tokens of those completions.
    pub output_tokens: u64,
    /// Requests in service now.
    pub in_service: u64,
    /// Requests waiting for a slot now.
    pub waiting: u64,
    /// Time-average of requests in service over the window.
    pub mean_in_service: f64,
    /// Time-average of waiting requests over the window.
    pub mean_waiting: f64,
    /// Pods that are Ready and not draining.
    pub ready: u32,
    /// Pods still starting.
    pub starting: u32,
    /// Replicas currently asked for (the Deployment's `spec.replicas`).
    pub replicas: u32,
}

/// An autoscaler under test.
pub trait Scaler {
    /// Name for reports.
    fn name(&self) -> String;
    /// Seconds between ticks.
    fn interval_s(&self) -> f64;
    /// Replicas wanted after seeing `obs`.
    fn decide(&mut self, obs: &Observation) -> u32;
}

/// Settings of one simulation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimConfig {
    /// Seconds from pod creation to Ready.
    pub start_delay_s: f64,
    /// How long requests hold a slot.
    pub service: ServiceModel,
    /// Ready pods at time 0.
    pub initial_replicas: u32,
    /// SLO: per-minute P95 wait must not exceed this, seconds.
    pub slo_wait_s: f64,
    /// The length of the "minute" the SLO is judged over, seconds: 60, or 60/c for a trace
    /// replayed c times faster (`bench/autoscaler-closed-loop`), so that a compressed run is
    /// judged over the same requests as the original.
    pub minute_s: f64,
    /// Requests still queued this long after the trace's end are given up on and count as
    /// waiting until then (guards against a scaler that never scales up).
    pub give_up_after_s: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            start_delay_s: 30.0,
            service: ServiceModel::default(),
            initial_replicas: 1,
            slo_wait_s: 2.0,
            minute_s: 60.0,
            give_up_after_s: 3600.0,
        }
    }
}

/// Everything measured in one run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    /// The scaler's name.
    pub scaler: String,
    /// Requests in the trace.
    pub requests: usize,
    /// Minutes with traffic whose P95 wait exceeded the SLO.
    pub violation_minutes: u32,
    /// Minutes with at least one arrival.
    pub minutes_with_traffic: u32,
    /// Pod-hours paid for.
    pub replica_hours: f64,
    /// Changes of scaling direction (up then down, or down then up).
    pub reversals: u32,
    /// Replica-count changes.
    pub scale_events: u32,
    /// P95 wait over all requests, seconds.
    pub p95_wait_s: f64,
    /// Mean wait, seconds.
    pub mean_wait_s: f64,
    /// Most pods alive at once.
    pub peak_pods: u32,
    /// Requests never served before giving up.
    pub unserved: usize,
    /// `(time, replicas)` after every change, for plots and debugging.
    pub timeline: Vec<(f64, u32)>,
    /// Per-minute P95 wait (`None` for minutes without arrivals), seconds.
    pub minute_p95_wait_s: Vec<Option<f64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Completion { pod: usize, request: usize },
    Ready { pod: usize },
    Tick,
}

#[derive(Debug, Clone, Copy)]
struct Event {
    at: f64,
    seq: u64,
    kind: Kind,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    /// Reversed, so `BinaryHeap` pops the earliest event first.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .at
            .total_cmp(&self.at)
            .then_with(|| rank(&other.kind).cmp(&rank(&self.kind)))
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

fn rank(kind: &Kind) -> u8 {
    match kind {
        Kind::Completion { .. } => 0,
        Kind::Ready { .. } => 1,
        Kind::Tick => 3,
    }
}
/// Arrivals sit between pod readiness and ticks in the tie order.
const ARRIVAL_RANK: u8 = 2;

#[derive(Debug, Clone, Copy)]
struct Pod {
    ready: bool,
    draining: bool,
    alive: bool,
    busy: u32,
}

struct State<'a> {
    trace: &'a Trace,
    cfg: SimConfig,
    now: f64,
    horizon: f64,
    heap: BinaryHeap<Event>,
    seq: u64,
    pods: Vec<Pod>,
    queue: VecDeque<usize>,
    started: Vec<f64>,
    waits: Vec<f64>,
    // Window accumulators, reset at each tick.
    w_arrivals: u64,
    w_started: u64,
    w_completed: u64,
    w_service: f64,
    w_service_sq: f64,
    w_in: u64,
    w_out: u64,
    w_in_service_int: f64,
    w_waiting_int: f64,
    w_start: f64,
    // Run totals.
    in_service: u64,
    replica_seconds: f64,
    replicas: u32,
    peak_pods: u32,
    last_dir: i64,
    reversals: u32,
    scale_events: u32,
    timeline: Vec<(f64, u32)>,
}

impl State<'_> {
    fn push(&mut self, at: f64, kind: Kind) {
        self.seq += 1;
        self.heap.push(Event {
            at,
            seq: self.seq,
            kind,
        });
    }

    fn alive_pods(&self) -> u32 {
        self.pods.iter().filter(|p| p.alive).count() as u32
    }

    /// Moves the clock to `t`, integrating the time-weighted quantities.
    fn advance(&mut self, t: f64) {
        let dt = t - self.now;
        if dt > 0.0 {
            self.w_in_service_int += self.in_service as f64 * dt;
            self.w_waiting_int += self.queue.len() as f64 * dt;
            let counted = (t.min(self.horizon) - self.now.min(self.horizon)).max(0.0);
            self.replica_seconds += f64::from(self.alive_pods()) * counted;
            self.now = t;
        }
    }

    fn dispatch(&mut self) {
        while let Some(&request) = self.queue.front() {
            let slots = self.cfg.service.slots;
            let best = self
                .pods
                .iter()
                .enumerate()
                .filter(|(_, p)| p.alive && p.ready && !p.draining && p.busy < slots)
                .min_by_key(|(i, p)| (p.busy, *i))
                .map(|(i, _)| i);
            let Some(pod) = best else { return };
            self.queue.pop_front();
            self.pods[pod].busy += 1;
            self.in_service += 1;
            self.w_started += 1;
            self.started[request] = self.now;
            self.waits[request] = self.now - self.trace.requests[request].arrival_s;
            let s = self.cfg.service.service_time(&self.trace.requests[request]);
            self.push(self.now + s, Kind::Completion { pod, request });
        }
    }

    fn complete(&mut self, pod: usize, request: usize) {
        let r = &self.trace.requests[request];
        self.in_service -= 1;
        self.w_completed += 1;
        let s = self.now - self.started[request];
        self.w_service += s;
        self.w_service_sq += s * s;
        self.w_in += u64::from(r.input_tokens);
        self.w_out += u64::from(r.output_tokens);
        let p = &mut self.pods[pod];
        p.busy -= 1;
        if p.draining && p.busy == 0 {
            p.alive = false;
        }
    }

    fn scale(&mut self, target: u32) {
        let dir = i64::from(target) - i64::from(self.replicas);
        if dir != 0 {
            self.scale_events += 1;
            if self.last_dir != 0 && dir.signum() != self.last_dir {
                self.reversals += 1;
            }
            self.last_dir = dir.signum();
            self.timeline.push((self.now, target));
        }
        self.replicas = target;
        let active: Vec<usize> = (0..self.pods.len())
            .filter(|&i| self.pods[i].alive && !self.pods[i].draining)
            .collect();
        let have = active.len() as u32;
        if target > have {
            for _ in have..target {
                self.pods.push(Pod {
                    ready: false,
                    draining: false,
                    alive: true,
                    busy: 0,
                });
                let pod = self.pods.len() - 1;
                self.push(self.now + self.cfg.start_delay_s, Kind::Ready { pod });
            }
        } else {
            let mut excess = (have - target) as usize;
            // Newest starting pods first, then idle ready pods, then the least busy.
            let mut order: Vec<usize> = active;
            order.sort_by_key(|&i| {
                let p = &self.pods[i];
                (p.ready, p.busy, std::cmp::Reverse(i))
            });
            for i in order {
                if excess == 0 {
                    break;
                }
                let p = &mut self.pods[i];
                if p.busy == 0 {
                    p.alive = false;
                } else {
                    p.draining = true;
                }
                excess -= 1;
            }
        }
        self.peak_pods = self.peak_pods.max(self.alive_pods());
    }

    fn observe(&mut self) -> Observation {
        let window_s = self.now - self.w_start;
        let mean = |x: f64| if window_s > 0.0 { x / window_s } else { 0.0 };
        let obs = Observation {
            now_s: self.now,
            window_s,
            arrivals: self.w_arrivals,
            started: self.w_started,
            completed: self.w_completed,
            service_sum_s: self.w_service,
            service_sq_sum_s2: self.w_service_sq,
            input_tokens: self.w_in,
            output_tokens: self.w_out,
            in_service: self.in_service,
            waiting: self.queue.len() as u64,
            mean_in_service: mean(self.w_in_service_int),
            mean_waiting: mean(self.w_waiting_int),
            ready: self
                .pods
                .iter()
                .filter(|p| p.alive && p.ready && !p.draining)
                .count() as u32,
            starting: self.pods.iter().filter(|p| p.alive && !p.ready).count() as u32,
            replicas: self.replicas,
        };
        self.w_arrivals = 0;
        self.w_started = 0;
        self.w_completed = 0;
        self.w_service = 0.0;
        self.w_service_sq = 0.0;
        self.w_in = 0;
        self.w_out = 0;
        self.w_in_service_int = 0.0;
        self.w_waiting_int = 0.0;
        self.w_start = self.now;
        obs
    }
}

/// Replays `trace` against `scaler` and measures the outcome.
pub fn simulate(trace: &Trace, scaler: &mut dyn Scaler, cfg: &SimConfig) -> RunResult {
    let n = trace.requests.len();
    let minute = cfg.minute_s;
    let horizon = (trace.duration_s() / minute).floor() * minute + minute;
    let mut st = State {
        trace,
        cfg: *cfg,
        now: 0.0,
        horizon,
        heap: BinaryHeap::new(),
        seq: 0,
        pods: Vec::new(),
        queue: VecDeque::new(),
        started: vec![f64::NAN; n],
        waits: vec![f64::NAN; n],
        w_arrivals: 0,
        w_started: 0,
        w_completed: 0,
        w_service: 0.0,
        w_service_sq: 0.0,
        w_in: 0,
        w_out: 0,
        w_in_service_int: 0.0,
        w_waiting_int: 0.0,
        w_start: 0.0,
        in_service: 0,
        replica_seconds: 0.0,
        replicas: cfg.initial_replicas,
        peak_pods: 0,
        last_dir: 0,
        reversals: 0,
        scale_events: 0,
        timeline: vec![(0.0, cfg.initial_replicas)],
    };
    for _ in 0..cfg.initial_replicas {
        st.pods.push(Pod {
            ready: true,
            draining: false,
            alive: true,
            busy: 0,
        });
    }
    st.peak_pods = cfg.initial_replicas;
    let interval = scaler.interval_s();
    st.push(interval, Kind::Tick);

    let give_up_at = horizon + cfg.give_up_after_s;
    let mut next_arrival = 0usize;
    let mut served = 0usize;
    loop {
        let arrival_at = trace.requests.get(next_arrival).map(|r| r.arrival_s);
        let event_first = match (st.heap.peek(), arrival_at) {
            (Some(e), Some(a)) => e.at < a || (e.at == a && rank(&e.kind) < ARRIVAL_RANK),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        if event_first {
            let Some(e) = st.heap.pop() else { break };
            if e.at > give_up_at {
                break;
            }
            st.advance(e.at);
            match e.kind {
                Kind::Completion { pod, request } => {
                    st.complete(pod, request);
                    served += 1;
                    st.dispatch();
                }
                Kind::Ready { pod } => {
                    if st.pods[pod].alive {
                        st.pods[pod].ready = true;
                        st.dispatch();
                    }
                }
                Kind::Tick => {
                    let obs = st.observe();
                    let target = scaler.decide(&obs);
                    st.scale(target);
                    st.dispatch();
                    let done = next_arrival >= n && served >= n;
                    if !done {
                        st.push(st.now + interval, Kind::Tick);
                    }
                }
            }
        } else if let Some(a) = arrival_at {
            st.advance(a);
            st.queue.push_back(next_arrival);
            st.w_arrivals += 1;
            next_arrival += 1;
            st.dispatch();
        }
        if next_arrival >= n && served >= n && st.now >= horizon {
            break;
        }
    }
    // Replica time to the horizon when the run finished early.
    st.advance(horizon.max(st.now));

    let mut unserved = 0;
    for (i, w) in st.waits.iter_mut().enumerate() {
        if w.is_nan() {
            unserved += 1;
            *w = give_up_at - trace.requests[i].arrival_s;
        }
    }
    summarize(trace, scaler.name(), cfg, st, unserved)
}

fn summarize(
    trace: &Trace,
    scaler: String,
    cfg: &SimConfig,
    st: State<'_>,
    unserved: usize,
) -> RunResult {
    let mut per_minute: Vec<Vec<f64>> = Vec::new();
    for (r, &w) in trace.requests.iter().zip(&st.waits) {
        let m = (r.arrival_s / cfg.minute_s).floor() as usize;
        if per_minute.len() <= m {
            per_minute.resize_with(m + 1, Vec::new);
        }
        per_minute[m].push(w);
    }
    let mut violation_minutes = 0;
    let mut minutes_with_traffic = 0;
    let mut minute_p95_wait_s = Vec::with_capacity(per_minute.len());
    for waits in &mut per_minute {
        if waits.is_empty() {
            minute_p95_wait_s.push(None);
            continue;
        }
        minutes_with_traffic += 1;
        let p95 = percentile(waits, 0.95);
        minute_p95_wait_s.push(Some(p95));
        if p95 > cfg.slo_wait_s {
            violation_minutes += 1;
        }
    }
    let mut all = st.waits.clone();
    let p95_wait_s = percentile(&mut all, 0.95);
    let mean_wait_s = if all.is_empty() {
        0.0
    } else {
        all.iter().sum::<f64>() / all.len() as f64
    };
    RunResult {
        scaler,
        requests: trace.requests.len(),
        violation_minutes,
        minutes_with_traffic,
        replica_hours: st.replica_seconds / 3600.0,
        reversals: st.reversals,
        scale_events: st.scale_events,
        p95_wait_s,
        mean_wait_s,
        peak_pods: st.peak_pods,
        unserved,
        timeline: st.timeline,
        minute_p95_wait_s,
    }
}

/// Nearest-rank percentile; sorts `xs` in place. Zero for an empty slice.
pub fn percentile(xs: &mut [f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let rank = (q * xs.len() as f64).ceil() as usize;
    xs[rank.clamp(1, xs.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::trace::Request;

    struct Fixed(u32);
    impl Scaler for Fixed {
        fn name(&self) -> String {
            format!("fixed-{}", self.0)
        }
        fn interval_s(&self) -> f64 {
            15.0
        }
        fn decide(&mut self, _: &Observation) -> u32 {
            self.0
        }
    }

    fn evenly(rate: f64, seconds: f64, tokens_out: u32) -> Trace {
        let n = (rate * seconds) as usize;
        Trace {
            name: "even".into(),
            requests: (0..n)
                .map(|i| Request {
                    arrival_s: i as f64 / rate,
                    input_tokens: 0,
                    output_tokens: tokens_out,
                })
                .collect(),
        }
    }

    #[test]
    fn enough_fixed_capacity_means_no_waiting_and_exact_replica_hours() {
        // 1 req/s, each 0.05 + 25/50 = 0.55 s: one pod never queues.
        let trace = evenly(1.0, 600.0, 25);
        let r = simulate(&trace, &mut Fixed(1), &SimConfig::default());
        assert_eq!(r.violation_minutes, 0);
        assert_eq!(r.p95_wait_s, 0.0);
        assert_eq!(r.unserved, 0);
        assert!(
            (r.replica_hours - 600.0 / 3600.0).abs() < 1e-9,
            "{}",
            r.replica_hours
        );
        assert_eq!(r.reversals, 0);
    }

    #[test]
    fn too_little_capacity_violates_every_minute_after_the_queue_builds() {
        // 2 req/s of 0.55 s on one pod: ρ = 1.1, the queue grows without bound.
        let trace = evenly(2.0, 600.0, 25);
        let r = simulate(&trace, &mut Fixed(1), &SimConfig::default());
        assert!(r.violation_minutes >= 9, "{r:?}");
        // Two pods from the start fix it, and cost twice as much.
        let two = SimConfig {
            initial_replicas: 2,
            ..SimConfig::default()
        };
        let r2 = simulate(&trace, &mut Fixed(2), &two);
        assert_eq!(r2.violation_minutes, 0);
        assert!(r2.replica_hours > 1.9 * 600.0 / 3600.0);
    }

    #[test]
    fn new_pods_serve_only_after_the_start_delay() {
        let trace = evenly(2.0, 120.0, 25);
        let cfg = SimConfig {
            initial_replicas: 0,
            start_delay_s: 30.0,
            ..SimConfig::default()
        };
        let r = simulate(&trace, &mut Fixed(3), &cfg);
        // The first request waits for the first tick (15 s) plus the start delay (30 s).
        assert!(r.p95_wait_s > 30.0 && r.mean_wait_s > 5.0, "{r:?}");
        assert_eq!(r.unserved, 0);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let mut xs: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&mut xs, 0.95), 19.0);
        assert_eq!(percentile(&mut [3.0], 0.95), 3.0);
    }
}
