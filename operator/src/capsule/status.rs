//! Pure: a Capsule's status from what the reconcile found. `verifiedDigest`, `signer` and
//! `verifiedAt` are set only while the Capsule is verified (a status never claims a
//! verification that does not hold now); `verifiedAt` is kept while the same digest stays
//! verified by the same signer, so a converged Capsule's status does not change.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use soma_crds::capsule::{CapsuleStatus, QdrantCollectionStatus};
use soma_crds::common::condition_types::{READY, RECONCILING, STALLED};
use soma_policy::condition::POLICY_ALLOWED;

use super::verify::{Rejection, Verified};
use crate::kstatus::{Verdict, conditions, verdict};
use crate::policy::check::PolicyCheck;

/// What the reconcile found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapsuleObserved {
    /// The Capsule's `metadata.generation`.
    pub generation: Option<i64>,
    /// Verified, or why not (revoked, denied by a policy, content or key missing, signature).
    pub outcome: Result<Verified, Rejection>,
    /// The policy re-check, for `PolicyAllowed`.
    pub policy: Option<PolicyCheck>,
    /// For a verified Capsule with `spec.index: qdrant`: its loaded collection, or why it is
    /// not loaded (`QdrantLoaded`). `None`: not opted in, or not verified (nothing loaded).
    pub qdrant: Option<Result<QdrantCollectionStatus, Rejection>>,
}

/// The condition saying whether a Capsule's Qdrant collection is loaded.
pub const QDRANT_LOADED: &str = "QdrantLoaded";

fn verdicts(obs: &CapsuleObserved) -> Vec<Verdict> {
    let mut out = match &obs.outcome {
        Ok(v) => {
            let message = format!("signature of {} by {} verified", v.digest, v.signer);
            vec![
                verdict(READY, true, "Verified", message),
                verdict(RECONCILING, false, "Verified", "the Capsule is verified"),
                verdict(STALLED, false, "Verified", "the Capsule is verified"),
            ]
        }
        Err(r) if r.transient => vec![
            verdict(READY, false, r.reason.clone(), r.message.clone()),
            verdict(RECONCILING, true, r.reason.clone(), "retrying"),
            verdict(STALLED, false, r.reason.clone(), "retrying"),
        ],
        Err(r) => vec![
            verdict(READY, false, r.reason.clone(), r.message.clone()),
            verdict(
                RECONCILING,
                false,
                r.reason.clone(),
                "waiting for a change to the Capsule or what it references",
            ),
            verdict(STALLED, true, r.reason.clone(), r.message.clone()),
        ],
    };
    match &obs.qdrant {
        Some(Ok(q)) => out.push(verdict(
            QDRANT_LOADED,
            true,
            "Loaded",
            format!(
                "Qdrant collection {} holds the {} chunks of {}",
                q.collection, q.points, q.digest
            ),
        )),
        Some(Err(r)) => out.push(verdict(
            QDRANT_LOADED,
            false,
            r.reason.clone(),
            r.message.clone(),
        )),
        None => {}
    }
    if let Some(p) = &obs.policy {
        out.push(verdict(
            POLICY_ALLOWED,
            p.condition.status == "True",
            p.condition.reason,
            p.condition.message.clone(),
        ));
    }
    out
}

/// The status the Capsule should have, given its old status and what was observed at `now`.
pub fn capsule_status(
    old: Option<&CapsuleStatus>,
    obs: &CapsuleObserved,
    now: &Time,
) -> CapsuleStatus {
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let (verified_digest, signer, verified_at) = match &obs.outcome {
        Ok(v) => {
            let same = old.is_some_and(|o| {
                o.verified_digest.as_deref() == Some(v.digest.as_str())
                    && o.signer.as_deref() == Some(v.signer.as_str())
            });
            let at = old
                .and_then(|o| o.verified_at.clone())
                .filter(|_| same)
                .unwrap_or_else(|| now.0.to_string());
            (Some(v.digest.clone()), Some(v.signer.clone()), Some(at))
        }
        Err(_) => (None, None, None),
    };
    CapsuleStatus {
        observed_generation: obs.generation,
        conditions: conditions(old_conditions, &verdicts(obs), obs.generation, now),
        verified_digest,
        signer,
        verified_at,
        qdrant: obs.qdrant.as_ref().and_then(|q| q.as_ref().ok()).cloned(),
    }
}

/// Whether a Capsule's status says it is Ready, and if not, why (reason and message).
pub fn readiness(status: Option<&CapsuleStatus>) -> Result<(), (String, String)> {
    let ready = status.and_then(|s| s.conditions.iter().find(|c| c.type_ == READY));
    match ready {
        Some(c) if c.status == "True" => Ok(()),
        Some(c) => Err((c.reason.clone(), c.message.clone())),
        None => Err((
            "NotVerifiedYet".to_owned(),
            "the Capsule has not been verified yet".to_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("time"))
    }

    fn verified() -> Result<Verified, Rejection> {
        Ok(Verified {
            digest: "sha256:aa".into(),
            signer: "key sha256:bb".into(),
        })
    }

    fn rejected(transient: bool) -> Result<Verified, Rejection> {
        Err(Rejection {
            reason: "SignatureInvalid".into(),
            message: "no signature by the key".into(),
            transient,
            recheck: false,
        })
    }

    fn obs(outcome: Result<Verified, Rejection>) -> CapsuleObserved {
        CapsuleObserved {
            generation: Some(2),
            outcome,
            policy: None,
            qdrant: None,
        }
    }

    fn cond<'a>(s: &'a CapsuleStatus, t: &str) -> (&'a str, &'a str) {
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == t)
            .expect("condition");
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn table_of_outcomes() {
        let s = capsule_status(None, &obs(verified()), &at(10));
        assert_eq!(cond(&s, READY), ("True", "Verified"));
        assert_eq!(s.verified_digest.as_deref(), Some("sha256:aa"));
        assert_eq!(s.signer.as_deref(), Some("key sha256:bb"));
        assert!(readiness(Some(&s)).is_ok());

        let s = capsule_status(None, &obs(rejected(false)), &at(10));
        assert_eq!(cond(&s, READY), ("False", "SignatureInvalid"));
        assert_eq!(cond(&s, STALLED), ("True", "SignatureInvalid"));
        assert_eq!(s.verified_digest, None);
        assert_eq!(
            readiness(Some(&s)),
            Err(("SignatureInvalid".into(), "no signature by the key".into()))
        );

        let s = capsule_status(None, &obs(rejected(true)), &at(10));
        assert_eq!(cond(&s, RECONCILING), ("True", "SignatureInvalid"));
        assert_eq!(cond(&s, STALLED).0, "False");
        assert_eq!(readiness(None).expect_err("no status").0, "NotVerifiedYet");
    }

    #[test]
    fn converged_status_is_unchanged_and_verified_at_kept() {
        let first = capsule_status(None, &obs(verified()), &at(10));
        let again = capsule_status(Some(&first), &obs(verified()), &at(99));
        assert_eq!(first, again);
        // A new signer is a new verification.
        let other = Ok(Verified {
            digest: "sha256:aa".into(),
            signer: "someone else".into(),
        });
        let moved = capsule_status(Some(&first), &obs(other), &at(99));
        assert_ne!(moved.verified_at, first.verified_at);
        // Losing verification clears the claim.
        let lost = capsule_status(Some(&first), &obs(rejected(false)), &at(99));
        assert_eq!((lost.verified_digest, lost.verified_at), (None, None));
    }

    #[test]
    fn a_qdrant_collection_is_in_status_only_while_loaded() {
        let loaded = QdrantCollectionStatus {
            collection: "soma_team_sha256_aa".into(),
            digest: "sha256:aa".into(),
            points: 12,
        };
        let mut o = obs(verified());
        o.qdrant = Some(Ok(loaded.clone()));
        let s = capsule_status(None, &o, &at(10));
        assert_eq!(s.qdrant.as_ref(), Some(&loaded));
        assert_eq!(cond(&s, QDRANT_LOADED), ("True", "Loaded"));
        assert_eq!(cond(&s, READY), ("True", "Verified"));
        // Unchanged when nothing changed (no status write, no new reconcile).
        assert_eq!(capsule_status(Some(&s), &o, &at(99)), s);

        o.qdrant = Some(Err(Rejection {
            reason: "QdrantUnavailable".into(),
            message: "Qdrant count failed: connection refused".into(),
            transient: true,
            recheck: false,
        }));
        let failed = capsule_status(Some(&s), &o, &at(20));
        assert_eq!(failed.qdrant, None);
        assert_eq!(cond(&failed, QDRANT_LOADED), ("False", "QdrantUnavailable"));
        // Verification stands on its own: the Capsule stays Ready.
        assert_eq!(cond(&failed, READY), ("True", "Verified"));

        // Not opted in: no condition at all.
        let plain = capsule_status(None, &obs(verified()), &at(10));
        assert!(plain.conditions.iter().all(|c| c.type_ != QDRANT_LOADED));
        assert_eq!(plain.qdrant, None);
    }
}
