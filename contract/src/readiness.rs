//! What a sidecar's `GET /readyz` answers, read by the operator to say on the Agent why its
//! sidecars hold no provider key (the `CredentialsUnavailable` condition).
//!
//! ```text
//!  sidecar: KeyHolder::readiness ─► GET /readyz (200 ready │ 503 not ready) ─► Readiness (JSON)
//!  operator: every pod of an Agent with Vault credentials ─► Readiness ─► CredentialsUnavailable
//! ```
//!
//! Nothing in it is secret: the message is built from Vault's status code, its error text
//! (scrubbed of login material) and the configured path, never from a token or a key.

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
}

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
                problem: None
            }
        );
        assert_eq!(serde_json::to_string(&ok).unwrap(), r#"{"ready":true}"#);
    }
}
