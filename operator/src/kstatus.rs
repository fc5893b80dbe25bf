//! Conditions in the kstatus sense, computed by pure functions and shared by every
//! controller: what a reconcile decided ([`Verdict`]s), turned into `Condition`s that keep
//! their `lastTransitionTime` unless their status flips, so that a converged object's status
//! does not change and is not written again.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use soma_crds::common::condition_types::{READY, RECONCILING, STALLED};

/// A condition without its time: what the reconcile decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The condition type.
    pub type_: &'static str,
    /// Its status.
    pub status: bool,
    /// A CamelCase reason.
    pub reason: String,
    /// A message a user can act on.
    pub message: String,
}

/// A verdict.
pub fn verdict(
    type_: &'static str,
    status: bool,
    reason: impl Into<String>,
    message: impl Into<String>,
) -> Verdict {
    Verdict {
        type_,
        status,
        reason: reason.into(),
        message: message.into(),
    }
}

/// `Ready=True`, not reconciling, not stalled.
pub fn settled(reason: &str, message: impl Into<String>, steady: &str) -> [Verdict; 3] {
    [
        verdict(READY, true, reason, message),
        verdict(RECONCILING, false, reason, steady),
        verdict(STALLED, false, reason, steady),
    ]
}

/// `Ready=False` and stalled: only a change by a person helps.
pub fn stalled(reason: &str, message: impl Into<String>, waiting: &str) -> [Verdict; 3] {
    let message = message.into();
    [
        verdict(READY, false, reason, message.clone()),
        verdict(RECONCILING, false, reason, waiting),
        verdict(STALLED, true, reason, message),
    ]
}

/// `Ready=False` while Soma works on it (or retries).
pub fn progressing(reason: &str, message: impl Into<String>, stall: &str) -> [Verdict; 3] {
    let message = message.into();
    [
        verdict(READY, false, reason, message.clone()),
        verdict(RECONCILING, true, reason, message),
        verdict(STALLED, false, reason, stall),
    ]
}

/// Turns verdicts into conditions, keeping `lastTransitionTime` from `old` unless the
/// status flipped.
pub fn conditions(
    old: &[Condition],
    verdicts: &[Verdict],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    verdicts
        .iter()
        .map(|v| {
            let status = if v.status { "True" } else { "False" }.to_owned();
            let since = old
                .iter()
                .find(|c| c.type_ == v.type_ && c.status == status)
                .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
            Condition {
                type_: v.type_.to_owned(),
                status,
                reason: v.reason.clone(),
                message: v.message.clone(),
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

/// The condition of `type_`, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let t0 = Time(Timestamp::from_second(0).unwrap());
        let t1 = Time(Timestamp::from_second(60).unwrap());
        let first = conditions(&[], &settled("Ok", "fine", "steady"), Some(1), &t0);
        let same = conditions(&first, &settled("Ok", "still fine", "steady"), Some(2), &t1);
        assert_eq!(find(&same, READY).unwrap().last_transition_time, t0);
        let flipped = conditions(&same, &stalled("Bad", "broken", "waiting"), Some(2), &t1);
        assert_eq!(find(&flipped, READY).unwrap().last_transition_time, t1);
        assert_eq!(find(&flipped, STALLED).unwrap().status, "True");
        assert_eq!(
            find(&flipped, RECONCILING).unwrap().last_transition_time,
            t0
        );
    }
}
