//! Erlang-B and Erlang-C for an M/M/n queue, and the queue-sizing floor built on them.
//!
//! An agent's replicas are modelled as an M/M/n queue: Poisson arrivals at rate `λ`,
//! exponential service with mean `S`, and `n = replicas × slots_per_replica` servers. The
//! offered load is `A = λ·S` Erlangs and the utilisation is `ρ = A / n`.
//!
//! ```text
//!   Erlang-B  B(0, A) = 1,   B(n, A) = A·B(n−1, A) / (n + A·B(n−1, A))
//!   Erlang-C  C(n, A) = n·B / (n − A·(1 − B))                 (probability of waiting)
//!   P(W > t) = C · exp(−(n − A)·t / S)
//!   t_q      = S · ln(C / (1 − q)) / (n − A)    when C > 1 − q, else 0
//! ```
//!
//! Real traffic is neither Poisson nor exponential: LLM generation lengths are heavy-tailed
//! (on the Azure code trace the squared coefficient of variation `c_s²` of service time is
//! about 2) and requests arrive in bursts. [`SizingRequest`] therefore applies the
//! Allen–Cunneen approximation for G/G/n: waiting is scaled by `(c_a² + c_s²)/2`, i.e. the
//! tail uses `S·(c_a² + c_s²)/2` in place of `S`, which leaves the exact M/M/n result when
//! both are 1. The free functions are the exact M/M/n formulas.
//!
//! The recurrence never forms `A^n` or `n!`, so it is stable for any `n` (every step is a
//! convex-ish ratio in `[0, 1]`), unlike the textbook closed form that overflows `f64` near
//! `n = 170`.

use serde::{Deserialize, Serialize};

/// Erlang-B blocking probability for `servers` servers offered `load` Erlangs.
pub fn erlang_b(servers: u32, load: f64) -> f64 {
    if load <= 0.0 {
        return if servers == 0 { 1.0 } else { 0.0 };
    }
    let mut b = 1.0;
    for n in 1..=servers {
        b = load * b / (f64::from(n) + load * b);
    }
    b
}

/// Converts an Erlang-B value into Erlang-C for the same `servers` and `load`.
fn c_from_b(servers: u32, load: f64, b: f64) -> f64 {
    let n = f64::from(servers);
    if load >= n {
        return 1.0;
    }
    (n * b / (n - load * (1.0 - b))).clamp(0.0, 1.0)
}

/// Erlang-C: the probability that an arriving request has to wait (all servers busy).
///
/// Returns 1 when the queue is unstable (`load ≥ servers`) and 0 for no load.
pub fn erlang_c(servers: u32, load: f64) -> f64 {
    if load <= 0.0 {
        return 0.0;
    }
    c_from_b(servers, load, erlang_b(servers, load))
}

/// Waiting-time quantile `q` (e.g. 0.95) of an M/M/n queue, in the unit of `service_time`.
///
/// Infinite when the queue is unstable.
pub fn wait_quantile(servers: u32, load: f64, service_time: f64, q: f64) -> f64 {
    let n = f64::from(servers);
    if load <= 0.0 {
        return 0.0;
    }
    if load >= n {
        return f64::INFINITY;
    }
    quantile_from_c(erlang_c(servers, load), n, load, service_time, q)
}

fn quantile_from_c(c: f64, n: f64, load: f64, service_time: f64, q: f64) -> f64 {
    let tail = 1.0 - q;
    if c <= tail {
        0.0
    } else {
        service_time * (c / tail).ln() / (n - load)
    }
}

/// Mean waiting time of an M/M/n queue, in the unit of `service_time`.
pub fn mean_wait(servers: u32, load: f64, service_time: f64) -> f64 {
    let n = f64::from(servers);
    if load <= 0.0 {
        return 0.0;
    }
    if load >= n {
        return f64::INFINITY;
    }
    erlang_c(servers, load) * service_time / (n - load)
}

/// What a queue-sizing question asks: how many replicas for this traffic and this target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SizingRequest {
    /// Arrival rate `λ`, requests per second.
    pub arrival_rate: f64,
    /// Mean service time `S`, seconds.
    pub service_time: f64,
    /// Squared coefficient of variation of service time (1 for exponential).
    pub service_scv: f64,
    /// Squared coefficient of variation of arrivals (1 for Poisson): the
    /// [`crate::estimate::Estimate::arrival_scv`] the signal shows.
    pub arrival_scv: f64,
    /// Concurrent requests one replica serves (servers per replica).
    pub slots_per_replica: u32,
    /// Highest allowed utilisation `ρ` (e.g. 0.7).
    pub rho_max: f64,
    /// Target for the waiting-time quantile, seconds.
    pub wait_target: f64,
    /// The quantile the target applies to (0.95 for P95).
    pub quantile: f64,
}

/// The answer to a [`SizingRequest`] at one replica count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sizing {
    /// Replica count this sizing describes.
    pub replicas: u32,
    /// Utilisation `ρ = λS / (replicas × slots)`.
    pub utilisation: f64,
    /// Erlang-C probability of waiting.
    pub p_wait: f64,
    /// Waiting-time quantile (P95 by default), seconds; infinite when unstable.
    pub wait_quantile: f64,
    /// Whether both `ρ ≤ ρmax` and the wait target hold.
    pub meets_target: bool,
}

impl SizingRequest {
    /// Offered load in Erlangs (`λ·S`).
    pub fn load(&self) -> f64 {
        (self.arrival_rate * self.service_time).max(0.0)
    }

    /// Evaluates the queue at `replicas` replicas.
    pub fn at(&self, replicas: u32) -> Sizing {
        let servers = replicas.saturating_mul(self.slots_per_replica.max(1));
        let b = erlang_b(servers, self.load());
        self.sizing_from_b(replicas, servers, b)
    }

    fn sizing_from_b(&self, replicas: u32, servers: u32, b: f64) -> Sizing {
        let load = self.load();
        let n = f64::from(servers);
        if load <= 0.0 {
            return Sizing {
                replicas,
                utilisation: 0.0,
                p_wait: 0.0,
                wait_quantile: 0.0,
                meets_target: true,
            };
        }
        if servers == 0 {
            return Sizing {
                replicas,
                utilisation: f64::INFINITY,
                p_wait: 1.0,
                wait_quantile: f64::INFINITY,
                meets_target: false,
            };
        }
        let utilisation = load / n;
        let (p_wait, wait_quantile) = if load >= n {
            (1.0, f64::INFINITY)
        } else {
            let c = c_from_b(servers, load, b);
            let wait_scale =
                self.service_time * (self.arrival_scv.max(0.0) + self.service_scv.max(0.0)) / 2.0;
            (c, quantile_from_c(c, n, load, wait_scale, self.quantile))
        };
        Sizing {
            replicas,
            utilisation,
            p_wait,
            wait_quantile,
            meets_target: utilisation <= self.rho_max && wait_quantile <= self.wait_target,
        }
    }

    /// The smallest replica count in `0..=limit` meeting `ρ ≤ ρmax` and the wait target.
    ///
    /// `Ok` carries the smallest meeting sizing; `Err` carries the sizing at `limit` when no
    /// count up to `limit` meets the target. Zero replicas meet it only with no traffic. The
    /// Erlang-B recurrence is extended server by server, so the whole search costs
    /// `O(limit × slots)`.
    pub fn smallest(&self, limit: u32) -> Result<Sizing, Sizing> {
        let load = self.load();
        if load <= 0.0 {
            return Ok(self.at(0));
        }
        let slots = self.slots_per_replica.max(1);
        // No count below the utilisation bound can meet ρ ≤ ρmax: start there.
        let by_rho = (load / (f64::from(slots) * self.rho_max)).ceil();
        let start = if by_rho.is_finite() && by_rho >= 1.0 {
            by_rho.min(f64::from(limit)) as u32
        } else {
            1
        };
        let start = start.max(1).min(limit.max(1));
        let mut servers = start.saturating_mul(slots);
        let mut b = erlang_b(servers, load);
        let mut replicas = start;
        loop {
            let sizing = self.sizing_from_b(replicas, servers, b);
            if sizing.meets_target && replicas <= limit {
                return Ok(sizing);
            }
            if replicas >= limit {
                return Err(self.at(limit));
            }
            for _ in 0..slots {
                servers += 1;
                b = load * b / (f64::from(servers) + load * b);
            }
            replicas += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Textbook closed form, only usable for small `n`: an independent check on the recurrence.
    fn erlang_c_direct(n: u32, a: f64) -> f64 {
        let mut sum = 0.0;
        let mut term = 1.0; // a^k / k!
        for k in 0..n {
            if k > 0 {
                term *= a / f64::from(k);
            }
            sum += term;
        }
        let an_over_nfact = term * a / f64::from(n);
        let top = an_over_nfact * f64::from(n) / (f64::from(n) - a);
        top / (sum + top)
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn erlang_b_matches_published_table() {
        // Erlang-B table (offered traffic for a given grade of service): N=10 at 1% blocking
        // carries 4.46 E; N=50 → 37.90 E; N=100 → 84.06 E; N=5 at 5% → 2.22 E.
        let cases = [
            (10, 4.46, 0.01),
            (50, 37.90, 0.01),
            (100, 84.06, 0.01),
            (5, 2.22, 0.05),
        ];
        for (n, a, gos) in cases {
            let b = erlang_b(n, a);
            assert!(close(b, gos, gos * 0.03), "B({n}, {a}) = {b}, table {gos}");
        }
    }

    #[test]
    fn erlang_c_matches_published_values() {
        // Exact: C(3, 2) = 4/9. Call-centre example (10 Erlangs): 11 agents wait 68.21 %,
        // 12 agents 44.94 %, 13 agents 28.53 %, 14 agents 17.41 %.
        assert!(close(erlang_c(3, 2.0), 4.0 / 9.0, 1e-12));
        let cases = [(11, 0.6821), (12, 0.4494), (13, 0.2853), (14, 0.1741)];
        for (n, expected) in cases {
            let c = erlang_c(n, 10.0);
            assert!(
                close(c, expected, 6e-4),
                "C({n}, 10) = {c}, published {expected}"
            );
        }
        // M/M/1: P(wait) = ρ.
        assert!(close(erlang_c(1, 0.6), 0.6, 1e-12));
    }

    #[test]
    fn recurrence_agrees_with_direct_summation_for_small_n() {
        for n in 1..=40u32 {
            for step in 1..20 {
                let a = f64::from(n) * f64::from(step) / 20.0;
                let r = erlang_c(n, a);
                let d = erlang_c_direct(n, a);
                assert!(close(r, d, 1e-10), "n={n} a={a}: recurrence {r} direct {d}");
            }
        }
    }

    #[test]
    fn stable_for_large_server_counts() {
        for &(n, a) in &[(1_000u32, 950.0), (10_000, 9_900.0), (100_000, 99_000.0)] {
            let c = erlang_c(n, a);
            assert!(
                c.is_finite() && (0.0..=1.0).contains(&c),
                "C({n},{a}) = {c}"
            );
            let w = wait_quantile(n, a, 1.0, 0.95);
            assert!(w.is_finite() && w >= 0.0);
        }
        // Square-root staffing: with n = A + β√A the waiting probability depends on β only
        // (Halfin–Whitt): 1 / (1 + βΦ(β)/φ(β)) = 0.2234 at β = 1 as A grows.
        let a: f64 = 40_000.0;
        let c = erlang_c((a + a.sqrt()) as u32, a);
        assert!(close(c, 0.2234, 0.005), "Halfin-Whitt C = {c}");
    }

    #[test]
    fn monotonic_in_load_and_servers() {
        for n in [1u32, 2, 5, 17, 64, 300] {
            let mut prev_c = 0.0;
            let mut prev_w = 0.0;
            for i in 1..200 {
                let a = f64::from(n) * f64::from(i) / 200.0;
                let c = erlang_c(n, a);
                let w = wait_quantile(n, a, 1.0, 0.95);
                assert!(
                    c >= prev_c - 1e-15,
                    "C not monotonic in load at n={n} a={a}"
                );
                assert!(
                    w >= prev_w - 1e-12,
                    "P95 not monotonic in load at n={n} a={a}"
                );
                prev_c = c;
                prev_w = w;
            }
        }
        for a in [0.5, 3.0, 20.0] {
            let mut prev = 1.0;
            for n in (a as u32 + 1)..(a as u32 + 40) {
                let c = erlang_c(n, a);
                assert!(c <= prev + 1e-15);
                prev = c;
            }
        }
    }

    #[test]
    fn p95_wait_matches_exponential_tail() {
        // M/M/1, ρ=0.5, S=1: P(W>t) = 0.5·e^{-0.5t}; P95 = 2·ln(10) s.
        let w = wait_quantile(1, 0.5, 1.0, 0.95);
        assert!(close(w, 2.0 * 10f64.ln(), 1e-12));
        // Few waits at all: P95 is zero.
        assert_eq!(wait_quantile(10, 1.0, 1.0, 0.95), 0.0);
    }

    #[test]
    fn smallest_meets_targets_and_is_minimal() {
        let mut checked = 0;
        for lambda in [0.1, 0.7, 2.0, 5.5, 13.0, 40.0, 250.0] {
            for s in [0.2, 1.0, 3.0] {
                for slots in [1u32, 4] {
                    for target in [0.05, 0.5, 2.0] {
                        let req = SizingRequest {
                            arrival_rate: lambda,
                            service_time: s,
                            service_scv: 1.0,
                            arrival_scv: 1.0,
                            slots_per_replica: slots,
                            rho_max: 0.7,
                            wait_target: target,
                            quantile: 0.95,
                        };
                        match req.smallest(10_000) {
                            Ok(sz) => {
                                assert!(sz.utilisation <= 0.7 + 1e-12);
                                assert!(sz.wait_quantile <= target);
                                assert_eq!(sz, req.at(sz.replicas));
                                if sz.replicas > 1 {
                                    assert!(!req.at(sz.replicas - 1).meets_target);
                                }
                                checked += 1;
                            }
                            Err(sz) => panic!("reachable target not met: {req:?} {sz:?}"),
                        }
                    }
                }
            }
        }
        assert!(checked > 100);
    }

    #[test]
    fn variable_service_needs_more_replicas() {
        let base = SizingRequest {
            arrival_rate: 8.0,
            service_time: 1.0,
            service_scv: 1.0,
            arrival_scv: 1.0,
            slots_per_replica: 1,
            rho_max: 0.9,
            wait_target: 0.5,
            quantile: 0.95,
        };
        let heavy = SizingRequest {
            service_scv: 3.0,
            arrival_scv: 1.0,
            ..base
        };
        let k = base.smallest(100).expect("reachable").replicas;
        let k_heavy = heavy.smallest(100).expect("reachable").replicas;
        assert!(k_heavy > k, "{k_heavy} vs {k}");
        // c² = 1 is exactly M/M/n.
        let at = base.at(k);
        assert_eq!(at.wait_quantile, wait_quantile(k, 8.0, 1.0, 0.95));
        // c² = 3 doubles the waiting-time scale.
        let w = heavy.at(k_heavy).wait_quantile;
        assert!((w - 2.0 * wait_quantile(k_heavy, 8.0, 1.0, 0.95)).abs() < 1e-12);
    }

    #[test]
    fn smallest_reports_unreachable_targets() {
        let req = SizingRequest {
            arrival_rate: 100.0,
            service_time: 1.0,
            service_scv: 1.0,
            arrival_scv: 1.0,
            slots_per_replica: 1,
            rho_max: 0.7,
            wait_target: 1.0,
            quantile: 0.95,
        };
        let err = req
            .smallest(50)
            .expect_err("100 Erlangs cannot fit 50 servers");
        assert_eq!(err.replicas, 50);
        assert!(!err.meets_target);
        let ok = req.smallest(1_000).expect("reachable");
        assert!(ok.replicas >= 143); // 100 / 0.7
    }
}
