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
//! Without a ledger nothing is published: the Agent reports `CapsuleNotReady` and starts
//! nothing new with the Capsule, and running pods keep serving it until they are replaced
//! (docs/capsules.md).

use soma_crds::Capsule;

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
