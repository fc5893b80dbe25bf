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

use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

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

    /// New credentials for every pool, now and for connections opened from now on.
    pub fn set_credentials(&self, username: &str, password: &str) {
        let options = self.base.clone().username(username).password(password);
        let mut inner = self.inner();
        for pool in &inner.pools {
            pool.set_connect_options(options.clone());
        }
        inner.current = options;
        inner.swapped_at = Some(Instant::now());
    }
}
