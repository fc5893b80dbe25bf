//! Pure: a Budget's status from what the reconcile observed. Spend figures come from the
//! ledger (delivered records, and what the sidecars last reported in flight); the period is
//! computed in the Budget's time zone; thresholds are remembered per period so that each
//! raises one Warning Event per period, not one per refresh.

use jiff::Timestamp;
use jiff::tz::TimeZone;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use soma_crds::budget::BudgetStatus;
use soma_ledger::spend::{Leases, Spend};
use soma_metering::chain::ChainProblem;
use soma_metering::period::Period;
use soma_metering::{BudgetDef, Window};

use crate::kstatus::{Verdict, conditions, progressing, settled, stalled, verdict};

/// Condition type: a period cap is used up.
pub const EXHAUSTED: &str = "Exhausted";
/// Condition type: spend reached one of `spec.thresholds`.
pub const THRESHOLD_REACHED: &str = "ThresholdReached";

/// What the ledger says about the current window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ledgered {
    /// Delivered records.
    pub spend: Spend,
    /// What the sidecars last reported.
    pub leases: Leases,
}

/// Everything the status is computed from.
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetObserved {
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The definition.
    pub def: BudgetDef,
    /// Why the definition cannot be enforced (an unknown time zone), if so.
    pub invalid: Option<String>,
    /// Why the Budget's own parent chain cannot be enforced.
    pub chain: Option<ChainProblem>,
    /// The ledger's figures (`None`: no ledger configured).
    pub ledger: Option<Ledgered>,
    /// The ledger could not be read.
    pub ledger_error: Option<String>,
    /// Agents charging the Budget (`namespace/name`), sorted.
    pub agents: Vec<String>,
    /// Now.
    pub now: Timestamp,
}

fn zone(def: &BudgetDef) -> TimeZone {
    def.period
        .time_zone
        .as_deref()
        .and_then(|z| TimeZone::get(z).ok())
        .unwrap_or(TimeZone::UTC)
}

/// The current window, if the period reads.
pub fn window(def: &BudgetDef, now: Timestamp) -> Option<Window> {
    Period::try_from(&def.period).ok()?.window(now).ok()
}

fn rfc3339(t: Timestamp, tz: &TimeZone) -> String {
    t.to_zoned(tz.clone())
        .strftime("%Y-%m-%dT%H:%M:%S%:z")
        .to_string()
}

fn period_label(def: &BudgetDef) -> String {
    match (&def.period.calendar, &def.period.rolling) {
        (Some(unit), _) => {
            let unit = format!("{unit:?}").to_lowercase();
            match &def.period.time_zone {
                Some(z) => format!("{unit} ({z})"),
                None => format!("{unit} (UTC)"),
            }
        }
        (None, Some(r)) => format!("rolling {r}"),
        (None, None) => "-".to_owned(),
    }
}

/// Micros as `12.35 USD` (below a cent: `400 micro-USD`).
pub fn money(micros: i64, currency: &str) -> String {
    let micros = micros.max(0);
    if micros > 0 && micros < 10_000 {
        return format!("{micros} micro-{currency}");
    }
    let cents = (micros + 5_000) / 10_000;
    format!("{}.{:02} {currency}", cents / 100, cents % 100)
}

/// Used share of each period cap, in percent (spent plus reserved over the cap), and the cap
/// name: the largest first.
fn shares(def: &BudgetDef, used_tokens: i64, used_micros: i64) -> Vec<(i64, &'static str)> {
    let pct = |used: i64, cap: Option<u64>| {
        cap.filter(|c| *c > 0).map(|c| {
            let c = i128::from(c);
            i64::try_from(i128::from(used.max(0)) * 100 / c).unwrap_or(i64::MAX)
        })
    };
    let mut out: Vec<(i64, &'static str)> = [
        (pct(used_tokens, def.limits.tokens), "limits.tokens"),
        (
            pct(used_micros, def.limits.cost_micros),
            "limits.costMicros",
        ),
    ]
    .into_iter()
    .filter_map(|(p, n)| p.map(|p| (p, n)))
    .collect();
    out.sort_by_key(|s| std::cmp::Reverse(s.0));
    out
}

fn verdicts(obs: &BudgetObserved, status: &BudgetStatus) -> Vec<Verdict> {
    const WAITING: &str = "waiting for a change to the Budget or its parent";
    let key = obs.def.key();
    let mut out: Vec<Verdict> = if let Some(why) = &obs.invalid {
        stalled(
            "InvalidSpec",
            format!("Budget {key} cannot be enforced: {why}; correct its spec"),
            WAITING,
        )
        .to_vec()
    } else if let Some(problem) = &obs.chain {
        let reason = match problem {
            ChainProblem::Missing { .. } => "ParentNotFound",
            ChainProblem::NotGranted { .. } => "ParentNotGranted",
            _ => "BudgetChainInvalid",
        };
        stalled(
            reason,
            format!("{problem}. Agents charged to this Budget do not start until it is fixed."),
            WAITING,
        )
        .to_vec()
    } else if let Some(e) = &obs.ledger_error {
        progressing(
            "LedgerUnavailable",
            format!("the usage ledger cannot be read ({e}); the sidecars still enforce the caps, only this status is stale"),
            "retrying the ledger",
        )
        .to_vec()
    } else if obs.ledger.is_none() {
        settled(
            "NoLedger",
            "enforced by each sidecar alone: no usage ledger is configured (the operator's --ledger-url), so spend is neither shared between replicas nor reported here",
            "the Budget is in force",
        )
        .to_vec()
    } else {
        let message = match (status.percent_used, &status.period_end) {
            (Some(p), Some(end)) => format!("{p}% used; the caps reset at {end}"),
            (None, Some(end)) => {
                format!("no period cap; rate limits apply; the window ends at {end}")
            }
            _ => "in force".to_owned(),
        };
        settled("Active", message, "the Budget is in force").to_vec()
    };
    let used_tokens = status.spent_tokens + status.reserved_tokens;
    let used_micros = status.spent_micros + status.reserved_micros;
    let shares = shares(&obs.def, used_tokens, used_micros);
    let refused = status.refusals > 0 || status.brown_outs > 0;
    match shares.first() {
        Some((p, cap)) if (*p >= 100 || refused) && obs.ledger.is_some() => out.push(verdict(
            EXHAUSTED,
            true,
            "CapReached",
            format!(
                "{cap} is used up ({p}% spent or reserved, {} requests {} this period): requests that do not fit are {} until {}",
                status.refusals + status.brown_outs,
                if obs.def.on_exhausted.brown_out_model.is_some() {
                    "browned out or refused"
                } else {
                    "refused"
                },
                if obs.def.on_exhausted.brown_out_model.is_some() {
                    "sent to the brown-out model"
                } else {
                    "refused"
                },
                status.period_end.as_deref().unwrap_or("the period ends")
            ),
        )),
        _ => out.push(verdict(
            EXHAUSTED,
            false,
            "WithinCaps",
            "no period cap is used up",
        )),
    }
    match status.thresholds_reached.iter().max() {
        Some(t) => out.push(verdict(
            THRESHOLD_REACHED,
            true,
            format!("Threshold{t}"),
            format!(
                "{t}% of {} reached in this period",
                shares.first().map_or("a cap", |s| s.1)
            ),
        )),
        None => out.push(verdict(
            THRESHOLD_REACHED,
            false,
            "BelowThresholds",
            "no threshold reached in this period",
        )),
    }
    out
}

/// The status the Budget should have, given its old status and what was observed at `now`.
pub fn budget_status(old: Option<&BudgetStatus>, obs: &BudgetObserved, now: &Time) -> BudgetStatus {
    let tz = zone(&obs.def);
    let window = window(&obs.def, obs.now);
    let period_start = window.map(|w| rfc3339(w.start, &tz));
    let period_end = window
        .filter(|_| obs.def.period.calendar.is_some())
        .map(|w| rfc3339(w.end, &tz));
    let same_period = old.is_some_and(|o| o.period_start == period_start);
    let mut status = BudgetStatus {
        observed_generation: obs.generation,
        period_start,
        period_end,
        spend_source: Some(
            if obs.ledger.is_some() {
                "Ledger"
            } else {
                "None"
            }
            .to_owned(),
        ),
        period_label: Some(period_label(&obs.def)),
        agent_count: i64::try_from(obs.agents.len()).unwrap_or(i64::MAX),
        agents: obs.agents.iter().take(50).cloned().collect(),
        ..BudgetStatus::default()
    };
    match (&obs.ledger, &obs.ledger_error) {
        (Some(l), None) => {
            status.requests = l.spend.requests;
            status.spent_tokens = l.spend.tokens;
            status.spent_micros = l.spend.micros;
            status.reserved_tokens = l.leases.reserved_tokens;
            status.reserved_micros = l.leases.reserved_micros;
            status.refusals = l.leases.refusals;
            status.brown_outs = l.leases.brownouts;
            let used_tokens = l.spend.tokens + l.leases.reserved_tokens;
            let used_micros = l.spend.micros + l.leases.reserved_micros;
            let left = |cap: Option<u64>, used: i64| {
                cap.map(|c| {
                    i64::try_from(c)
                        .unwrap_or(i64::MAX)
                        .saturating_sub(used)
                        .max(0)
                })
            };
            status.remaining_tokens = left(obs.def.limits.tokens, used_tokens);
            status.remaining_micros = left(obs.def.limits.cost_micros, used_micros);
            let shares = shares(&obs.def, used_tokens, used_micros);
            status.percent_used = shares.first().map(|s| s.0);
            status.used_display = status.percent_used.map(|p| format!("{p}%"));
            let currency = &obs.def.currency;
            (status.spent_display, status.remaining_display) =
                if obs.def.limits.cost_micros.is_some() {
                    (
                        Some(money(l.spend.micros, currency)),
                        status.remaining_micros.map(|r| money(r, currency)),
                    )
                } else {
                    (
                        Some(format!("{} tokens", l.spend.tokens)),
                        status.remaining_tokens.map(|r| format!("{r} tokens")),
                    )
                };
            let reached: Vec<i32> = obs
                .def
                .thresholds
                .iter()
                .map(|t| i32::from(*t))
                .filter(|t| status.percent_used.is_some_and(|p| p >= i64::from(*t)))
                .collect();
            // Once reached, a threshold stays reached for the rest of the period (spend
            // released by a refund does not raise it again).
            let mut all: Vec<i32> = if same_period {
                old.map(|o| o.thresholds_reached.clone())
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            all.extend(reached);
            all.sort_unstable();
            all.dedup();
            status.thresholds_reached = all;
        }
        // The ledger did not answer: keep the last figures rather than show zeros.
        (Some(_), Some(_)) | (None, Some(_)) => {
            if let Some(o) = old.filter(|_| same_period) {
                status.requests = o.requests;
                status.spent_tokens = o.spent_tokens;
                status.spent_micros = o.spent_micros;
                status.reserved_tokens = o.reserved_tokens;
                status.reserved_micros = o.reserved_micros;
                status.remaining_tokens = o.remaining_tokens;
                status.remaining_micros = o.remaining_micros;
                status.percent_used = o.percent_used;
                status.used_display = o.used_display.clone();
                status.spent_display = o.spent_display.clone();
                status.remaining_display = o.remaining_display.clone();
                status.refusals = o.refusals;
                status.brown_outs = o.brown_outs;
                status.thresholds_reached = o.thresholds_reached.clone();
            }
        }
        (None, None) => {}
    }
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    status.conditions = conditions(old_conditions, &verdicts(obs, &status), obs.generation, now);
    status
}

/// What to tell the user after a status change: thresholds newly reached this period, and
/// whether the Budget has just become exhausted.
pub fn news(old: Option<&BudgetStatus>, new: &BudgetStatus) -> (Vec<i32>, bool) {
    let same_period = old.is_some_and(|o| o.period_start == new.period_start);
    let before: &[i32] = match old {
        Some(o) if same_period => &o.thresholds_reached,
        _ => &[],
    };
    let fresh = new
        .thresholds_reached
        .iter()
        .copied()
        .filter(|t| !before.contains(t))
        .collect();
    let exhausted = |s: Option<&BudgetStatus>| {
        s.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == EXHAUSTED && c.status == "True")
        })
    };
    let newly = exhausted(Some(new)) && !(same_period && exhausted(old));
    (fresh, newly)
}

#[cfg(test)]
mod tests {
    use super::*;
    use soma_crds::common::condition_types::{READY, STALLED};
    use soma_metering::budget::Limits;
    use soma_metering::period::{CalendarUnit, PeriodSpec};

    fn def() -> BudgetDef {
        BudgetDef {
            namespace: "a".into(),
            name: "team".into(),
            limits: Limits {
                cost_micros: Some(10_000_000),
                ..Limits::default()
            },
            period: PeriodSpec {
                calendar: Some(CalendarUnit::Day),
                time_zone: Some("Europe/Berlin".into()),
                rolling: None,
            },
            thresholds: vec![80, 95],
            currency: "USD".into(),
            ..BudgetDef::default()
        }
    }

    fn obs(micros: i64, reserved: i64, now: &str) -> BudgetObserved {
        BudgetObserved {
            generation: Some(1),
            def: def(),
            invalid: None,
            chain: None,
            ledger: Some(Ledgered {
                spend: Spend {
                    requests: 3,
                    tokens: 900,
                    micros,
                },
                leases: Leases {
                    reserved_micros: reserved,
                    ..Leases::default()
                },
            }),
            ledger_error: None,
            agents: vec!["a/bot".into()],
            now: now.parse().unwrap(),
        }
    }

    fn cond<'a>(s: &'a BudgetStatus, t: &str) -> (&'a str, &'a str) {
        let c = s.conditions.iter().find(|c| c.type_ == t).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    fn t(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    #[test]
    fn spend_period_thresholds_and_exhaustion() {
        let now = "2026-12-06T10:00:00Z";
        let s1 = budget_status(None, &obs(5_000_000, 1_000_000, now), &t(now));
        assert_eq!(
            s1.period_start.as_deref(),
            Some("2026-12-06T00:00:00+01:00")
        );
        assert_eq!(s1.period_end.as_deref(), Some("2026-12-07T00:00:00+01:00"));
        assert_eq!(
            (s1.spent_micros, s1.reserved_micros, s1.remaining_micros),
            (5_000_000, 1_000_000, Some(4_000_000))
        );
        assert_eq!(s1.percent_used, Some(60));
        assert_eq!(s1.spent_display.as_deref(), Some("5.00 USD"));
        assert_eq!(s1.period_label.as_deref(), Some("day (Europe/Berlin)"));
        assert_eq!(cond(&s1, READY), ("True", "Active"));
        assert_eq!(cond(&s1, EXHAUSTED), ("False", "WithinCaps"));
        assert_eq!(cond(&s1, THRESHOLD_REACHED), ("False", "BelowThresholds"));
        assert_eq!(news(None, &s1), (vec![], false));

        // 85%: the 80% threshold, once.
        let s2 = budget_status(Some(&s1), &obs(8_500_000, 0, now), &t(now));
        assert_eq!(s2.thresholds_reached, vec![80]);
        assert_eq!(cond(&s2, THRESHOLD_REACHED), ("True", "Threshold80"));
        assert_eq!(news(Some(&s1), &s2), (vec![80], false));
        // Refunded below 80%: still reached this period, and no new Event.
        let s3 = budget_status(Some(&s2), &obs(7_000_000, 0, now), &t(now));
        assert_eq!(s3.thresholds_reached, vec![80]);
        assert_eq!(news(Some(&s2), &s3), (vec![], false));
        // Used up: both thresholds and Exhausted.
        let s4 = budget_status(Some(&s3), &obs(10_000_000, 0, now), &t(now));
        assert_eq!(s4.thresholds_reached, vec![80, 95]);
        assert_eq!(cond(&s4, EXHAUSTED), ("True", "CapReached"));
        assert_eq!(news(Some(&s3), &s4), (vec![95], true));
        // Unchanged figures give the same status (no write, no Event).
        assert_eq!(
            budget_status(Some(&s4), &obs(10_000_000, 0, now), &t(now)),
            s4
        );
        // The next day (Berlin midnight = 23:00 UTC): a new period, thresholds forgotten.
        let next = "2026-12-06T23:00:00Z";
        let s5 = budget_status(Some(&s4), &obs(0, 0, next), &t(next));
        assert_eq!(
            s5.period_start.as_deref(),
            Some("2026-12-07T00:00:00+01:00")
        );
        assert!(s5.thresholds_reached.is_empty());
        assert_eq!(cond(&s5, EXHAUSTED), ("False", "WithinCaps"));
        // Used up again in the new period: a new Exhausted Event.
        let s6 = budget_status(Some(&s5), &obs(10_000_000, 0, next), &t(next));
        assert_eq!(news(Some(&s4), &s6), (vec![80, 95], true));
    }

    #[test]
    fn problems_and_missing_ledgers() {
        let now = "2026-12-06T10:00:00Z";
        let mut o = obs(0, 0, now);
        o.chain = Some(ChainProblem::NotGranted {
            child: soma_metering::BudgetKey::new("a", "team"),
            parent: soma_metering::BudgetKey::new("platform", "tenant"),
        });
        let s = budget_status(None, &o, &t(now));
        assert_eq!(cond(&s, READY), ("False", "ParentNotGranted"));
        assert_eq!(cond(&s, STALLED), ("True", "ParentNotGranted"));

        let mut o = obs(0, 0, now);
        o.ledger = None;
        let s = budget_status(None, &o, &t(now));
        assert_eq!(cond(&s, READY), ("True", "NoLedger"));
        assert_eq!(s.spend_source.as_deref(), Some("None"));
        assert_eq!(s.percent_used, None);

        // A ledger that stops answering keeps the last figures and says so.
        let before = budget_status(None, &obs(5_000_000, 0, now), &t(now));
        let mut o = obs(0, 0, now);
        o.ledger_error = Some("connection refused".into());
        let s = budget_status(Some(&before), &o, &t(now));
        assert_eq!(s.spent_micros, 5_000_000);
        assert_eq!(cond(&s, READY), ("False", "LedgerUnavailable"));

        let mut o = obs(0, 0, now);
        o.invalid = Some("unknown time zone \"Mars/Olympus\"".into());
        let s = budget_status(None, &o, &t(now));
        assert_eq!(cond(&s, READY), ("False", "InvalidSpec"));
    }
}
