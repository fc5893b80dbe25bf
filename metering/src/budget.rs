//! Budget definitions (the Budget CRD's spec) and the reserve → settle/release arithmetic.
//!
//! A [`Ledger`] is one Budget's state in one process: settled spend by minute, what in-flight
//! requests have reserved, and this minute's rate counters. A request first reserves its worst
//! case (every prompt token at the dearest input price plus `max_tokens` of output); it fits
//! only if `spent + reserved + worst case ≤ cap` for every cap. When the provider answers, the
//! reservation is replaced by the actual usage (`settle`), or dropped when nothing was spent
//! (`release`). Because every reservation was counted before the request left, the settled
//! spend can pass a cap only by what a provider returned beyond the worst case it was asked for.
//!
//! ```text
//!   reserve(worst) ──fits──► reserved += worst ──► settle(actual): reserved -= worst; spent += actual
//!        └─no──► Refusal{limit, remaining, resets_at}      └─► release(): reserved -= worst
//! ```

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use crate::chain::{BudgetKey, BudgetRef};
use crate::error::Error;
use crate::period::{Period, PeriodSpec, Window};
use crate::price::Price;
use crate::usage::Usage;

/// A Budget as the sidecar's configuration and the ledger's live table carry it: its identity
/// (namespace, name, uid) plus the CRD's spec.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetDef {
    /// The Budget's namespace. Empty in a hand-written sidecar configuration means the
    /// Agent's namespace (the sidecar fills it in when it reads the file).
    #[serde(default)]
    pub namespace: String,
    /// The Budget's name.
    pub name: String,
    /// `metadata.uid`: spend and leases belong to this incarnation of the Budget. Empty where
    /// none is known (offline renders, local configurations).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    /// `metadata.generation` the definition was read from (0: unknown).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: i64,
    /// Caps.
    pub limits: Limits,
    /// The period token and cost caps apply to.
    pub period: PeriodSpec,
    /// Percentages of a cap at which to warn.
    #[serde(default = "default_thresholds")]
    pub thresholds: Vec<u8>,
    /// What to do with a request that does not fit.
    #[serde(default)]
    pub on_exhausted: OnExhausted,
    /// A parent Budget whose caps also apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_ref: Option<ParentRef>,
    /// Namespaces whose Budgets may name this one as their parent (`*`: any). Its own
    /// namespace always may.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_child_namespaces: Vec<String>,
    /// Currency of `costMicros` and the price table.
    #[serde(default = "default_currency")]
    pub currency: String,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

impl BudgetDef {
    /// `namespace/name`.
    pub fn key(&self) -> BudgetKey {
        BudgetKey::new(self.namespace.clone(), self.name.clone())
    }

    /// The key and uid: what spend belongs to.
    pub fn reference(&self) -> BudgetRef {
        BudgetRef {
            key: self.key(),
            uid: self.uid.clone(),
        }
    }

    /// The parent's key (a parent without a namespace is in this Budget's namespace).
    pub fn parent_key(&self) -> Option<BudgetKey> {
        self.parent_ref.as_ref().map(|p| {
            BudgetKey::new(
                p.namespace
                    .clone()
                    .unwrap_or_else(|| self.namespace.clone()),
                p.name.clone(),
            )
        })
    }
}

fn default_thresholds() -> Vec<u8> {
    vec![80, 95]
}
fn default_currency() -> String {
    "USD".to_owned()
}

/// `spec.parentRef`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// The parent's namespace; the child's own when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The parent Budget's name.
    pub name: String,
}

/// `spec.limits`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Input + output tokens per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// Cost per period, in micros.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_micros: Option<u64>,
    /// Tokens per calendar minute (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Requests per calendar minute (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
}

/// `spec.onExhausted`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OnExhausted {
    /// Deny or brown out.
    #[serde(default)]
    pub action: ExhaustedAction,
    /// The cheaper model for brown-out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brown_out_model: Option<String>,
}

/// `spec.onExhausted.action`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExhaustedAction {
    /// Refuse with 429.
    #[default]
    Deny,
    /// Rewrite the request to `brownOutModel`.
    BrownOut,
}

/// Tokens and money together: what caps count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amount {
    /// Tokens (input + output).
    pub tokens: u64,
    /// Micros.
    pub micros: u64,
}

impl Amount {
    /// The amount a [`Usage`] counts for at `price` (cost 0 when the model is unpriced).
    pub fn of(usage: &Usage, price: Option<&Price>) -> Amount {
        Amount {
            tokens: usage.total_tokens(),
            micros: price.map_or(0, |p| p.cost_micros(usage)),
        }
    }

    /// The worst case for a request whose most is `worst` ([`crate::bound::worst_usage`]):
    /// every input token at the dearest input price (plain, cached or cache write), its output
    /// and its server-tool uses at their prices.
    pub fn worst_case(worst: &Usage, price: Option<&Price>) -> Amount {
        let dearest = price.map(|p| Price {
            input_per_m_tok: p.dearest_input_per_m_tok(),
            output_per_m_tok: p.output_per_m_tok,
            web_search_per_use: p.web_search_per_use,
            web_fetch_per_use: p.web_fetch_per_use,
            ..Price::default()
        });
        let tokens_only = Usage {
            input_tokens: worst.input_tokens,
            output_tokens: worst.output_tokens,
            web_search_requests: worst.web_search_requests,
            web_fetch_requests: worst.web_fetch_requests,
            ..Usage::default()
        };
        Amount::of(&tokens_only, dearest.as_ref())
    }

    fn add(&mut self, o: Amount) {
        self.tokens = self.tokens.saturating_add(o.tokens);
        self.micros = self.micros.saturating_add(o.micros);
    }

    fn sub(&mut self, o: Amount) {
        self.tokens = self.tokens.saturating_sub(o.tokens);
        self.micros = self.micros.saturating_sub(o.micros);
    }
}

/// Which cap refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LimitKind {
    /// `limits.tokens`.
    Tokens,
    /// `limits.costMicros`.
    CostMicros,
    /// `limits.tokensPerMinute`.
    TokensPerMinute,
    /// `limits.requestsPerMinute`.
    RequestsPerMinute,
}

impl LimitKind {
    /// The CRD field name.
    pub fn field(self) -> &'static str {
        match self {
            LimitKind::Tokens => "tokens",
            LimitKind::CostMicros => "costMicros",
            LimitKind::TokensPerMinute => "tokensPerMinute",
            LimitKind::RequestsPerMinute => "requestsPerMinute",
        }
    }
}

/// Why a request does not fit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The Budget that refused.
    pub budget: BudgetKey,
    /// Its currency (for messages).
    pub currency: String,
    /// The cap that would be passed.
    pub limit: LimitKind,
    /// The cap's value.
    pub cap: u64,
    /// Settled plus reserved, in the cap's unit.
    pub used: u64,
    /// What the request needed, in the cap's unit.
    pub requested: u64,
    /// What is left, in the cap's unit.
    pub remaining: u64,
    /// When the cap next frees room: the calendar period's end, the next minute for rates, or
    /// when the oldest spend leaves a rolling window.
    pub resets_at: Timestamp,
}

/// A worst case counted against a Budget, to settle or release exactly once.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "a reservation must be settled or released"]
pub struct Reservation {
    /// The Budget.
    pub budget: BudgetKey,
    /// The worst case counted.
    pub amount: Amount,
    /// When it was taken (its spend is attributed to this instant's period).
    pub at: Timestamp,
}

/// One Budget's state.
#[derive(Clone, Debug)]
pub struct Ledger {
    def: BudgetDef,
    period: Period,
    /// Settled spend by the minute (Unix seconds / 60) the request started.
    buckets: BTreeMap<i64, Amount>,
    /// Sum of `buckets` inside the current window.
    spent: Amount,
    reserved: Amount,
    window: Option<Window>,
    rate_minute: i64,
    rate_tokens: u64,
    rate_requests: u64,
}

fn minute_of(t: Timestamp) -> i64 {
    t.as_second().div_euclid(60)
}

fn minute_start(m: i64) -> Timestamp {
    Timestamp::from_second(m.saturating_mul(60)).unwrap_or(Timestamp::MAX)
}

impl Ledger {
    /// A fresh ledger for `def`.
    pub fn new(def: BudgetDef) -> Result<Ledger, Error> {
        let l = &def.limits;
        if l.tokens.is_none()
            && l.cost_micros.is_none()
            && l.tokens_per_minute.is_none()
            && l.requests_per_minute.is_none()
        {
            return Err(Error::NoLimit(def.key().to_string()));
        }
        if def.on_exhausted.action == ExhaustedAction::BrownOut
            && def.on_exhausted.brown_out_model.is_none()
        {
            return Err(Error::BrownOutModel(def.key().to_string()));
        }
        let period = Period::try_from(&def.period)?;
        Ok(Ledger {
            def,
            period,
            buckets: BTreeMap::new(),
            spent: Amount::default(),
            reserved: Amount::default(),
            window: None,
            rate_minute: i64::MIN,
            rate_tokens: 0,
            rate_requests: 0,
        })
    }

    /// The definition.
    pub fn def(&self) -> &BudgetDef {
        &self.def
    }

    /// Takes a new definition of the same Budget (a live edit: caps, thresholds, action or
    /// period changed) and keeps what was spent and reserved. A changed period recounts the
    /// spend that falls inside the new window from the per-minute buckets.
    pub fn redefine(&mut self, def: BudgetDef) -> Result<(), Error> {
        let next = Ledger::new(def)?;
        if next.period != self.period {
            self.period = next.period;
            self.window = None;
        }
        self.def = next.def;
        Ok(())
    }

    /// Settled spend in the window containing `now`.
    pub fn spent(&mut self, now: Timestamp) -> Result<Amount, Error> {
        self.roll(now)?;
        Ok(self.spent)
    }

    /// Replaces the per-minute caps (tokens and requests). The cluster authority gives each
    /// replica a share of a Budget's rate limits and adjusts it as replicas come and go.
    pub fn set_rate_limits(
        &mut self,
        tokens_per_minute: Option<u64>,
        requests_per_minute: Option<u64>,
    ) {
        self.def.limits.tokens_per_minute = tokens_per_minute;
        self.def.limits.requests_per_minute = requests_per_minute;
    }

    /// Settled spend in the window containing `now` plus what in-flight requests hold.
    pub fn used(&mut self, now: Timestamp) -> Result<Amount, Error> {
        self.roll(now)?;
        let mut used = self.spent;
        used.add(self.reserved);
        Ok(used)
    }

    /// What in-flight requests hold.
    pub fn reserved(&self) -> Amount {
        self.reserved
    }

    /// The current window.
    pub fn window(&mut self, now: Timestamp) -> Result<Window, Error> {
        self.roll(now)
    }

    /// Cost left under `limits.costMicros` (None without a cost cap).
    pub fn remaining_micros(&mut self, now: Timestamp) -> Result<Option<u64>, Error> {
        self.roll(now)?;
        Ok(self
            .def
            .limits
            .cost_micros
            .map(|cap| cap.saturating_sub(self.spent.micros.saturating_add(self.reserved.micros))))
    }

    /// The highest warning threshold that settled spend has reached on any period cap.
    pub fn threshold_reached(&mut self, now: Timestamp) -> Result<Option<u8>, Error> {
        self.roll(now)?;
        let pct = |used: u64, cap: Option<u64>| {
            cap.filter(|c| *c > 0)
                .map(|c| u128::from(used) * 100 / u128::from(c))
        };
        let worst = pct(self.spent.tokens, self.def.limits.tokens)
            .max(pct(self.spent.micros, self.def.limits.cost_micros));
        Ok(worst.and_then(|w| {
            self.def
                .thresholds
                .iter()
                .copied()
                .filter(|t| u128::from(*t) <= w)
                .max()
        }))
    }

    /// Moves the window to `now`, dropping spend that left it.
    fn roll(&mut self, now: Timestamp) -> Result<Window, Error> {
        // Calendar windows tile time, so the current one still holds while `now` is inside
        // it (its bounds, found in the Budget's time zone, are not worked out again).
        let window = match self.window {
            Some(w)
                if matches!(self.period, Period::Calendar { .. })
                    && w.start <= now
                    && now < w.end =>
            {
                w
            }
            _ => self.period.window(now)?,
        };
        if self.window.map(|w| w.start) != Some(window.start) {
            // A minute's bucket stays while any of it is inside the window: rolling windows
            // hold spend up to a minute longer than their length, never shorter.
            let first_kept = minute_of(window.start);
            let kept = self.buckets.split_off(&first_kept);
            let dropped = std::mem::replace(&mut self.buckets, kept);
            if self.window.is_none_or(|w| window.start < w.start) {
                // First use or the clock went back: recount.
                self.spent = self.buckets.values().fold(Amount::default(), |mut a, b| {
                    a.add(*b);
                    a
                });
            } else {
                for a in dropped.into_values() {
                    self.spent.sub(a);
                }
            }
            self.window = Some(window);
        }
        let minute = minute_of(now);
        if minute != self.rate_minute {
            self.rate_minute = minute;
            self.rate_tokens = 0;
            self.rate_requests = 0;
        }
        Ok(window)
    }

    /// When the period caps next free room.
    fn period_reset(&self, window: Window) -> Timestamp {
        match self.period.rolling_length() {
            None => window.end,
            Some(length) => self
                .buckets
                .keys()
                .next()
                .and_then(|m| minute_start(*m).checked_add(length).ok())
                .map(|t| t.checked_add(SignedDuration::from_secs(60)).unwrap_or(t))
                .unwrap_or(window.end),
        }
    }

    /// Counts `want` against every cap, or says which cap it would pass.
    pub fn reserve(&mut self, now: Timestamp, want: Amount) -> Result<Reservation, Box<Refusal>> {
        let window = match self.roll(now) {
            Ok(w) => w,
            Err(_) => Window {
                start: now,
                end: now,
            },
        };
        let next_minute = minute_start(self.rate_minute.saturating_add(1));
        let l = &self.def.limits;
        let checks = [
            (
                LimitKind::Tokens,
                l.tokens,
                self.spent.tokens + self.reserved.tokens,
                want.tokens,
                self.period_reset(window),
            ),
            (
                LimitKind::CostMicros,
                l.cost_micros,
                self.spent.micros + self.reserved.micros,
                want.micros,
                self.period_reset(window),
            ),
            (
                LimitKind::TokensPerMinute,
                l.tokens_per_minute,
                self.rate_tokens,
                want.tokens,
                next_minute,
            ),
            (
                LimitKind::RequestsPerMinute,
                l.requests_per_minute,
                self.rate_requests,
                1,
                next_minute,
            ),
        ];
        for (limit, cap, used, requested, resets_at) in checks {
            let Some(cap) = cap else { continue };
            if used.saturating_add(requested) > cap {
                return Err(Box::new(Refusal {
                    budget: self.def.key(),
                    currency: self.def.currency.clone(),
                    limit,
                    cap,
                    used,
                    requested,
                    remaining: cap.saturating_sub(used),
                    resets_at,
                }));
            }
        }
        self.reserved.add(want);
        self.rate_tokens = self.rate_tokens.saturating_add(want.tokens);
        self.rate_requests = self.rate_requests.saturating_add(1);
        Ok(Reservation {
            budget: self.def.key(),
            amount: want,
            at: now,
        })
    }

    /// Replaces a reservation with what was actually spent.
    pub fn settle(&mut self, now: Timestamp, reservation: Reservation, actual: Amount) {
        self.unreserve(now, &reservation, actual.tokens);
        self.record(reservation.at, actual);
    }

    /// Drops a reservation whose request spent nothing.
    pub fn release(&mut self, now: Timestamp, reservation: Reservation) {
        self.unreserve(now, &reservation, 0);
    }

    fn unreserve(&mut self, now: Timestamp, r: &Reservation, actual_tokens: u64) {
        // A failed roll leaves the old window in place; the arithmetic below stays exact.
        let _ = self.roll(now);
        self.reserved.sub(r.amount);
        if minute_of(r.at) == self.rate_minute {
            self.rate_tokens = self
                .rate_tokens
                .saturating_sub(r.amount.tokens)
                .saturating_add(actual_tokens);
        }
    }

    /// Adds spend that happened at `at` (settling, or replaying the outbox at start-up).
    pub fn record(&mut self, at: Timestamp, amount: Amount) {
        let m = minute_of(at);
        match self.window {
            // Before the first roll: the roll counts the buckets.
            None => self.buckets.entry(m).or_default().add(amount),
            Some(w) if m >= minute_of(w.start) => {
                self.buckets.entry(m).or_default().add(amount);
                self.spent.add(amount);
            }
            // Spend from a period that has ended no longer counts against any cap.
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::period::CalendarUnit;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn def(limits: Limits, period: PeriodSpec) -> BudgetDef {
        BudgetDef {
            namespace: "research".into(),
            name: "team".into(),
            limits,
            period,
            thresholds: vec![80, 95],
            currency: "USD".into(),
            ..BudgetDef::default()
        }
    }

    fn daily(limits: Limits) -> Ledger {
        Ledger::new(def(
            limits,
            PeriodSpec {
                calendar: Some(CalendarUnit::Day),
                time_zone: Some("Europe/Berlin".into()),
                rolling: None,
            },
        ))
        .unwrap()
    }

    fn amt(tokens: u64, micros: u64) -> Amount {
        Amount { tokens, micros }
    }

    #[test]
    fn reserve_settle_release() {
        let now = ts("2026-01-10T12:00:00Z");
        let mut l = daily(Limits {
            cost_micros: Some(1_000),
            ..Limits::default()
        });
        let a = l.reserve(now, amt(10, 600)).unwrap();
        // 600 reserved: 500 more does not fit, 400 does.
        let refused = l.reserve(now, amt(10, 500)).unwrap_err();
        assert_eq!(
            (
                refused.limit,
                refused.cap,
                refused.used,
                refused.requested,
                refused.remaining
            ),
            (LimitKind::CostMicros, 1_000, 600, 500, 400)
        );
        // Resets at Berlin midnight.
        assert_eq!(refused.resets_at, ts("2026-01-10T23:00:00Z"));
        let b = l.reserve(now, amt(10, 400)).unwrap();
        l.settle(now, a, amt(5, 250));
        l.release(now, b);
        assert_eq!(l.spent(now).unwrap(), amt(5, 250));
        assert_eq!(l.reserved(), Amount::default());
        assert_eq!(l.remaining_micros(now).unwrap(), Some(750));
        // The last second of the Berlin day still counts it; the next day does not.
        assert_eq!(l.spent(ts("2026-01-10T22:59:59Z")).unwrap(), amt(5, 250));
        // Next day: spend is gone.
        assert_eq!(
            l.spent(ts("2026-01-10T23:00:00Z")).unwrap(),
            Amount::default()
        );
    }

    #[test]
    fn every_limit_refuses_with_its_own_reset() {
        let now = ts("2026-01-10T12:00:30Z");
        let next_minute = ts("2026-01-10T12:01:00Z");
        let midnight = ts("2026-01-10T23:00:00Z");
        // (limits, request, limit that refuses, reset)
        let cases = [
            (
                Limits {
                    tokens: Some(100),
                    ..Limits::default()
                },
                amt(101, 0),
                LimitKind::Tokens,
                midnight,
            ),
            (
                Limits {
                    cost_micros: Some(100),
                    ..Limits::default()
                },
                amt(0, 101),
                LimitKind::CostMicros,
                midnight,
            ),
            (
                Limits {
                    tokens_per_minute: Some(100),
                    ..Limits::default()
                },
                amt(101, 0),
                LimitKind::TokensPerMinute,
                next_minute,
            ),
            (
                Limits {
                    requests_per_minute: Some(0),
                    ..Limits::default()
                },
                amt(1, 1),
                LimitKind::RequestsPerMinute,
                next_minute,
            ),
        ];
        for (limits, want, kind, reset) in cases {
            let mut l = daily(limits.clone());
            let r = l.reserve(now, want).unwrap_err();
            assert_eq!((r.limit, r.resets_at), (kind, reset), "{limits:?}");
        }
    }

    #[test]
    fn rate_limits_reset_each_minute_and_follow_settled_tokens() {
        let mut l = daily(Limits {
            tokens_per_minute: Some(100),
            requests_per_minute: Some(3),
            ..Limits::default()
        });
        let t0 = ts("2026-01-10T12:00:00Z");
        let r = l.reserve(t0, amt(90, 0)).unwrap();
        l.settle(t0, r, amt(30, 0)); // only 30 used: 70 free again this minute
        let _r2 = l.reserve(t0, amt(70, 0)).unwrap();
        let _r3 = l.reserve(t0, amt(0, 0)).unwrap();
        assert_eq!(
            l.reserve(t0, amt(0, 0)).unwrap_err().limit,
            LimitKind::RequestsPerMinute
        );
        let t1 = ts("2026-01-10T12:01:00Z");
        assert!(l.reserve(t1, amt(100, 0)).is_ok());
    }

    #[test]
    fn rolling_window_ages_spend_out() {
        let mut l = Ledger::new(def(
            Limits {
                tokens: Some(100),
                ..Limits::default()
            },
            PeriodSpec {
                rolling: Some("1h".into()),
                ..PeriodSpec::default()
            },
        ))
        .unwrap();
        let t0 = ts("2026-01-10T12:00:10Z");
        let r = l.reserve(t0, amt(100, 0)).unwrap();
        l.settle(t0, r, amt(100, 0));
        let r = l
            .reserve(ts("2026-01-10T12:30:00Z"), amt(1, 0))
            .unwrap_err();
        // The 12:00 minute leaves the hour window at 13:01 (kept a minute long, never short).
        assert_eq!(r.resets_at, ts("2026-01-10T13:01:00Z"));
        assert!(l.reserve(ts("2026-01-10T13:00:30Z"), amt(1, 0)).is_err());
        assert!(l.reserve(ts("2026-01-10T13:01:00Z"), amt(100, 0)).is_ok());
    }

    #[test]
    fn spend_replayed_before_first_use_counts_in_its_period_only() {
        let mut l = daily(Limits {
            tokens: Some(100),
            ..Limits::default()
        });
        l.record(ts("2026-01-09T12:00:00Z"), amt(50, 0)); // yesterday
        l.record(ts("2026-01-10T08:00:00Z"), amt(30, 0)); // today
        assert_eq!(l.spent(ts("2026-01-10T12:00:00Z")).unwrap(), amt(30, 0));
        // A request reserved yesterday and settled today is yesterday's spend.
        let r = Reservation {
            budget: BudgetKey::new("research", "team"),
            amount: amt(0, 0),
            at: ts("2026-01-09T22:59:00Z"), // 23:59 in Berlin
        };
        l.settle(ts("2026-01-10T12:00:00Z"), r, amt(40, 0));
        assert_eq!(l.spent(ts("2026-01-10T12:00:00Z")).unwrap(), amt(30, 0));
    }

    #[test]
    fn interleaved_reservations_never_pass_the_cap() {
        // Deterministic pseudo-random interleaving of reserve/settle/release.
        let cap = 10_000;
        let mut l = daily(Limits {
            cost_micros: Some(cap),
            ..Limits::default()
        });
        let now = ts("2026-01-10T12:00:00Z");
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut rnd = |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        let mut open = Vec::new();
        for _ in 0..20_000 {
            match rnd(3) {
                0 | 1 => {
                    if let Ok(r) = l.reserve(now, amt(0, 1 + rnd(700))) {
                        open.push(r);
                    }
                }
                _ if !open.is_empty() => {
                    let r = open.swap_remove(rnd(open.len() as u64) as usize);
                    let worst = r.amount.micros;
                    if rnd(5) == 0 {
                        l.release(now, r);
                    } else {
                        l.settle(now, r, amt(0, rnd(worst + 1)));
                    }
                }
                _ => {}
            }
            let spent = l.spent(now).unwrap().micros;
            assert!(spent + l.reserved().micros <= cap);
        }
    }

    #[test]
    fn worst_case_uses_the_dearest_input_price() {
        let p = Price {
            input_per_m_tok: 3_000_000,
            output_per_m_tok: 15_000_000,
            cached_input_per_m_tok: Some(300_000),
            cache_write_per_m_tok: Some(3_750_000),
            ..Price::default()
        };
        let worst = Usage {
            input_tokens: 1_000,
            output_tokens: 100,
            ..Usage::default()
        };
        assert_eq!(
            Amount::worst_case(&worst, Some(&p)),
            amt(1_100, 3_750 + 1_500)
        );
        assert_eq!(Amount::worst_case(&worst, None), amt(1_100, 0));
        // Server-tool uses at their per-use price.
        let searching = Usage {
            web_search_requests: 2,
            ..worst
        };
        let p = Price {
            web_search_per_use: Some(10_000),
            ..p
        };
        assert_eq!(
            Amount::worst_case(&searching, Some(&p)),
            amt(1_100, 3_750 + 1_500 + 20_000)
        );
    }

    #[test]
    fn thresholds() {
        let now = ts("2026-01-10T12:00:00Z");
        let mut l = daily(Limits {
            tokens: Some(100),
            ..Limits::default()
        });
        assert_eq!(l.threshold_reached(now).unwrap(), None);
        l.record(now, amt(85, 0));
        assert_eq!(l.threshold_reached(now).unwrap(), Some(80));
        l.record(now, amt(10, 0));
        assert_eq!(l.threshold_reached(now).unwrap(), Some(95));
    }

    #[test]
    fn redefine_keeps_spend_and_reservations() {
        let now = ts("2026-01-10T12:00:00Z");
        let mut l = daily(Limits {
            tokens: Some(1_000),
            ..Limits::default()
        });
        let r = l.reserve(now, amt(300, 0)).unwrap();
        l.record(now, amt(400, 0));
        // Lowered below spent + reserved: nothing more fits, nothing is forgotten.
        let mut lower = l.def().clone();
        lower.limits.tokens = Some(600);
        l.redefine(lower).unwrap();
        assert_eq!(l.used(now).unwrap(), amt(700, 0));
        let refused = l.reserve(now, amt(1, 0)).unwrap_err();
        assert_eq!((refused.cap, refused.remaining), (600, 0));
        l.settle(now, r, amt(100, 0));
        assert_eq!(l.used(now).unwrap(), amt(500, 0));
        assert!(l.reserve(now, amt(100, 0)).is_ok());
        // A new period recounts from the minute buckets: an hour period holds this hour only.
        let mut hourly = l.def().clone();
        hourly.period.calendar = Some(CalendarUnit::Hour);
        l.redefine(hourly).unwrap();
        assert_eq!(l.spent(ts("2026-01-10T12:30:00Z")).unwrap(), amt(500, 0));
        assert_eq!(l.spent(ts("2026-01-10T13:00:00Z")).unwrap(), amt(0, 0));
        // An invalid definition is refused and changes nothing.
        let mut bad = l.def().clone();
        bad.limits = Limits::default();
        assert!(l.redefine(bad).is_err());
        assert_eq!(l.def().limits.tokens, Some(600));
    }

    #[test]
    fn invalid_definitions() {
        let day = PeriodSpec {
            calendar: Some(CalendarUnit::Day),
            ..PeriodSpec::default()
        };
        assert!(matches!(
            Ledger::new(def(Limits::default(), day.clone())),
            Err(Error::NoLimit(_))
        ));
        let mut d = def(
            Limits {
                tokens: Some(1),
                ..Limits::default()
            },
            day,
        );
        d.on_exhausted.action = ExhaustedAction::BrownOut;
        assert!(matches!(Ledger::new(d), Err(Error::BrownOutModel(_))));
    }

    #[test]
    fn crd_shaped_json_reads() {
        let d: BudgetDef = serde_json::from_str(
            r#"{"name":"team","limits":{"costMicros":5000000,"tokensPerMinute":1000},
                "period":{"calendar":"month","timeZone":"America/New_York"},
                "onExhausted":{"action":"BrownOut","brownOutModel":"gpt-4o-mini"},
                "parentRef":{"name":"tenant"}}"#,
        )
        .unwrap();
        assert_eq!(d.thresholds, vec![80, 95]);
        assert_eq!(d.parent_ref.as_ref().unwrap().name, "tenant");
        // Without a namespace the parent is in the Budget's own (filled in by the reader).
        assert_eq!(d.namespace, "");
        assert_eq!(d.parent_key().unwrap().name, "tenant");
        assert_eq!(d.on_exhausted.action, ExhaustedAction::BrownOut);
    }
}
