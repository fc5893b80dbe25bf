//! What a sidecar's `GET /readyz` answers, read by the operator to say on the Agent why its
//! sidecars hold no provider key, or no ledger user from Vault (the `CredentialsUnavailable`
//! condition).
//!
//! ```text
//!  sidecar: KeyHolder::readiness ─┬─► GET /readyz (200 ready │ 503 not ready) ─► Readiness (JSON)
//!           LedgerAccess (lease) ─┘     `ledger`: with ledgerCredentials only; never turns it 503
//!  operator: every pod of an Agent with Vault credentials ─► Readiness ─► CredentialsUnavailable
//! ```
//!
//! Nothing in it is secret: the message is built from Vault's status code, its error text
//! (scrubbed of login material) and the configured path, never from a token, a key, a
//! password or a lease id.

use serde::{Deserialize, Serialize};

/// The admin-port path a sidecar serves its [`Readiness`] on.
pub const READYZ_PATH: &str = "/readyz";

/// `GET /readyz`: whether the sidecar can serve, and why not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    /// Requests can be served with a key the provider has not refused.
    pub ready: bool,
    /// Why not, or (when still ready) the last credential refresh's failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<ReadinessProblem>,
    /// With `ledgerCredentials`: the ledger's PostgreSQL user from Vault. It does not decide
    /// `ready` (requests are served and their usage waits in the sidecar's durable outbox), so
    /// the operator reads it here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<LedgerReadiness>,
}

/// [`Readiness::ledger`]: whether the sidecar can deliver usage to the ledger as the user Vault
/// leased it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerReadiness {
    /// A leased user whose lease has not ended is in use.
    pub usable: bool,
    /// Why not, or (when still usable) the last renewal's or read's failure. Its reason is
    /// one of [`LEDGER_REASONS`], never a provider-key reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<ReadinessProblem>,
}

/// The reasons of a [`LedgerReadiness::problem`]: Vault's answer to the database secrets
/// engine, prefixed so that it is not mistaken for a provider-key reason on the Agent.
pub const LEDGER_REASONS: [&str; 6] = [
    "LedgerCredentialsPending",
    "LedgerVaultMisconfigured",
    "LedgerVaultUnreachable",
    "LedgerVaultLoginFailed",
    "LedgerVaultPermissionDenied",
    "LedgerVaultRoleNotFound",
];

/// [`Readiness::problem`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadinessProblem {
    /// A short CamelCase reason from Vault's answer (`VaultPathNotFound`,
    /// `VaultPermissionDenied`, `VaultUnreachable`, ...), the reason of the Agent's condition.
    pub reason: String,
    /// What a user can act on; no secret.
    pub message: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_what_the_sidecar_writes() {
        let r: Readiness = serde_json::from_str(
            r#"{"ready": false, "problem": {"reason": "VaultPathNotFound", "message": "no secret at secret/data/x"}}"#,
        )
        .unwrap();
        assert_eq!(r.problem.as_ref().unwrap().reason, "VaultPathNotFound");
        let ok: Readiness = serde_json::from_str(r#"{"ready": true}"#).unwrap();
        assert_eq!(
            ok,
            Readiness {
                ready: true,
                problem: None,
                ledger: None,
            }
        );
        assert_eq!(serde_json::to_string(&ok).unwrap(), r#"{"ready":true}"#);
        let with_ledger: Readiness = serde_json::from_str(
            r#"{"ready": true, "ledger": {"usable": false, "problem": {"reason": "LedgerVaultPermissionDenied", "message": "m"}}}"#,
        )
        .unwrap();
        let l = with_ledger.ledger.unwrap();
        assert!(!l.usable);
        assert!(LEDGER_REASONS.contains(&l.problem.unwrap().reason.as_str()));
    }
}
