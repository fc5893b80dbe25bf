//! Request traces: a CSV reader for real traces and seeded synthetic generators.
//!
//! A trace is a list of requests, each an arrival time (seconds from the trace's start) with
//! its prompt and generated token counts. The CSV reader takes a timestamp
//! (`YYYY-MM-DD HH:MM:SS[.fraction]`, optionally with `Z` or a UTC offset such as `+00:00` as
//! the Azure 2024 traces write it, or plain seconds), prompt tokens and generated tokens,
//! found by the header's names (Azure's `TIMESTAMP,ContextTokens,GeneratedTokens`,
//! BurstGPT's `Timestamp,Model,Request tokens,Response tokens,...`, `arrival_time`,
//! `input_tokens`, `output_tokens`, ...) or else as the first three columns.
//!
//! Synthetic traces (all non-homogeneous Poisson, token sizes log-normal):
//!
//! | name    | shape                                                                  |
//! | ------- | ---------------------------------------------------------------------- |
//! | diurnal | one compressed day in 2 h: rate 3·(1 − 0.8·cos(2πt / 2 h)) req/s       |
//! | burst   | 0.5 req/s background, bursts of 6–15 req/s lasting 30–120 s, ~6 min apart |
//! | mmpp    | Markov-modulated Poisson, states 0.3 / 2.5 / 9 req/s, dwell 300 / 180 / 60 s |

use std::path::Path;

use crate::error::Error;
use crate::sim::rng::Rng;

/// One request of a trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Request {
    /// Arrival time, seconds from the start of the trace.
    pub arrival_s: f64,
    /// Prompt (context) tokens.
    pub input_tokens: u32,
    /// Generated tokens.
    pub output_tokens: u32,
}

/// A named, time-ordered list of requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// Short name for reports.
    pub name: String,
    /// Requests, ordered by arrival.
    pub requests: Vec<Request>,
}

impl Trace {
    /// Arrival time of the last request, seconds.
    pub fn duration_s(&self) -> f64 {
        self.requests.last().map_or(0.0, |r| r.arrival_s)
    }

    /// Reads a three-column CSV trace (see the module docs).
    pub fn from_csv(path: &Path) -> Result<Self, Error> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| Error::TraceIo {
            path: shown.clone(),
            source,
        })?;
        let name = path
            .file_stem()
            .map_or_else(|| shown.clone(), |s| s.to_string_lossy().into_owned());
        Self::parse_csv(&name, &shown, &text)
    }

    /// Parses CSV text; `origin` names the source in errors.
    pub fn parse_csv(name: &str, origin: &str, text: &str) -> Result<Self, Error> {
        let mut requests = Vec::new();
        let mut first: Option<f64> = None;
        let mut columns = Columns::POSITIONAL;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let err = |message: String| Error::TraceParse {
                path: origin.to_owned(),
                line: i + 1,
                message,
            };
            let cols: Vec<&str> = line.split(',').map(str::trim).collect();
            if cols.len() < 3 {
                return Err(err(format!("expected 3 columns, found {}", cols.len())));
            }
            if i == 0 && parse_time(cols[0]).is_none() {
                columns = Columns::from_header(&cols);
                continue;
            }
            let col = |k: usize| {
                cols.get(k)
                    .copied()
                    .ok_or_else(|| err(format!("no column {}", k + 1)))
            };
            let raw_t = col(columns.time)?;
            let Some(t) = parse_time(raw_t) else {
                return Err(err(format!("bad timestamp {raw_t:?}")));
            };
            let tokens = |s: &str| match s.parse::<u32>() {
                Ok(n) => Ok(n),
                // Some traces write counts as floats ("12.0").
                Err(e) => s
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .map(|x| x.round().min(f64::from(u32::MAX)) as u32)
                    .ok_or_else(|| err(format!("bad token count {s:?}: {e}"))),
            };
            let input_tokens = tokens(col(columns.input)?)?;
            let output_tokens = tokens(col(columns.output)?)?;
            let t0 = *first.get_or_insert(t);
            requests.push(Request {
                arrival_s: t - t0,
                input_tokens,
                output_tokens,
            });
        }
        requests.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
        // Re-base in case the file was not sorted.
        if let Some(t0) = requests.first().map(|r| r.arrival_s) {
            for r in &mut requests {
                r.arrival_s -= t0;
            }
        }
        Ok(Self {
            name: name.to_owned(),
            requests,
        })
    }

    /// The synthetic trace called `kind` (`diurnal`, `burst` or `mmpp`) for `seed`.
    pub fn synthetic(kind: &str, seed: u64) -> Option<Self> {
        let mut rng = Rng::seeded(seed ^ fnv1a(kind));
        let arrivals = match kind {
            "diurnal" => diurnal(&mut rng),
            "burst" => burst(&mut rng),
            "mmpp" => mmpp(&mut rng),
            _ => return None,
        };
        let requests = arrivals
            .into_iter()
            .map(|arrival_s| Request {
                arrival_s,
                input_tokens: rng.lognormal(1500.0, 1.0).clamp(16.0, 8000.0) as u32,
                output_tokens: rng.lognormal(14.0, 1.1).clamp(1.0, 2000.0) as u32,
            })
            .collect();
        Some(Self {
            name: format!("synthetic-{kind}"),
            requests,
        })
    }

    /// A ramp up and back down, for checking that a closed loop follows load both ways:
    /// Poisson arrivals whose rate rises linearly from `base_rps` to `peak_rps` over
    /// `ramp_s`, stays at the peak for `hold_s`, falls back over `ramp_s`, and stays at
    /// `base_rps` for `tail_s` (so the scale-down can be seen). Token sizes as in
    /// [`Trace::synthetic`]. Named `ramp`.
    pub fn ramp(
        seed: u64,
        base_rps: f64,
        peak_rps: f64,
        ramp_s: f64,
        hold_s: f64,
        tail_s: f64,
    ) -> Self {
        let mut rng = Rng::seeded(seed ^ fnv1a("ramp"));
        let end = 2.0 * ramp_s + hold_s + tail_s;
        let rate = |t: f64| {
            let up = if ramp_s > 0.0 {
                (t / ramp_s).min(1.0)
            } else {
                1.0
            };
            let down = if ramp_s > 0.0 {
                ((t - ramp_s - hold_s) / ramp_s).clamp(0.0, 1.0)
            } else if t >= hold_s {
                1.0
            } else {
                0.0
            };
            base_rps + (peak_rps - base_rps) * (up - down).max(0.0)
        };
        let arrivals = thinning(&mut rng, end, base_rps.max(peak_rps), rate);
        let requests = arrivals
            .into_iter()
            .map(|arrival_s| Request {
                arrival_s,
                input_tokens: rng.lognormal(1500.0, 1.0).clamp(16.0, 8000.0) as u32,
                output_tokens: rng.lognormal(14.0, 1.1).clamp(1.0, 2000.0) as u32,
            })
            .collect();
        Self {
            name: "ramp".to_owned(),
            requests,
        }
    }

    /// The requests arriving in `[from_s, to_s)`, re-based to start at `from_s` (so a
    /// window's first minute is minute 0 of its own). Named `<trace>@<from>-<to>s`.
    pub fn window(&self, from_s: f64, to_s: f64) -> Self {
        let requests = self
            .requests
            .iter()
            .filter(|r| r.arrival_s >= from_s && r.arrival_s < to_s)
            .map(|r| Request {
                arrival_s: r.arrival_s - from_s,
                ..*r
            })
            .collect();
        Self {
            name: format!("{}@{from_s}-{to_s}s", self.name),
            requests,
        }
    }

    /// The same requests `factor` times faster (every arrival time divided by `factor`).
    /// Pair it with [`crate::sim::ServiceModel::compressed`] and a `SimConfig` whose times
    /// are divided by the same factor. Named `<trace>/<factor>`.
    pub fn compressed(&self, factor: f64) -> Self {
        let requests = self
            .requests
            .iter()
            .map(|r| Request {
                arrival_s: r.arrival_s / factor,
                ..*r
            })
            .collect();
        Self {
            name: format!("{}/{factor}", self.name),
            requests,
        }
    }

    /// The names [`Trace::synthetic`] accepts.
    pub const SYNTHETIC: [&'static str; 3] = ["diurnal", "burst", "mmpp"];

    /// The names [`Trace::variant`] accepts.
    pub const VARIANTS: [&'static str; 3] = ["fast", "heavy", "bursty"];

    /// A robustness variant of this trace, derived deterministically from it and `seed`
    /// (named `<trace>+<kind>`):
    ///
    /// - `fast`: every gap between arrivals × 2/3 — the same requests at 1.5× the rate;
    /// - `heavy`: each request's generated tokens × a Pareto(α = 1.5) factor with mean 1
    ///   (capped at 20×): the same arrivals with heavier-tailed service times;
    /// - `bursty`: arrival times warped piecewise-linearly — stretches of 60–600 s in which
    ///   time runs 3× faster (a quarter of the trace's time) alternate with stretches in which
    ///   it runs 1.22× slower, so the same requests come in bursts of 3× the local rate.
    pub fn variant(&self, kind: &str, seed: u64) -> Option<Self> {
        let mut rng = Rng::seeded(seed ^ fnv1a(kind) ^ fnv1a(&self.name));
        let mut requests = self.requests.clone();
        match kind {
            "fast" => {
                for r in &mut requests {
                    r.arrival_s *= 2.0 / 3.0;
                }
            }
            "heavy" => {
                // Pareto(α, x_m) has mean α·x_m/(α − 1): x_m = 1/3 gives mean 1 for α = 1.5.
                for r in &mut requests {
                    let factor = ((1.0 / 3.0) / rng.uniform().powf(1.0 / 1.5)).min(20.0);
                    r.output_tokens = (f64::from(r.output_tokens) * factor).round().max(1.0) as u32;
                }
            }
            "bursty" => {
                let warp = BurstWarp::new(&mut rng, self.duration_s());
                for r in &mut requests {
                    r.arrival_s = warp.apply(r.arrival_s);
                }
            }
            _ => return None,
        }
        Some(Self {
            name: format!("{}+{kind}", self.name),
            requests,
        })
    }
}

/// A monotone piecewise-linear time warp for [`Trace::variant`]`("bursty")`.
struct BurstWarp {
    /// `(original start, warped start, slope)` of each segment.
    segments: Vec<(f64, f64, f64)>,
}

impl BurstWarp {
    /// Slope in burst segments (time runs 3× faster: 3× the arrival rate).
    const BURST: f64 = 1.0 / 3.0;
    /// Slope elsewhere, so that with bursts a quarter of the time the length is kept:
    /// `0.25 · (1/3) + 0.75 · s = 1`.
    const CALM: f64 = (1.0 - 0.25 / 3.0) / 0.75;

    fn new(rng: &mut Rng, end: f64) -> Self {
        let mut segments = Vec::new();
        let (mut t, mut w) = (0.0, 0.0);
        while t <= end {
            let burst = rng.uniform() < 0.25;
            let slope = if burst { Self::BURST } else { Self::CALM };
            let len = rng.range(60.0, 600.0);
            segments.push((t, w, slope));
            t += len;
            w += len * slope;
        }
        Self { segments }
    }

    fn apply(&self, t: f64) -> f64 {
        let i = self
            .segments
            .partition_point(|s| s.0 <= t)
            .saturating_sub(1);
        let (t0, w0, slope) = self.segments[i];
        w0 + (t - t0) * slope
    }
}

/// Which CSV columns hold the arrival time, the prompt tokens and the generated tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Columns {
    time: usize,
    input: usize,
    output: usize,
}

impl Columns {
    /// The Azure layout: time, prompt tokens, generated tokens.
    const POSITIONAL: Self = Self {
        time: 0,
        input: 1,
        output: 2,
    };

    /// Finds the columns by name (case-insensitive): a time column (`TIMESTAMP`,
    /// `Timestamp`, `arrival_time`), prompt tokens (`ContextTokens`, `Request tokens`,
    /// `input_tokens`, `prompt_tokens`) and generated tokens (`GeneratedTokens`,
    /// `Response tokens`, `output_tokens`, `completion_tokens`); positional when any is
    /// missing.
    fn from_header(cols: &[&str]) -> Self {
        let find = |keys: &[&str]| {
            cols.iter().position(|c| {
                let c = c.to_ascii_lowercase();
                keys.iter().any(|k| c.contains(k))
            })
        };
        match (
            find(&["time"]),
            find(&["context", "request", "input", "prompt"]),
            find(&["generated", "response", "output", "completion"]),
        ) {
            (Some(time), Some(input), Some(output)) => Self {
                time,
                input,
                output,
            },
            _ => Self::POSITIONAL,
        }
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Non-homogeneous Poisson arrivals on `[0, end)` by thinning against `rate_max`.
fn thinning(rng: &mut Rng, end: f64, rate_max: f64, rate: impl Fn(f64) -> f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut t = 0.0;
    loop {
        t += rng.exponential(1.0 / rate_max);
        if t >= end {
            return out;
        }
        if rng.uniform() * rate_max < rate(t) {
            out.push(t);
        }
    }
}

fn diurnal(rng: &mut Rng) -> Vec<f64> {
    let period = 7200.0;
    let mean = 3.0;
    thinning(rng, period, mean * 1.8, |t| {
        mean * (1.0 - 0.8 * (std::f64::consts::TAU * t / period).cos())
    })
}

fn burst(rng: &mut Rng) -> Vec<f64> {
    let end = 3600.0;
    let mut bursts = Vec::new();
    let mut t = rng.exponential(360.0);
    while t < end {
        let len = rng.range(30.0, 120.0);
        let rate = rng.range(6.0, 15.0);
        bursts.push((t, t + len, rate));
        t += len + rng.exponential(360.0);
    }
    thinning(rng, end, 15.5, move |t| {
        0.5 + bursts
            .iter()
            .filter(|(a, b, _)| (*a..*b).contains(&t))
            .map(|(_, _, r)| r)
            .sum::<f64>()
    })
}

fn mmpp(rng: &mut Rng) -> Vec<f64> {
    let end = 3600.0;
    let rates = [0.3, 2.5, 9.0];
    let dwell = [300.0, 180.0, 60.0];
    let mut state = 0usize;
    let mut t = 0.0;
    let mut out = Vec::new();
    while t < end {
        let stay_until = (t + rng.exponential(dwell[state])).min(end);
        loop {
            t += rng.exponential(1.0 / rates[state]);
            if t >= stay_until {
                break;
            }
            out.push(t);
        }
        // Memorylessness: restarting the arrival clock at the switch is exact.
        t = stay_until;
        let hop = 1 + (rng.next_u64() % 2) as usize;
        state = (state + hop) % rates.len();
    }
    out
}

/// Seconds since 1970-01-01 for `YYYY-MM-DD HH:MM:SS[.frac]` (UTC, no zone), or a plain
/// number of seconds.
fn parse_time(s: &str) -> Option<f64> {
    if let Ok(x) = s.parse::<f64>() {
        return x.is_finite().then_some(x);
    }
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.splitn(3, '-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: i64 = d.next()?.parse().ok()?;
    let day: i64 = d.next()?.parse().ok()?;
    let (time, offset_s) = split_offset(time)?;
    let mut tm = time.splitn(3, ':');
    let hour: f64 = tm.next()?.parse().ok()?;
    let minute: f64 = tm.next()?.parse().ok()?;
    let second: f64 = tm.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some(
        days_from_civil(year, month, day) as f64 * 86_400.0
            + hour * 3600.0
            + minute * 60.0
            + second
            - offset_s,
    )
}

/// Splits a time of day from its zone: none (read as UTC), `Z`, or an offset `±HH:MM` / `±HHMM`
/// / `±HH`. Returns the time and the offset in seconds east of UTC; `None` for a malformed
/// offset.
fn split_offset(time: &str) -> Option<(&str, f64)> {
    if let Some(t) = time.strip_suffix(['Z', 'z']) {
        return Some((t, 0.0));
    }
    let Some(at) = time.rfind(['+', '-']) else {
        return Some((time, 0.0));
    };
    let (t, zone) = time.split_at(at);
    let sign = if zone.starts_with('-') { -1.0 } else { 1.0 };
    let digits: String = zone[1..].chars().filter(|c| *c != ':').collect();
    if !matches!(digits.len(), 2 | 4) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let hours: f64 = digits[..2].parse().ok()?;
    let minutes: f64 = if digits.len() == 4 {
        digits[2..].parse().ok()?
    } else {
        0.0
    };
    if hours > 23.0 || minutes > 59.0 {
        return None;
    }
    Some((t, sign * (hours * 3600.0 + minutes * 60.0)))
}

/// Days since 1970-01-01 in the proleptic Gregorian calendar (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_azure_layout_and_rebases_time() {
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n\
                    2023-11-16 18:17:03.9799600,4808,10\n\
                    2023-11-16 18:17:04.0319600,3180,8\n\
                    2023-11-16 18:18:03.9799600,110,27\n";
        let t = Trace::parse_csv("x", "x.csv", text).expect("parses");
        assert_eq!(t.requests.len(), 3);
        assert_eq!(t.requests[0].arrival_s, 0.0);
        assert!((t.requests[1].arrival_s - 0.052).abs() < 1e-6);
        assert!((t.requests[2].arrival_s - 60.0).abs() < 1e-6);
        assert_eq!(t.requests[2].input_tokens, 110);
        assert_eq!(t.requests[2].output_tokens, 27);
    }

    #[test]
    fn finds_columns_by_header_name() {
        // BurstGPT's layout: seconds, a model column first, float-free counts.
        let text = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n\
                    5,ChatGPT,472,18,490,Conversation log\n\
                    45,GPT-4,1087,0,1087,API log\n";
        let t = Trace::parse_csv("b", "b.csv", text).expect("parses");
        assert_eq!(
            t.requests,
            vec![
                Request {
                    arrival_s: 0.0,
                    input_tokens: 472,
                    output_tokens: 18
                },
                Request {
                    arrival_s: 40.0,
                    input_tokens: 1087,
                    output_tokens: 0
                },
            ]
        );
        // Reordered named columns and float counts.
        let text = "prompt_tokens,arrival_time,output_tokens\n10.0,1.5,3\n";
        let t = Trace::parse_csv("c", "c.csv", text).expect("parses");
        assert_eq!(t.requests[0].input_tokens, 10);
        assert_eq!(t.requests[0].output_tokens, 3);
        // Unknown names: positional, as before.
        assert_eq!(Columns::from_header(&["a", "b", "c"]), Columns::POSITIONAL);
    }

    #[test]
    fn timestamps_with_a_zone_are_read_as_utc() {
        let utc = parse_time("2024-05-10 00:00:00.009930").expect("no zone");
        assert_eq!(parse_time("2024-05-10 00:00:00.009930+00:00"), Some(utc));
        assert_eq!(parse_time("2024-05-10T00:00:00.009930Z"), Some(utc));
        assert_eq!(parse_time("2024-05-10 02:00:00.009930+02:00"), Some(utc));
        assert_eq!(parse_time("2024-05-09 18:30:00.009930-0530"), Some(utc));
        assert_eq!(parse_time("2024-05-10 01:00:00.009930+01"), Some(utc));
        for bad in [
            "2024-05-10 00:00:00+0:00",
            "2024-05-10 00:00:00+24:00",
            "2024-05-10 00:00:00+00:60",
            "2024-05-10 00:00:00+ab:cd",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
        // The Azure 2024 layout, header and all, across a day boundary in another zone.
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n\
                    2024-05-10 23:59:59.500000+00:00,100,10\n\
                    2024-05-11 02:00:00.500000+02:00,200,20\n";
        let t = Trace::parse_csv("x", "x.csv", text).expect("parses");
        assert_eq!(t.requests.len(), 2);
        assert!(
            (t.requests[1].arrival_s - 1.0).abs() < 1e-6,
            "{:?}",
            t.requests
        );
    }

    #[test]
    fn civil_days_and_errors() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        let err = Trace::parse_csv("x", "x.csv", "t,a,b\n1.0,5,x\n").expect_err("bad tokens");
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn synthetic_traces_are_seeded_and_plausible() {
        for kind in Trace::SYNTHETIC {
            let a = Trace::synthetic(kind, 42).expect("known kind");
            let b = Trace::synthetic(kind, 42).expect("known kind");
            let c = Trace::synthetic(kind, 43).expect("known kind");
            assert_eq!(a, b);
            assert_ne!(a, c);
            assert!(a.requests.len() > 1_000, "{kind}: {}", a.requests.len());
            assert!(
                a.requests
                    .windows(2)
                    .all(|w| w[0].arrival_s <= w[1].arrival_s)
            );
        }
        assert!(Trace::synthetic("nope", 1).is_none());
    }

    #[test]
    fn variants_keep_the_requests_and_change_what_they_say() {
        let base = Trace::synthetic("mmpp", 3).expect("kind");
        let mean_out = |t: &Trace| {
            t.requests
                .iter()
                .map(|r| f64::from(r.output_tokens))
                .sum::<f64>()
                / t.requests.len() as f64
        };
        for kind in Trace::VARIANTS {
            let v = base.variant(kind, 1).expect("known kind");
            assert_eq!(v, base.variant(kind, 1).expect("known kind"), "{kind}");
            assert_eq!(v.requests.len(), base.requests.len(), "{kind}");
            assert_eq!(v.name, format!("synthetic-mmpp+{kind}"));
            assert!(
                v.requests
                    .windows(2)
                    .all(|w| w[0].arrival_s <= w[1].arrival_s),
                "{kind}: the warp must keep arrival order"
            );
            match kind {
                "fast" => {
                    let ratio = v.duration_s() / base.duration_s();
                    assert!((ratio - 2.0 / 3.0).abs() < 1e-9, "{ratio}");
                }
                "heavy" => {
                    // Mean about kept (Pareto mean 1, capped), tail heavier.
                    let r = mean_out(&v) / mean_out(&base);
                    assert!((0.8..1.2).contains(&r), "{r}");
                    let max = |t: &Trace| t.requests.iter().map(|r| r.output_tokens).max();
                    assert!(max(&v) > max(&base));
                }
                _ => {
                    // Same order of length, but some minutes far busier than any before.
                    let ratio = v.duration_s() / base.duration_s();
                    assert!((0.6..1.5).contains(&ratio), "{ratio}");
                }
            }
        }
        assert!(base.variant("nope", 1).is_none());
    }

    #[test]
    fn a_window_is_rebased_and_compression_divides_arrivals_only() {
        let text = "t,in,out\n0,10,1\n30,20,2\n60,30,3\n90,40,4\n";
        let t = Trace::parse_csv("w", "w.csv", text).expect("parses");
        let w = t.window(30.0, 90.0);
        let got: Vec<(f64, u32)> = w
            .requests
            .iter()
            .map(|r| (r.arrival_s, r.input_tokens))
            .collect();
        assert_eq!(got, vec![(0.0, 20), (30.0, 30)]);
        assert_eq!(w.name, "w@30-90s");
        let c = w.compressed(5.0);
        assert_eq!(c.requests[1].arrival_s, 6.0);
        assert_eq!(c.requests[1].output_tokens, 3);
        let s = crate::sim::ServiceModel::default();
        let fast = s.compressed(5.0);
        assert!(
            (fast.service_time(&c.requests[1]) * 5.0 - s.service_time(&w.requests[1])).abs()
                < 1e-12
        );
    }

    #[test]
    fn the_ramp_rises_holds_and_falls_back() {
        let t = Trace::ramp(7, 0.5, 8.0, 300.0, 120.0, 300.0);
        let count = |a: f64, b: f64| {
            t.requests
                .iter()
                .filter(|r| r.arrival_s >= a && r.arrival_s < b)
                .count()
        };
        // Expected: 60 s at the start ≈ 30 + a little; the held peak ≈ 8/s.
        let start = count(0.0, 60.0);
        let peak = count(300.0, 420.0) as f64 / 120.0;
        let tail = count(720.0, 1020.0) as f64 / 300.0;
        assert!(start < 120, "{start}");
        assert!((6.0..10.0).contains(&peak), "{peak}");
        assert!((0.2..1.0).contains(&tail), "{tail}");
        assert!(t.duration_s() < 1020.0);
        assert_eq!(t, Trace::ramp(7, 0.5, 8.0, 300.0, 120.0, 300.0), "seeded");
    }
}
