//! Soma's usage ledger on PostgreSQL: its schema (sqlx migrations) and every query against it,
//! shared by the sidecar (which delivers records and reads live Budget definitions), the
//! operator (which keeps those definitions, reads spend for Budget status and seals the
//! chain) and the `soma` CLI (reports, `audit verify`). No kube, no HTTP.
//!
//! ```text
//!  sidecar outbox ─deliver─► usage_records ─┬─► usage_minute, budget_spend_minute (rollups)
//!                                           └─► holder chains (seq, prev_hash, hash)
//!  operator ─► soma_budgets (live definitions, NOTIFY soma_live) ─► sidecars (LISTEN)
//!           ─► soma_agent_live (each Agent's brown-out, NOTIFY soma_live) ─► its sidecars
//!           ─► spend per Budget window ─► Budget status, metrics
//!           ─► ledger_seals (signed) ◄── soma audit verify
//!  soma dr drill ─► snapshot, manifest, the restore reconciled with the NATS stream (drill)
//! ```
#![forbid(unsafe_code)]

pub mod audit;
pub mod deliver;
pub mod drill;
pub mod live;
pub mod record;
pub mod spend;

pub use record::UsageRecord;

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

/// The ledger's migrations, embedded at build time. Every writer runs them before its first
/// statement; they are idempotent and serialised by sqlx's advisory lock.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A pool created without connecting: the sidecar and the operator start and serve while the
/// database is down, and each statement waits at most `acquire` for a connection.
pub fn pool(url: &str, max_connections: u32, acquire: Duration) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire)
        .connect_lazy(url)
}

/// Unix milliseconds as an RFC 3339 text PostgreSQL casts to `timestamptz`.
pub fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .to_string()
}
