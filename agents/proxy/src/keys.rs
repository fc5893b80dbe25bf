//! The provider key the request path uses, behind an atomic swap, and why there is none.
//!
//! ```text
//!  file / none ──(at start)──────────────┐
//!  vault::run ──(login, read, rotate)────┴─► KeyHolder ──current()──► a request's own snapshot
//!  forward: provider 401 with the key ──► rejected() ──► not ready, vault::run woken to re-read
//! ```
//!
//! A request takes a snapshot ([`KeyHolder::current`]) and uses it for its whole life: a new
//! key swapped in while a stream is being relayed does not touch that stream (the key is only
//! in the request's headers, already sent), so rotation drops nothing in flight.
//!
//! What happens when a refresh fails depends on who said no. Vault unreachable (or sealed) is
//! an outage: the key in hand still works at the provider, so it keeps serving and the failure
//! is logged and shown on `/readyz`. Vault *answering* no (login refused, permission denied,
//! path or field missing) is a decision by whoever runs Vault: the key is dropped, the sidecar
//! goes not-ready and requests get 503 until Vault hands out a key again.

use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::upstream::ProviderKey;

/// Why there is no usable key, as `/readyz` and the 503 body say it. The message never holds
/// a secret (it is built from Vault's status, its error text and the configured path).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// A short CamelCase reason (the `reason` of the Agent's `CredentialsUnavailable`).
    pub reason: Reason,
    /// What a user can act on.
    pub message: String,
}

/// [`Problem::reason`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Reason {
    /// The first fetch has not finished.
    VaultPending,
    /// The `credentials.vault` settings cannot work (no address, an unreadable CA bundle or
    /// login file, a missing role).
    VaultMisconfigured,
    /// No answer from Vault, or Vault is sealed or on standby without a leader.
    VaultUnreachable,
    /// Vault refused the login.
    VaultLoginFailed,
    /// Vault's policy does not allow reading the secret.
    VaultPermissionDenied,
    /// No secret at the path (or not that version).
    VaultPathNotFound,
    /// The secret has no such field, or it is not a non-empty string.
    VaultKeyMissing,
    /// The provider answered 401 to the current key.
    ProviderRejectedKey,
}

impl Reason {
    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::VaultPending => "VaultPending",
            Reason::VaultMisconfigured => "VaultMisconfigured",
            Reason::VaultUnreachable => "VaultUnreachable",
            Reason::VaultLoginFailed => "VaultLoginFailed",
            Reason::VaultPermissionDenied => "VaultPermissionDenied",
            Reason::VaultPathNotFound => "VaultPathNotFound",
            Reason::VaultKeyMissing => "VaultKeyMissing",
            Reason::ProviderRejectedKey => "ProviderRejectedKey",
        }
    }

    /// Every reason, for metric series that start at 0.
    pub const ALL: [Reason; 8] = [
        Reason::VaultPending,
        Reason::VaultMisconfigured,
        Reason::VaultUnreachable,
        Reason::VaultLoginFailed,
        Reason::VaultPermissionDenied,
        Reason::VaultPathNotFound,
        Reason::VaultKeyMissing,
        Reason::ProviderRejectedKey,
    ];

    /// Whether the key in hand is kept: only when Vault could not be asked at all.
    fn keeps_key(self) -> bool {
        matches!(self, Reason::VaultUnreachable | Reason::VaultPending)
    }
}

impl Problem {
    /// A problem.
    pub fn new(reason: Reason, message: impl Into<String>) -> Problem {
        Problem {
            reason,
            message: message.into(),
        }
    }
}

/// What the holder holds.
#[derive(Debug, Default)]
struct Held {
    key: Option<Arc<ProviderKey>>,
    problem: Option<Problem>,
}

/// What `/readyz` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Readiness {
    /// Requests can be served with a key the provider has not refused.
    pub ready: bool,
    /// Why not, or (when still ready) the last refresh's failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<Problem>,
}

impl Readiness {
    /// The contract's form, as `/readyz` answers it.
    pub fn to_wire(&self) -> soma_contract::readiness::Readiness {
        soma_contract::readiness::Readiness {
            ready: self.ready,
            problem: self
                .problem
                .as_ref()
                .map(|p| soma_contract::readiness::ReadinessProblem {
                    reason: p.reason.as_str().to_owned(),
                    message: p.message.clone(),
                }),
            ledger: None,
        }
    }
}

/// The current key, swapped atomically.
#[derive(Debug)]
pub struct KeyHolder {
    held: ArcSwap<Held>,
    /// Wakes the Vault refresher (a provider 401: re-read now).
    wake: tokio::sync::Notify,
}

impl KeyHolder {
    /// A holder with `key` (a file, or none).
    pub fn with_key(key: ProviderKey) -> KeyHolder {
        KeyHolder {
            held: ArcSwap::from_pointee(Held {
                key: Some(Arc::new(key)),
                problem: None,
            }),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// A holder waiting for its first key.
    pub fn pending(problem: Problem) -> KeyHolder {
        KeyHolder {
            held: ArcSwap::from_pointee(Held {
                key: None,
                problem: Some(problem),
            }),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// The key a request uses for its whole life, or why there is none.
    pub fn current(&self) -> Result<Arc<ProviderKey>, Problem> {
        let held = self.held.load();
        match (&held.key, &held.problem) {
            (Some(k), _) => Ok(k.clone()),
            (None, Some(p)) => Err(p.clone()),
            (None, None) => Err(Problem::new(Reason::VaultPending, "no provider key yet")),
        }
    }

    /// Installs a freshly read key. Returns whether it differs from the one held (a rotation).
    pub fn set(&self, key: ProviderKey) -> bool {
        let old = self.held.load();
        let same = old.key.as_deref() == Some(&key);
        // Re-reading the key the provider refused does not make it acceptable again.
        let problem = match &old.problem {
            Some(p) if same && p.reason == Reason::ProviderRejectedKey => Some(p.clone()),
            _ => None,
        };
        let key = match (&old.key, same) {
            (Some(k), true) => k.clone(),
            _ => Arc::new(key),
        };
        self.held.store(Arc::new(Held {
            key: Some(key),
            problem,
        }));
        !same && old.key.is_some()
    }

    /// A refresh failed: the key is kept only when Vault could not be asked (module docs).
    pub fn failed(&self, problem: Problem) {
        let old = self.held.load();
        let key = if problem.reason.keeps_key() {
            old.key.clone()
        } else {
            None
        };
        self.held.store(Arc::new(Held {
            key,
            problem: Some(problem),
        }));
    }

    /// The provider answered 401 to `key`: if it is still the current key, the sidecar is not
    /// ready until a different key is read (the refresher is woken to read now).
    pub fn rejected(&self, key: &Arc<ProviderKey>) {
        let old = self.held.load();
        if !old.key.as_ref().is_some_and(|k| Arc::ptr_eq(k, key)) {
            return;
        }
        if old
            .problem
            .as_ref()
            .is_some_and(|p| p.reason == Reason::ProviderRejectedKey)
        {
            return;
        }
        self.held.store(Arc::new(Held {
            key: old.key.clone(),
            problem: Some(Problem::new(
                Reason::ProviderRejectedKey,
                "the provider answered 401 to the current key; it is re-read from Vault",
            )),
        }));
        self.wake.notify_one();
    }

    /// The provider accepted `key`: a 401 it answered before was not about the key.
    pub fn accepted(&self, key: &Arc<ProviderKey>) {
        let old = self.held.load();
        if old.key.as_ref().is_some_and(|k| Arc::ptr_eq(k, key))
            && old
                .problem
                .as_ref()
                .is_some_and(|p| p.reason == Reason::ProviderRejectedKey)
        {
            self.held.store(Arc::new(Held {
                key: old.key.clone(),
                problem: None,
            }));
        }
    }

    /// Ready: a key the provider has not refused.
    pub fn readiness(&self) -> Readiness {
        let held = self.held.load();
        let refused = held
            .problem
            .as_ref()
            .is_some_and(|p| p.reason == Reason::ProviderRejectedKey);
        Readiness {
            ready: held.key.is_some() && !refused,
            problem: held.problem.clone(),
        }
    }

    /// Waits until a request reports the key refused.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(k: &str) -> ProviderKey {
        ProviderKey::new(Some(k.into()))
    }

    #[test]
    fn outage_keeps_the_key_and_a_denial_drops_it() {
        let h = KeyHolder::pending(Problem::new(Reason::VaultPending, "starting"));
        assert!(!h.readiness().ready);
        assert_eq!(h.current().unwrap_err().reason, Reason::VaultPending);
        assert!(!h.set(key("a")), "the first key is not a rotation");
        let a = h.current().unwrap();
        h.failed(Problem::new(Reason::VaultUnreachable, "down"));
        assert!(h.readiness().ready, "an outage keeps serving");
        assert_eq!(
            h.readiness().problem.unwrap().reason,
            Reason::VaultUnreachable
        );
        assert!(Arc::ptr_eq(&h.current().unwrap(), &a));
        h.failed(Problem::new(Reason::VaultPermissionDenied, "no"));
        assert!(!h.readiness().ready);
        assert_eq!(
            h.current().unwrap_err().reason,
            Reason::VaultPermissionDenied
        );
        assert!(!h.set(key("a")));
        assert!(h.readiness().ready);
    }

    #[test]
    fn a_snapshot_outlives_a_rotation_and_a_refusal_waits_for_a_new_key() {
        let h = KeyHolder::with_key(key("old"));
        let snap = h.current().unwrap();
        assert!(h.set(key("new")));
        assert_eq!(*snap, key("old"), "the in-flight request keeps its key");
        // A 401 to the old key says nothing about the new one.
        h.rejected(&snap);
        assert!(h.readiness().ready);
        let now = h.current().unwrap();
        h.rejected(&now);
        assert_eq!(
            h.readiness().problem.unwrap().reason,
            Reason::ProviderRejectedKey
        );
        assert!(!h.readiness().ready);
        assert!(!h.set(key("new")), "the same key again");
        assert!(!h.readiness().ready, "still the refused key");
        h.accepted(&h.current().unwrap());
        assert!(h.readiness().ready, "the provider took it after all");
        h.rejected(&h.current().unwrap());
        assert!(h.set(key("newer")));
        assert!(h.readiness().ready);
    }
}
