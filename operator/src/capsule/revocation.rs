//! Revocation that reaches running pods: when a Capsule is revoked (`spec.revoked`) or its
//! signature stops verifying (a permanent rejection of the signature check), the Capsule
//! controller writes a row to the ledger's `soma_capsule_revocations` and notifies
//! `soma_live`; every sidecar holding that digest answers recall with 410 and the reason
//! within the notification's latency. When the Capsule verifies again the row is removed.
//!
//! ```text
//!  Capsule revoked / signature rejected ─► decide (pure) ─► Revoke {digest, reason} ─► ledger row + NOTIFY 'capsule:ns/name'
//!  Capsule Ready again                  ─► decide (pure) ─► Reinstate {digest}      ─► row removed + NOTIFY
//!  a registry that did not answer, a policy decision ─► nothing (the pods keep what they hold)
//! ```
//!
//! The same decision, read back from the Capsule's status ([`standing`]), reaches the running
//! pods of every Agent listing the Capsule through its sidecar's ConfigMap (`revokedCapsules`,
//! [`revoked_list`]), with or without a ledger: the sidecar follows its file.
//!
//! ```text
//!  Agent held back by a Capsule ─► standing (pure, from the Capsule) ─► revoked_list (pure)
//!    ─► the sidecar ConfigMap's revokedCapsules (live: the pods are not rolled)
//! ```

use soma_contract::recall::RevokedCapsule;
use soma_crds::Capsule;
use soma_crds::common::condition_types::{READY, STALLED};

use super::verify::{Rejection, Verified};

/// What the sidecars must be told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Publish {
    /// Stop serving `digest`, for `reason`.
    Revoke {
        /// The digest the Capsule pins (the content its pods hold).
        digest: String,
        /// Why, in words a user can act on.
        reason: String,
    },
    /// `digest` verifies again.
    Reinstate {
        /// The digest.
        digest: String,
    },
}

/// The digest a Capsule pins (what its pods hold), for the sources that are delivered.
fn pinned(capsule: &Capsule) -> Option<String> {
    let source = &capsule.spec.source;
    source
        .oci
        .as_ref()
        .map(|o| o.digest.clone())
        .or_else(|| source.config_map_ref.as_ref().map(|c| c.digest.clone()))
        .filter(|d| !d.is_empty())
}

/// Pure: what to publish for a reconcile's outcome. `checked` is whether the outcome is the
/// signature check's (not a revocation's or a policy's).
pub fn decide(
    capsule: &Capsule,
    outcome: &Result<Verified, Rejection>,
    checked: bool,
) -> Option<Publish> {
    let digest = pinned(capsule)?;
    let name = capsule.metadata.name.as_deref().unwrap_or_default();
    let namespace = capsule.metadata.namespace.as_deref().unwrap_or_default();
    match outcome {
        Ok(_) => Some(Publish::Reinstate { digest }),
        Err(r) if r.reason == "Revoked" => Some(Publish::Revoke {
            digest,
            reason: format!("Capsule {namespace}/{name} is revoked (spec.revoked)"),
        }),
        Err(r) if checked && !r.transient => Some(Publish::Revoke {
            digest,
            reason: format!(
                "the signature of Capsule {namespace}/{name} no longer verifies ({}): {}",
                r.reason, r.message
            ),
        }),
        Err(_) => None,
    }
}

/// What a Capsule's object says of the content it pins, for the pods holding it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Verified: may be used.
    Usable,
    /// Revoked, or its signature no longer verifies.
    Revoked(RevokedCapsule),
    /// Not known now (a registry that did not answer, a policy's decision, a status not yet
    /// written for the current spec): the pods keep what they were told.
    Unknown,
}

/// Pure: [`decide`], read back from the Capsule's spec and the status its controller wrote
/// (the Ready condition's reason and message, Stalled for a permanent rejection).
pub fn standing(capsule: &Capsule) -> Standing {
    let name = capsule.metadata.name.clone().unwrap_or_default();
    let as_standing = |p: Option<Publish>| match p {
        Some(Publish::Revoke { digest, reason }) => Standing::Revoked(RevokedCapsule {
            name: name.clone(),
            digest,
            reason,
        }),
        Some(Publish::Reinstate { .. }) => Standing::Usable,
        None => Standing::Unknown,
    };
    let rejected = |reason: &str, message: &str, transient: bool| -> Result<Verified, Rejection> {
        Err(Rejection {
            reason: reason.to_owned(),
            message: message.to_owned(),
            transient,
            recheck: false,
        })
    };
    if capsule.spec.revoked {
        return as_standing(decide(capsule, &rejected("Revoked", "", false), false));
    }
    let Some(status) = capsule.status.as_ref() else {
        return Standing::Unknown;
    };
    if status.observed_generation != capsule.metadata.generation {
        return Standing::Unknown;
    }
    let condition = |t: &str| status.conditions.iter().find(|c| c.type_ == t);
    let Some(ready) = condition(READY) else {
        return Standing::Unknown;
    };
    if ready.status == "True" {
        return Standing::Usable;
    }
    if ready.reason == "Revoked" {
        // Written for a spec that said revoked; this one does not (decided above).
        return Standing::Unknown;
    }
    let permanent = condition(STALLED).is_some_and(|c| c.status == "True");
    // The signature check's own outcomes, not a revocation's or a policy's.
    let checked = !matches!(ready.reason.as_str(), "PolicyDenied" | "PolicyError");
    as_standing(decide(
        capsule,
        &rejected(&ready.reason, &ready.message, !permanent),
        checked,
    ))
}

/// Pure: a sidecar's `revokedCapsules` after the standings of the Capsules its workload lists
/// (by name): a revoked one is named with its digest and reason, a usable one is dropped,
/// one not known now keeps what the list said. Entries for Capsules not listed stay (the pods
/// may still hold them). Sorted by name, so an unchanged list is the same bytes.
pub fn revoked_list(
    current: &[RevokedCapsule],
    standings: &[(String, Standing)],
) -> Vec<RevokedCapsule> {
    let mut out: Vec<RevokedCapsule> = current.to_vec();
    for (name, s) in standings {
        match s {
            Standing::Revoked(r) => {
                out.retain(|c| c.name != *name);
                out.push(r.clone());
            }
            Standing::Usable => out.retain(|c| c.name != *name),
            Standing::Unknown => {}
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.digest.cmp(&b.digest)));
    out.dedup();
    out
}

/// Writes `publish` to the ledger; returns whether a row changed.
pub async fn publish(
    pool: &sqlx::PgPool,
    namespace: &str,
    name: &str,
    publish: &Publish,
) -> Result<bool, sqlx::Error> {
    match publish {
        Publish::Revoke { digest, reason } => {
            soma_ledger::live::revoke_capsule(
                pool,
                &soma_ledger::live::CapsuleRevocation {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    digest: digest.clone(),
                    reason: reason.clone(),
                },
            )
            .await
        }
        Publish::Reinstate { digest } => {
            soma_ledger::live::reinstate_capsule(pool, namespace, name, digest).await
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn capsule(revoked: bool) -> Capsule {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "soma.dev/v1alpha1", "kind": "Capsule",
            "metadata": {"name": "kb", "namespace": "team"},
            "spec": {"version": "1.0.0", "policyHash": format!("sha256:{}", "9".repeat(64)),
                     "revoked": revoked,
                     "source": {"oci": {"repository": "r.example/kb", "digest": format!("sha256:{}", "a".repeat(64))}},
                     "signature": {}}
        }))
        .unwrap()
    }

    fn rejected(reason: &str, transient: bool) -> Result<Verified, Rejection> {
        Err(Rejection {
            reason: reason.into(),
            message: "m".into(),
            transient,
            recheck: false,
        })
    }

    fn with_status(mut c: Capsule, ready: (&str, &str), stalled: bool) -> Capsule {
        c.metadata.generation = Some(2);
        let cond = |t: &str, status: &str, reason: &str| {
            serde_json::json!({"type": t, "status": status, "reason": reason, "message": "m",
                               "lastTransitionTime": "2026-12-07T00:00:00Z", "observedGeneration": 2})
        };
        c.status = Some(
            serde_json::from_value(serde_json::json!({
                "observedGeneration": 2,
                "conditions": [cond("Ready", ready.0, ready.1),
                               cond("Stalled", if stalled { "True" } else { "False" }, ready.1)]
            }))
            .unwrap(),
        );
        c
    }

    #[test]
    fn the_standing_read_from_the_status_is_the_decision_the_controller_made() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let revoked = |reason: &str| {
            Standing::Revoked(RevokedCapsule {
                name: "kb".into(),
                digest: digest.clone(),
                reason: reason.into(),
            })
        };
        // spec.revoked decides at once, before the controller wrote anything.
        assert_eq!(
            standing(&capsule(true)),
            revoked("Capsule team/kb is revoked (spec.revoked)")
        );
        assert_eq!(
            standing(&capsule(false)),
            Standing::Unknown,
            "no status yet"
        );
        let cases = [
            (("True", "Verified"), false, Standing::Usable),
            (
                ("False", "SignatureInvalid"),
                true,
                revoked(
                    "the signature of Capsule team/kb no longer verifies (SignatureInvalid): m",
                ),
            ),
            // A registry that did not answer; a policy; a revocation lifted in the spec but
            // not yet re-verified: the pods keep what they were told.
            (
                ("False", "VerificationUnavailable"),
                false,
                Standing::Unknown,
            ),
            (("False", "PolicyDenied"), true, Standing::Unknown),
            (("False", "Revoked"), true, Standing::Unknown),
        ];
        for (ready, stalled, want) in cases {
            assert_eq!(
                standing(&with_status(capsule(false), ready, stalled)),
                want,
                "{ready:?}"
            );
        }
        // A status written for an older generation says nothing of the current spec.
        let mut stale = with_status(capsule(false), ("True", "Verified"), false);
        stale.metadata.generation = Some(3);
        assert_eq!(standing(&stale), Standing::Unknown);
    }

    #[test]
    fn the_revoked_list_follows_the_standings_and_keeps_what_is_unknown() {
        let r = |name: &str, reason: &str| RevokedCapsule {
            name: name.into(),
            digest: format!("sha256:{name}"),
            reason: reason.into(),
        };
        let current = vec![r("old", "x"), r("kb", "first reason"), r("faq", "y")];
        let next = revoked_list(
            &current,
            &[
                ("kb".into(), Standing::Revoked(r("kb", "second reason"))),
                ("faq".into(), Standing::Usable),
                ("notes".into(), Standing::Unknown),
                ("docs".into(), Standing::Revoked(r("docs", "z"))),
            ],
        );
        assert_eq!(
            next,
            vec![r("docs", "z"), r("kb", "second reason"), r("old", "x")]
        );
        assert_eq!(revoked_list(&next, &[]), next, "nothing known: unchanged");
        assert!(revoked_list(&[], &[("kb".into(), Standing::Usable)]).is_empty());
    }

    #[test]
    fn revoked_and_rejected_signatures_revoke_others_change_nothing() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let revoke = |r: &str| {
            Some(Publish::Revoke {
                digest: digest.clone(),
                reason: r.to_owned(),
            })
        };
        assert_eq!(
            decide(&capsule(true), &rejected("Revoked", false), false),
            revoke("Capsule team/kb is revoked (spec.revoked)")
        );
        assert_eq!(
            decide(&capsule(false), &rejected("SignatureInvalid", false), true),
            revoke("the signature of Capsule team/kb no longer verifies (SignatureInvalid): m")
        );
        // A registry that did not answer, or a policy's decision: the pods keep what they hold.
        assert_eq!(
            decide(
                &capsule(false),
                &rejected("VerificationUnavailable", true),
                true
            ),
            None
        );
        assert_eq!(
            decide(&capsule(false), &rejected("PolicyDenied", false), false),
            None
        );
    }
}
