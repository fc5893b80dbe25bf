//! How the sidecar connects to the ledger's PostgreSQL: every pool (usage delivery, the live
//! configuration listener, the cluster budget authority) is made here from `databaseUrl`, so
//! that credentials from Vault's database secrets engine reach all of them at once.
//!
//! ```text
//!  databaseUrl ─► LedgerAccess ─► pool(..) ×3 (lazy: the sidecar serves while the database is down)
//!  vault::run: new lease ─► LedgerAccess::set_credentials(user, password)
//!     ─► every pool's connect options swapped; connections opened before the swap are
//!        discarded when next acquired (so none keeps using a user about to be revoked)
//! ```
//!
//! The outbox is local and durable: a delivery round that fails while credentials change is
//! retried with the next ones, and no usage record is lost.
//!
//! With credentials from Vault it also keeps what `/readyz` says about them
//! ([`LedgerAccess::readiness`]): whether a leased user whose lease has not ended is in use,
//! and the last round's failure, with a `Ledger…` reason of its own.

use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use soma_contract::readiness::{LedgerReadiness, ReadinessProblem};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::keys::{Problem, Reason};

/// The ledger's connection settings and the pools made from them.
pub struct LedgerAccess {
    base: PgConnectOptions,
    inner: Mutex<Inner>,
}

struct Inner {
    current: PgConnectOptions,
    /// When the credentials last changed: connections older than this are discarded.
    swapped_at: Option<Instant>,
    pools: Vec<PgPool>,
    /// When the lease on the current credentials ends (credentials from Vault only).
    lease_ends: Option<Instant>,
    /// The last round's failure (credentials from Vault only); cleared by a good round.
    problem: Option<Problem>,
}

impl std::fmt::Debug for LedgerAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerAccess")
            .field("host", &self.base.get_host())
            .field("database", &self.base.get_database())
            .finish_non_exhaustive()
    }
}

impl LedgerAccess {
    /// Settings from `url` (its user and password are used until [`Self::set_credentials`]).
    pub fn new(url: &str) -> Result<Arc<LedgerAccess>, sqlx::Error> {
        let base = PgConnectOptions::from_str(url)?;
        Ok(Arc::new(LedgerAccess {
            inner: Mutex::new(Inner {
                current: base.clone(),
                swapped_at: None,
                pools: Vec::new(),
                lease_ends: None,
                problem: None,
            }),
            base,
        }))
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A lazy pool of at most `max` connections (acquire bounded by `acquire`), following
    /// credential changes.
    pub fn pool(self: &Arc<Self>, max: u32, acquire: Duration) -> PgPool {
        let me = Arc::downgrade(self);
        let mut inner = self.inner();
        let pool = PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(acquire)
            .before_acquire(move |_conn, meta| {
                // Opened before the last credential change: drop it, a new one is opened with
                // the current user.
                let keep = me.upgrade().is_none_or(|access| {
                    access
                        .inner()
                        .swapped_at
                        .is_none_or(|at| meta.age < at.elapsed())
                });
                Box::pin(async move { Ok(keep) })
            })
            .connect_lazy_with(inner.current.clone());
        inner.pools.push(pool.clone());
        pool
    }

    /// New credentials for every pool, now and for connections opened from now on, leased
    /// for `ttl`.
    pub fn set_credentials(&self, username: &str, password: &str, ttl: Duration) {
        let options = self.base.clone().username(username).password(password);
        let mut inner = self.inner();
        for pool in &inner.pools {
            pool.set_connect_options(options.clone());
        }
        inner.current = options;
        let now = Instant::now();
        inner.swapped_at = Some(now);
        inner.lease_ends = Some(now + ttl);
        inner.problem = None;
    }

    /// The lease on the current credentials was renewed for `ttl`.
    pub fn renewed(&self, ttl: Duration) {
        let mut inner = self.inner();
        inner.lease_ends = Some(Instant::now() + ttl);
        inner.problem = None;
    }

    /// A round failed: the current credentials (if any) stay in use until their lease ends.
    pub fn failed(&self, problem: Problem) {
        self.inner().problem = Some(problem);
    }

    /// Whether a leased user whose lease has not ended is in use.
    pub fn usable(&self) -> bool {
        self.inner()
            .lease_ends
            .is_some_and(|end| Instant::now() < end)
    }

    /// What `/readyz` says about the ledger's credentials from Vault.
    pub fn readiness(&self) -> LedgerReadiness {
        let inner = self.inner();
        let usable = inner.lease_ends.is_some_and(|end| Instant::now() < end);
        let said = |reason: Reason, message: String| ReadinessProblem {
            reason: ledger_reason(reason).to_owned(),
            message,
        };
        let problem = match (&inner.problem, inner.lease_ends) {
            (Some(p), _) if usable => Some(said(p.reason, p.message.clone())),
            (Some(p), _) => Some(said(
                p.reason,
                format!(
                    "{}; the sidecar has no ledger user, so usage waits in its outbox",
                    p.message
                ),
            )),
            (None, None) => Some(said(
                Reason::VaultPending,
                "the first read of the ledger's credentials from Vault has not finished".into(),
            )),
            (None, Some(_)) if !usable => Some(said(
                Reason::VaultPending,
                "the lease on the ledger's credentials ended; new ones are being read".into(),
            )),
            (None, Some(_)) => None,
        };
        LedgerReadiness { usable, problem }
    }
}

/// The `/readyz` reason of a ledger credentials failure: Vault's reason, prefixed (one of
/// `soma_contract::readiness::LEDGER_REASONS`).
pub fn ledger_reason(reason: Reason) -> &'static str {
    match reason {
        Reason::VaultPending => "LedgerCredentialsPending",
        Reason::VaultUnreachable => "LedgerVaultUnreachable",
        Reason::VaultLoginFailed => "LedgerVaultLoginFailed",
        Reason::VaultPermissionDenied => "LedgerVaultPermissionDenied",
        Reason::VaultPathNotFound => "LedgerVaultRoleNotFound",
        // Not answers about database credentials; kept apart from the provider key's all the
        // same.
        Reason::VaultMisconfigured | Reason::VaultKeyMissing | Reason::ProviderRejectedKey => {
            "LedgerVaultMisconfigured"
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_ledger_reason_is_in_the_contract_and_none_is_a_key_reason() {
        for r in Reason::ALL {
            let l = ledger_reason(r);
            assert!(soma_contract::readiness::LEDGER_REASONS.contains(&l), "{l}");
            assert!(Reason::ALL.iter().all(|k| k.as_str() != l), "{l}");
        }
    }

    #[test]
    fn readiness_follows_the_lease_and_the_last_round() {
        let access = LedgerAccess::new("postgres://db:5432/ledger").unwrap();
        let r = access.readiness();
        assert!(!r.usable);
        assert_eq!(r.problem.unwrap().reason, "LedgerCredentialsPending");
        access.failed(Problem::new(Reason::VaultPermissionDenied, "denied"));
        let r = access.readiness();
        assert!(!r.usable);
        let p = r.problem.unwrap();
        assert_eq!(p.reason, "LedgerVaultPermissionDenied");
        assert!(
            p.message.contains("usage waits in its outbox"),
            "{}",
            p.message
        );
        access.set_credentials("v-user", "pw", Duration::from_secs(3600));
        assert_eq!(
            access.readiness(),
            LedgerReadiness {
                usable: true,
                problem: None
            }
        );
        // Vault unreachable at renewal: the lease still runs, the failure is shown.
        access.failed(Problem::new(Reason::VaultUnreachable, "down"));
        let r = access.readiness();
        assert!(r.usable);
        assert_eq!(r.problem.unwrap().reason, "LedgerVaultUnreachable");
        access.renewed(Duration::from_secs(3600));
        assert_eq!(access.readiness().problem, None);
        // A lease that has ended (here: granted for no time at all) is no user.
        access.set_credentials("v-user2", "pw", Duration::ZERO);
        let r = access.readiness();
        assert!(!r.usable);
        assert_eq!(r.problem.unwrap().reason, "LedgerCredentialsPending");
        assert!(!format!("{:?}", access).contains("pw"));
    }
}
