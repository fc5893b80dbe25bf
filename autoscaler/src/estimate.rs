//! Estimating the queue's inputs — arrival rate and service time — from observed windows.
//!
//! ```text
//!   λ̂  = running mean of requests/Δt, gain 1 − e^{−Δt/τλ}     EMA of arrivals
//!   Ŝ  = running mean of S_window,   gain 1 − e^{−n/nS}       per-request weighted EMA
//!   Ŝ₂ likewise from latency² sums;  c² = Ŝ₂/Ŝ² − 1            service variability
//!   c_a² = running mean of (n − λ̂Δt)² / (λ̂Δt), gain 1 − e^{−Δt/300 s}, prior 1, each window
//!          and the result within [1, 16]                       arrival burstiness
//!   S_window = latency_sum / completed                         (observed latency), or
//!            = overhead + (in/prefill_tps + out/decode_tps) / completed   (tokens)
//! ```
//!
//! Each is a bias-corrected EMA ([`RunningMean`]): the plain mean of what was seen while
//! that is less than the EMA's memory, the EMA after. Service time is weighted by completed
//! requests rather than by time, so a quiet window with one unusual request moves the
//! estimate little and a busy window moves it a lot. Before anything completes, `Ŝ` is the
//! configured prior.
//!
//! Arrival burstiness `c_a²` is the index of dispersion of the windows' arrival counts `n`
//! around the count the rate estimate expected before each window (`λ̂Δt`, when at least
//! one): 1 for Poisson arrivals, more when requests come in bursts. It starts from the
//! Poisson prior, weighed as one time constant, so a first unusual window does not set it, and
//! is never taken below 1 (sizing never gets leaner than for Poisson arrivals). It has no
//! setting: 60–1,800 s for its time constant changed nothing that `bench/autoscaler` shows.

use serde::{Deserialize, Serialize};

use crate::signal::LoadSignal;

/// Per-replica-slot token throughput, used to turn tokens into service time when no latency
/// is observed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenThroughput {
    /// Prompt tokens processed per second by one slot.
    pub prefill_tps: f64,
    /// Tokens generated per second by one slot.
    pub decode_tps: f64,
    /// Fixed per-request overhead, seconds.
    pub overhead_s: f64,
}

impl TokenThroughput {
    /// Service time of one request of `input` prompt and `output` generated tokens.
    pub fn service_time(&self, input: u64, output: u64) -> f64 {
        self.overhead_s + input as f64 / self.prefill_tps + output as f64 / self.decode_tps
    }
}

/// Where the current service-time estimate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ServiceTimeSource {
    /// Nothing completed yet: the configured prior.
    Prior,
    /// Observed service latency of completed requests.
    Latency,
    /// Tokens of completed requests and the configured throughput.
    Tokens,
}

/// The estimator's current view.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Estimate {
    /// EMA of the arrival rate, requests per second.
    pub arrival_rate: f64,
    /// Arrival rate of the last window alone, requests per second.
    pub window_arrival_rate: f64,
    /// Mean service time, seconds.
    pub service_time: f64,
    /// Where `service_time` came from.
    pub service_time_source: ServiceTimeSource,
    /// Squared coefficient of variation of service time; 1 (exponential) until measured.
    pub service_scv: f64,
    /// Burstiness of arrivals: the running index of dispersion of the windows' arrival counts
    /// around the rate expected before each (1 for Poisson arrivals, and until measured),
    /// never below 1.
    #[serde(default = "one")]
    pub arrival_scv: f64,
}

fn one() -> f64 {
    1.0
}

const DISPERSION_TAU_S: f64 = 300.0;
const MAX_ARRIVAL_SCV: f64 = 16.0;

/// Settings of the [`Estimator`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EstimatorParams {
    /// Time constant of the arrival-rate EMA, seconds.
    pub arrival_tau_s: f64,
    /// Requests it takes to move the service-time estimate by `1 − 1/e` of the way: the
    /// estimate is, in effect, the mean of about this many recent requests. Default 500: the
    /// mean of 500 requests is within `c/√500` (3–6 % for `c²` = 0.5–2) of the truth, small
    /// against `rhoMax`'s 30 % margin; the first requests still count at full weight (see
    /// [`RunningMean`]), so a new agent's estimate forms as fast as with a short memory.
    pub service_requests: f64,
    /// Service time assumed before any request completes, seconds.
    pub prior_service_time_s: f64,
    /// Used when windows report tokens but no latency.
    pub throughput: Option<TokenThroughput>,
}

impl Default for EstimatorParams {
    fn default() -> Self {
        Self {
            arrival_tau_s: 60.0,
            service_requests: 500.0,
            prior_service_time_s: 1.0,
            throughput: None,
        }
    }
}

/// An exponential moving average that is the plain weighted mean of its observations
/// until enough weight has built up (the bias correction of Adam and of Welford-style
/// running means): `m ← (1 − g)·m + g·x`, `w ← (1 − g)·w + g`, estimate `m / w`.
///
/// Without it, the first observation would be taken at full weight and the next ones at the
/// small steady-state gain, so a first window of a few unusual requests would linger for
/// many windows; with it, the first `n` requests count equally until the EMA's memory is
/// reached.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RunningMean {
    sum: f64,
    weight: f64,
}

impl RunningMean {
    /// Folds in `x` with gain `g ∈ (0, 1]`.
    pub fn observe(&mut self, x: f64, g: f64) {
        self.sum = (1.0 - g) * self.sum + g * x;
        self.weight = (1.0 - g) * self.weight + g;
    }

    /// The current mean; `None` before any observation.
    pub fn get(&self) -> Option<f64> {
        (self.weight > 0.0).then(|| self.sum / self.weight)
    }
}

/// Keeps the running means of arrival rate and service time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Estimator {
    params: EstimatorParams,
    arrival_rate: RunningMean,
    window_arrival_rate: f64,
    service_time: RunningMean,
    service_source: Option<ServiceTimeSource>,
    service_second_moment: RunningMean,
    #[serde(default)]
    arrival_dispersion: RunningMean,
}

impl Estimator {
    /// A fresh estimator that knows only its priors.
    pub fn new(params: EstimatorParams) -> Self {
        Self {
            params,
            arrival_rate: RunningMean::default(),
            window_arrival_rate: 0.0,
            service_time: RunningMean::default(),
            service_source: None,
            service_second_moment: RunningMean::default(),
            arrival_dispersion: RunningMean::default(),
        }
    }

    /// The same estimates under other settings (a resumed autoscaler's current ones).
    #[must_use]
    pub fn with_params(mut self, params: EstimatorParams) -> Self {
        self.params = params;
        self
    }

    /// Folds one window into the estimates and returns them.
    pub fn observe(&mut self, signal: &LoadSignal) -> Estimate {
        if signal.window_s > 0.0 {
            if let Some(before) = self.arrival_rate.get() {
                let expected = before * signal.window_s;
                if expected >= 1.0 {
                    let d = ((signal.requests as f64 - expected).powi(2) / expected)
                        .min(MAX_ARRIVAL_SCV);
                    if self.arrival_dispersion.get().is_none() {
                        // Poisson until shown otherwise: the prior weighs one time constant.
                        self.arrival_dispersion.observe(1.0, 1.0);
                    }
                    let gain = 1.0 - (-signal.window_s / DISPERSION_TAU_S).exp();
                    self.arrival_dispersion.observe(d, gain);
                }
            }
            let rate = signal.arrival_rate();
            self.window_arrival_rate = rate;
            let gain = 1.0 - (-signal.window_s / self.params.arrival_tau_s).exp();
            self.arrival_rate.observe(rate, gain);
        }
        if let Some((s, source)) = self.window_service_time(signal) {
            let gain = 1.0 - (-(signal.completed as f64) / self.params.service_requests).exp();
            self.service_time.observe(s, gain);
            self.service_source = Some(source);
            if source == ServiceTimeSource::Latency && signal.latency_sq_sum_s2 > 0.0 {
                let m2 = signal.latency_sq_sum_s2 / signal.completed as f64;
                self.service_second_moment.observe(m2, gain);
            }
        }
        self.current()
    }

    fn window_service_time(&self, signal: &LoadSignal) -> Option<(f64, ServiceTimeSource)> {
        if signal.completed == 0 {
            return None;
        }
        let n = signal.completed as f64;
        if signal.latency_sum_s > 0.0 {
            return Some((signal.latency_sum_s / n, ServiceTimeSource::Latency));
        }
        let tp = self.params.throughput?;
        if signal.input_tokens + signal.output_tokens == 0 {
            return None;
        }
        let per_request = tp.overhead_s
            + (signal.input_tokens as f64 / tp.prefill_tps
                + signal.output_tokens as f64 / tp.decode_tps)
                / n;
        Some((per_request, ServiceTimeSource::Tokens))
    }

    /// The current estimates without observing anything.
    pub fn current(&self) -> Estimate {
        let (service_time, service_time_source) =
            match (self.service_time.get(), self.service_source) {
                (Some(s), Some(source)) => (s, source),
                _ => (self.params.prior_service_time_s, ServiceTimeSource::Prior),
            };
        let service_scv = match self.service_second_moment.get() {
            Some(m2) if service_time > 0.0 => (m2 / (service_time * service_time) - 1.0).max(0.0),
            _ => 1.0,
        };
        Estimate {
            // A mean of windows capped at MAX_ARRIVAL_SCV (and the prior 1) stays within it.
            arrival_scv: self.arrival_dispersion.get().unwrap_or(1.0).max(1.0),
            arrival_rate: self.arrival_rate.get().unwrap_or(0.0),
            window_arrival_rate: self.window_arrival_rate,
            service_time,
            service_time_source,
            service_scv,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(requests: u64, completed: u64, latency_sum_s: f64) -> LoadSignal {
        LoadSignal {
            window_s: 15.0,
            requests,
            completed,
            latency_sum_s,
            ..LoadSignal::default()
        }
    }

    #[test]
    fn arrival_ema_converges_and_service_from_latency() {
        let mut e = Estimator::new(EstimatorParams::default());
        assert_eq!(e.current().service_time_source, ServiceTimeSource::Prior);
        for _ in 0..200 {
            e.observe(&window(60, 60, 60.0 * 0.8));
        }
        let est = e.current();
        assert!((est.arrival_rate - 4.0).abs() < 1e-9);
        assert!((est.service_time - 0.8).abs() < 1e-9);
        assert_eq!(est.service_time_source, ServiceTimeSource::Latency);
        assert_eq!(est.service_scv, 1.0); // not measured: exponential assumed
    }

    #[test]
    fn service_variability_from_squared_latencies() {
        let mut e = Estimator::new(EstimatorParams::default());
        // Half the requests take 0.2 s, half 1.8 s: mean 1, E[S²] = 1.64, c² = 0.64.
        let mut est = e.current();
        for _ in 0..100 {
            est = e.observe(&LoadSignal {
                window_s: 15.0,
                requests: 20,
                completed: 20,
                latency_sum_s: 20.0,
                latency_sq_sum_s2: 10.0 * (0.04 + 3.24),
                ..LoadSignal::default()
            });
        }
        assert!((est.service_scv - 0.64).abs() < 1e-9, "{}", est.service_scv);
    }

    #[test]
    fn service_from_tokens_when_no_latency() {
        let tp = TokenThroughput {
            prefill_tps: 1000.0,
            decode_tps: 10.0,
            overhead_s: 0.1,
        };
        let mut e = Estimator::new(EstimatorParams {
            throughput: Some(tp),
            ..EstimatorParams::default()
        });
        let est = e.observe(&LoadSignal {
            window_s: 10.0,
            requests: 2,
            completed: 2,
            input_tokens: 2000,
            output_tokens: 20,
            ..LoadSignal::default()
        });
        // 0.1 + (2 + 2) / 2 = 2.1 s per request.
        assert!((est.service_time - 2.1).abs() < 1e-12);
        assert_eq!(est.service_time_source, ServiceTimeSource::Tokens);
    }

    #[test]
    fn running_mean_is_the_plain_mean_early_and_an_ema_later() {
        let mut m = RunningMean::default();
        assert_eq!(m.get(), None);
        m.observe(7.0, 0.3);
        // The first observation, whatever the gain.
        assert!((m.get().expect("seen") - 7.0).abs() < 1e-12);
        // Small gains: the first observations count (almost) equally.
        let mut m = RunningMean::default();
        for x in [1.0, 2.0, 3.0, 4.0] {
            m.observe(x, 1e-6);
        }
        assert!((m.get().expect("seen") - 2.5).abs() < 1e-5);
        // Many observations: the weight is 1 and it is the plain EMA.
        let (mut m, mut ema) = (RunningMean::default(), 0.0);
        for i in 0..500 {
            let x = f64::from(i % 7);
            m.observe(x, 0.2);
            ema = 0.8 * ema + 0.2 * x;
        }
        assert!((m.get().expect("seen") - ema).abs() < 1e-9);
    }

    #[test]
    fn a_short_first_window_does_not_linger() {
        // 5 short requests, then 100 windows of 20 long ones: the estimate is the plain
        // mean while few have been seen, not the first window carried at full weight.
        let mut e = Estimator::new(EstimatorParams::default());
        e.observe(&window(5, 5, 5.0 * 0.5));
        let est = e.observe(&window(20, 20, 20.0 * 4.0));
        let plain = (5.0 * 0.5 + 20.0 * 4.0) / 25.0;
        assert!(
            (est.service_time - plain).abs() < 0.1,
            "{}",
            est.service_time
        );
    }

    #[test]
    fn quiet_windows_move_service_time_less_than_busy_ones() {
        let mut quiet = Estimator::new(EstimatorParams::default());
        let mut busy = quiet.clone();
        quiet.observe(&window(100, 100, 100.0));
        busy.observe(&window(100, 100, 100.0));
        let q = quiet.observe(&window(1, 1, 5.0)).service_time;
        let b = busy.observe(&window(100, 100, 500.0)).service_time;
        assert!(q < b && q > 1.0);
    }
}
