//! Delivery from the outbox to the PostgreSQL ledger (`usage_records`, its per-minute
//! rollups and the audit chain; schema and statement in the `soma-ledger` crate).
//!
//! A background task links settled rows into this sidecar's audit chain, takes them in
//! batches, inserts them with `ON CONFLICT (id) DO NOTHING`, and only then marks them
//! delivered in the outbox. A sidecar that dies between the two steps delivers the batch again
//! on restart and the idempotency key keeps it once; a database outage only delays delivery
//! (the outbox keeps everything, and the task retries with backoff up to 30 s). Nothing here
//! is on the request path.
//!
//! ```text
//!  outbox (settled) ─chain─► (seq, prev_hash, hash) ─batch─► INSERT … ON CONFLICT DO NOTHING ─► mark delivered
//! ```

use std::time::Duration;

use sqlx::postgres::PgPool;

use crate::outbox::{Outbox, Sink};

/// The ledger's migrations (`soma-ledger`).
pub static MIGRATOR: &sqlx::migrate::Migrator = &soma_ledger::MIGRATOR;

/// Why a delivery round failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// Running the migrations failed.
    #[error("ledger migrations failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// Reading, chaining or marking the outbox failed.
    #[error("outbox read or mark failed")]
    Outbox(#[source] sqlx::Error),
    /// The insert failed.
    #[error("ledger insert failed")]
    Insert(#[source] sqlx::Error),
}

/// A connection pool to the ledger, created without connecting (the sidecar starts and
/// serves while the database is down).
pub fn pool(url: &str) -> Result<PgPool, sqlx::Error> {
    soma_ledger::pool(url, 2, Duration::from_secs(5))
}

/// One round: migrate if not yet done, chain and deliver up to `batch` rows. Returns how many.
pub async fn deliver_once(
    outbox: &Outbox,
    pool: &PgPool,
    migrated: &mut bool,
    batch: u32,
) -> Result<usize, DeliveryError> {
    if !*migrated {
        MIGRATOR.run(pool).await.map_err(DeliveryError::Migrate)?;
        *migrated = true;
    }
    let holder = outbox.holder_id().await.map_err(DeliveryError::Outbox)?;
    outbox
        .chain_pending(&holder, batch)
        .await
        .map_err(DeliveryError::Outbox)?;
    let rows = outbox
        .undelivered(Sink::Ledger, batch)
        .await
        .map_err(DeliveryError::Outbox)?;
    if rows.is_empty() {
        return Ok(0);
    }
    soma_ledger::deliver::insert(pool, &rows)
        .await
        .map_err(DeliveryError::Insert)?;
    let ids: Vec<String> = rows.into_iter().map(|r| r.id).collect();
    outbox
        .mark_delivered(Sink::Ledger, &ids, jiff::Timestamp::now())
        .await
        .map_err(DeliveryError::Outbox)?;
    Ok(ids.len())
}

/// The pacing both delivery tasks share: a full batch is followed at once by the next, an
/// empty or partial one by `interval`, a failure by a doubling backoff (at most 30 s).
#[derive(Debug)]
pub struct Pacer {
    interval: Duration,
    backoff: Duration,
    batch: u32,
}

impl Pacer {
    /// A pacer for rounds of up to `batch` rows.
    pub fn new(interval: Duration, batch: u32) -> Pacer {
        Pacer {
            interval,
            backoff: interval,
            batch,
        }
    }

    /// How long to wait after a round that delivered `result` rows.
    pub fn after<E: std::error::Error>(
        &mut self,
        what: &'static str,
        result: Result<usize, E>,
    ) -> Duration {
        match result {
            Ok(n) => {
                self.backoff = self.interval;
                if n as u64 >= u64::from(self.batch) {
                    Duration::ZERO
                } else {
                    self.interval
                }
            }
            Err(e) => {
                let cause = std::error::Error::source(&e).map(|s| s.to_string());
                let wait = self.backoff;
                tracing::warn!(error = %e, cause, retry_in_ms = wait.as_millis() as u64, "{what} failed; usage stays in the outbox");
                self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
                wait
            }
        }
    }
}

/// Delivers until `stop` turns true, paced by [`Pacer`]; then delivers what is left for at
/// most `flush` ([`Drain`]).
pub async fn run(
    outbox: Outbox,
    pool: PgPool,
    interval: Duration,
    batch: u32,
    meter: crate::metrics::DeliveryMeter,
    flush: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut migrated = false;
    let mut pacer = Pacer::new(interval, batch);
    loop {
        let result = deliver_once(&outbox, &pool, &mut migrated, batch).await;
        meter.round(&result);
        let wait = pacer.after("ledger delivery", result);
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    if let Some(mut drain) = Drain::start("ledger delivery", flush) {
        loop {
            let round = tokio::time::timeout_at(
                drain.deadline,
                deliver_once(&outbox, &pool, &mut migrated, batch),
            )
            .await
            .ok();
            if let Some(result) = &round {
                meter.round(result);
            }
            if !drain.go_on(round) {
                break;
            }
        }
    }
}

/// What a sidecar that is stopping does with its outbox: rounds of delivery, one after
/// another, until one finds nothing left, one fails (the database is down: no retries, the
/// pod is going), or the flush time has passed. A Job's pod is removed once it finishes, and
/// its outbox (an emptyDir) with it: this is the last chance to deliver.
#[derive(Debug)]
pub struct Drain {
    what: &'static str,
    flush: Duration,
    /// When the last round must have finished.
    pub deadline: tokio::time::Instant,
    delivered: usize,
}

impl Drain {
    /// A drain of at most `flush`; `None` when `flush` is zero (exit at once).
    pub fn start(what: &'static str, flush: Duration) -> Option<Drain> {
        (!flush.is_zero()).then(|| Drain {
            what,
            flush,
            deadline: tokio::time::Instant::now() + flush,
            delivered: 0,
        })
    }

    /// Whether to run another round after `round` (`None`: it ran out of time).
    pub fn go_on<E: std::error::Error>(&mut self, round: Option<Result<usize, E>>) -> bool {
        let more = match round {
            Some(Ok(0)) => false,
            Some(Ok(n)) => {
                self.delivered += n;
                true
            }
            Some(Err(e)) => {
                let cause = std::error::Error::source(&e).map(|s| s.to_string());
                tracing::warn!(error = %e, cause, "{} on stop failed; undelivered usage stays in the outbox", self.what);
                false
            }
            None => {
                tracing::warn!(
                    flush_ms = self.flush.as_millis() as u64,
                    "{} on stop did not finish in time; undelivered usage stays in the outbox",
                    self.what
                );
                false
            }
        };
        if !more && self.delivered > 0 {
            tracing::info!(
                delivered = self.delivered,
                "{}: delivered the outbox before stopping",
                self.what
            );
        }
        more
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing() {
        type R = Result<usize, std::io::Error>;
        let err = || R::Err(std::io::Error::other("down"));
        let mut p = Pacer::new(Duration::from_secs(1), 500);
        assert_eq!(p.after("t", R::Ok(500)), Duration::ZERO);
        assert_eq!(p.after("t", R::Ok(3)), Duration::from_secs(1));
        let waits: Vec<u64> = (0..7).map(|_| p.after("t", err()).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(p.after("t", R::Ok(0)), Duration::from_secs(1));
        assert_eq!(p.after("t", err()), Duration::from_secs(1));
    }
}
