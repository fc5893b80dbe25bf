//! The `CredentialsUnavailable` condition of an Agent whose provider key comes from Vault: pure,
//! computed from what each pod's sidecar answered on `/readyz` (the loop that asks is
//! [`crate::credentials_check`]). `True` with Vault's own reason (`VaultPathNotFound`,
//! `VaultPermissionDenied`, ...) while any sidecar holds no usable key, or with a `Ledger…`
//! reason (`LedgerVaultPermissionDenied`, ...) while one with `ledgerCredentials` holds no ledger
//! user whose lease has not ended; `False` once every sidecar that answered holds both.
//!
//! ```text
//!  pods ─► GET /readyz ─► [(pod, Readiness | no answer)] ─► credentials_verdict ─► Verdict
//!  old status + Verdict ─► credentials_status (lastTransitionTime kept; other conditions kept)
//! ```

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use soma_contract::readiness::Readiness;
use soma_crds::Agent;
use soma_crds::agent::AgentStatus;

use crate::kstatus::{Verdict, conditions, verdict};

/// Condition type: the Agent's sidecars hold no usable provider key.
pub const CREDENTIALS_UNAVAILABLE: &str = "CredentialsUnavailable";

/// Whether the Agent's provider key comes from Vault (only those get the condition).
pub fn uses_vault(agent: &Agent) -> bool {
    agent
        .spec
        .credentials
        .as_ref()
        .is_some_and(|c| c.vault.is_some())
}

/// The condition from the sidecars' answers (pod name, its `/readyz` or why it gave none).
/// `None`: no sidecar answered, so nothing is known and the condition is left as it is.
pub fn credentials_verdict(answers: &[(String, Result<Readiness, String>)]) -> Option<Verdict> {
    let answered: Vec<(&String, &Readiness)> = answers
        .iter()
        .filter_map(|(pod, r)| r.as_ref().ok().map(|r| (pod, r)))
        .collect();
    if answered.is_empty() {
        return None;
    }
    let mut failing = answered.iter().filter(|(_, r)| !r.ready);
    if let Some((pod, r)) = failing.next() {
        let more = failing.count();
        let (reason, said) = r.problem.as_ref().map_or_else(
            || ("NotReady".to_owned(), "not ready".to_owned()),
            |p| (p.reason.clone(), p.message.clone()),
        );
        let others = and_more(more);
        return Some(verdict(
            CREDENTIALS_UNAVAILABLE,
            true,
            reason,
            format!(
                "the sidecar of pod {pod}{others} holds no provider key: {said}. Requests get 503 until Vault hands one out."
            ),
        ));
    }
    // Then the ledger's user: the sidecar serves without it, but its usage reaches no ledger.
    let mut no_ledger = answered
        .iter()
        .filter(|(_, r)| r.ledger.as_ref().is_some_and(|l| !l.usable));
    if let Some((pod, r)) = no_ledger.next() {
        let more = no_ledger.count();
        let (reason, said) = r
            .ledger
            .as_ref()
            .and_then(|l| l.problem.as_ref())
            .map_or_else(
                || {
                    (
                        "LedgerCredentialsUnavailable".to_owned(),
                        "no lease".to_owned(),
                    )
                },
                |p| (p.reason.clone(), p.message.clone()),
            );
        return Some(verdict(
            CREDENTIALS_UNAVAILABLE,
            true,
            reason,
            format!(
                "the sidecar of pod {pod}{} has no ledger user from Vault: {said}. It keeps serving; usage waits in its outbox and reaches the ledger once Vault hands out credentials.",
                and_more(more)
            ),
        ));
    }
    let (total, asked) = (answered.len(), answers.len());
    let mut message = match (total, asked) {
        (1, 1) => "the sidecar holds a provider key from Vault".to_owned(),
        (t, a) if t == a => format!("all {t} sidecars hold a provider key from Vault"),
        (t, a) => format!("{t} of {a} sidecars answered, and each holds a provider key from Vault"),
    };
    // Vault unreachable keeps the key in hand: serving, but worth saying.
    if let Some((pod, p)) = answered
        .iter()
        .find_map(|(pod, r)| r.problem.as_ref().map(|p| (pod, p)))
    {
        message.push_str(&format!(
            "; the last refresh of pod {pod} failed ({}: {}), so it serves with the key it read before",
            p.reason, p.message
        ));
    }
    // A renewal that failed while the lease still runs: the user works until it ends.
    if let Some((pod, p)) = answered.iter().find_map(|(pod, r)| {
        r.ledger
            .as_ref()
            .and_then(|l| l.problem.as_ref())
            .map(|p| (pod, p))
    }) {
        message.push_str(&format!(
            "; the ledger credentials of pod {pod} could not be renewed or replaced ({}: {}), so it uses its current user until the lease ends",
            p.reason, p.message
        ));
    }
    Some(verdict(
        CREDENTIALS_UNAVAILABLE,
        false,
        "CredentialsAvailable",
        message,
    ))
}

/// ` (and N more pods)`, or nothing.
fn and_more(more: usize) -> String {
    match more {
        0 => String::new(),
        1 => " (and 1 more pod)".to_owned(),
        n => format!(" (and {n} more pods)"),
    }
}

/// `old` with the condition set from `v` (its `lastTransitionTime` kept unless its status
/// flips); every other part of the status as it was.
pub fn credentials_status(
    old: Option<&AgentStatus>,
    v: &Verdict,
    generation: Option<i64>,
    now: &Time,
) -> AgentStatus {
    let mut status = old.cloned().unwrap_or_default();
    let old_conditions: &[Condition] = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let new = conditions(old_conditions, std::slice::from_ref(v), generation, now);
    status
        .conditions
        .retain(|c| c.type_ != CREDENTIALS_UNAVAILABLE);
    status.conditions.extend(new);
    status
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::jiff::Timestamp;
    use soma_contract::readiness::{LedgerReadiness, ReadinessProblem};

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn ready() -> Result<Readiness, String> {
        Ok(Readiness {
            ready: true,
            problem: None,
            ledger: None,
        })
    }

    fn failing(reason: &str, ready: bool) -> Result<Readiness, String> {
        Ok(Readiness {
            ready,
            problem: Some(ReadinessProblem {
                reason: reason.into(),
                message: format!("{reason} said so"),
            }),
            ledger: None,
        })
    }

    /// A sidecar holding its key, with ledger credentials (`usable`) and the last failure.
    fn ledger(usable: bool, reason: Option<&str>) -> Result<Readiness, String> {
        Ok(Readiness {
            ready: true,
            problem: None,
            ledger: Some(LedgerReadiness {
                usable,
                problem: reason.map(|r| ReadinessProblem {
                    reason: r.into(),
                    message: format!("{r} said so"),
                }),
            }),
        })
    }

    #[test]
    fn table_of_answers() {
        let none: Vec<(String, Result<Readiness, String>)> = vec![];
        assert_eq!(credentials_verdict(&none), None, "no pods: unknown");
        let silent = vec![("p1".to_owned(), Err("timed out".to_owned()))];
        assert_eq!(credentials_verdict(&silent), None, "no answer: unknown");

        // (answers, status, reason, message contains)
        type Answers = Vec<(&'static str, Result<Readiness, String>)>;
        let rows: Vec<(Answers, bool, &str, &str)> = vec![
            (
                vec![("p1", ready())],
                false,
                "CredentialsAvailable",
                "holds a provider key",
            ),
            (
                vec![("p1", ready()), ("p2", Err("refused".into()))],
                false,
                "CredentialsAvailable",
                "1 of 2 sidecars answered",
            ),
            (
                vec![("p1", ready()), ("p2", failing("VaultPathNotFound", false))],
                true,
                "VaultPathNotFound",
                "pod p2 holds no provider key: VaultPathNotFound said so",
            ),
            (
                vec![
                    ("p1", failing("VaultPermissionDenied", false)),
                    ("p2", failing("VaultPermissionDenied", false)),
                    ("p3", failing("VaultPermissionDenied", false)),
                ],
                true,
                "VaultPermissionDenied",
                "(and 2 more pods)",
            ),
            (
                vec![("p1", failing("VaultUnreachable", true))],
                false,
                "CredentialsAvailable",
                "serves with the key it read before",
            ),
            (
                vec![(
                    "p1",
                    Ok(Readiness {
                        ready: false,
                        problem: None,
                        ledger: None,
                    }),
                )],
                true,
                "NotReady",
                "not ready",
            ),
            // The ledger's user from Vault: its own reasons, after the key's.
            (
                vec![("p1", ledger(true, None)), ("p2", ledger(true, None))],
                false,
                "CredentialsAvailable",
                "all 2 sidecars hold a provider key",
            ),
            (
                vec![
                    ("p1", ledger(true, None)),
                    ("p2", ledger(false, Some("LedgerVaultPermissionDenied"))),
                ],
                true,
                "LedgerVaultPermissionDenied",
                "pod p2 has no ledger user from Vault: LedgerVaultPermissionDenied said so. It keeps serving",
            ),
            (
                vec![
                    ("p1", failing("VaultPathNotFound", false)),
                    ("p2", ledger(false, Some("LedgerVaultUnreachable"))),
                ],
                true,
                "VaultPathNotFound",
                "holds no provider key",
            ),
            (
                vec![("p1", ledger(true, Some("LedgerVaultUnreachable")))],
                false,
                "CredentialsAvailable",
                "uses its current user until the lease ends",
            ),
        ];
        for (answers, status, reason, contains) in rows {
            let answers: Vec<_> = answers
                .into_iter()
                .map(|(p, r)| (p.to_owned(), r))
                .collect();
            let v = credentials_verdict(&answers).unwrap();
            assert_eq!(
                (v.status, v.reason.as_str()),
                (status, reason),
                "{answers:?}"
            );
            assert!(v.message.contains(contains), "{}", v.message);
        }
    }

    #[test]
    fn other_conditions_stay_and_the_transition_time_moves_only_on_a_flip() {
        let other = Condition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: "Available".into(),
            message: "1 of 1".into(),
            observed_generation: Some(1),
            last_transition_time: at(1),
        };
        let old = AgentStatus {
            conditions: vec![other.clone()],
            ..AgentStatus::default()
        };
        let missing =
            credentials_verdict(&[("p".into(), failing("VaultPathNotFound", false))]).unwrap();
        let s1 = credentials_status(Some(&old), &missing, Some(1), &at(10));
        assert_eq!(s1.conditions[0], other);
        let c = s1
            .conditions
            .iter()
            .find(|c| c.type_ == CREDENTIALS_UNAVAILABLE)
            .unwrap();
        assert_eq!(
            (c.status.as_str(), c.last_transition_time.clone()),
            ("True", at(10))
        );
        assert_eq!(
            credentials_status(Some(&s1), &missing, Some(1), &at(20)),
            s1,
            "same answer: no write"
        );
        let fixed = credentials_verdict(&[("p".into(), ready())]).unwrap();
        let s2 = credentials_status(Some(&s1), &fixed, Some(1), &at(30));
        let c = s2
            .conditions
            .iter()
            .find(|c| c.type_ == CREDENTIALS_UNAVAILABLE)
            .unwrap();
        assert_eq!(
            (c.status.as_str(), c.last_transition_time.clone()),
            ("False", at(30))
        );
        assert_eq!(s2.conditions.len(), 2);
    }
}
