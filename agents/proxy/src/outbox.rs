//! The durable local outbox: a journal the request path appends to (`crate::journal`: one
//! `write(2)` per record on the request's own task) folded into one SQLite file in WAL mode.
//!
//! Every metered request is recorded before it leaves for the provider (*open*, with its
//! worst-case reservation), and settled with the provider's usage before the client's response
//! completes. A sidecar killed in between leaves an open row; the next start settles it at its
//! worst case, flagged `estimated` with outcome `interrupted`, so a crash can over-count one
//! request's unknown remainder but never lose it. The rows are also the embedded budget
//! authority's memory: at start-up the spend inside each Budget's window is replayed from them.
//!
//! A journal record and a committed SQLite transaction (WAL, `synchronous = NORMAL`) both
//! survive the process being killed (`kill -9`); a power loss may lose the last of either.
//! Every read of the outbox folds the journal first, so nothing appended is ever missed.
//!
//! ```text
//!   begin ──► journal ──► provider ──► settle ──► journal ──► response completes
//!                └──────── fold (background, and before every read) ──► usage_outbox
//!        └── crash ──► next start: fold, then recover_interrupted() settles at worst case
//! ```

use rusqlite::ToSql;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};

use jiff::Timestamp;
use soma_ledger::UsageRecord;

use crate::journal::{Begin, Entry, Folder, Journal, JournalError, Settle};
use soma_metering::{Amount, Usage};
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage_outbox (
    id TEXT PRIMARY KEY,                 -- idempotency key (UUIDv7), carried to the ledger
    namespace TEXT NOT NULL,
    agent TEXT NOT NULL,
    budgets TEXT NOT NULL,               -- the Budget chain charged, comma-separated
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'settled')),
    started_at_ms INTEGER NOT NULL,
    finished_at_ms INTEGER,
    prompt_estimate INTEGER NOT NULL,
    max_output_tokens INTEGER NOT NULL,
    reserved_tokens INTEGER NOT NULL,
    reserved_micros INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    cached_input_tokens INTEGER NOT NULL DEFAULT 0,
    cache_write_input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    cost_micros INTEGER NOT NULL DEFAULT 0,
    estimated INTEGER NOT NULL DEFAULT 0,
    outcome TEXT,
    http_status INTEGER,
    delivered_at_ms INTEGER,             -- set once the row is in the PostgreSQL ledger
    published_at_ms INTEGER,             -- set once JetStream acknowledged the event
    chain_seq INTEGER,                   -- its place in this outbox's audit chain, once linked
    prev_hash TEXT,
    hash TEXT,
    cache_write_1h_input_tokens INTEGER NOT NULL DEFAULT 0,
    web_search_requests INTEGER NOT NULL DEFAULT 0,
    web_fetch_requests INTEGER NOT NULL DEFAULT 0,
    unmetered TEXT NOT NULL DEFAULT ''   -- usage fields seen and not metered, comma-separated
);
CREATE INDEX IF NOT EXISTS ix_outbox_started ON usage_outbox (started_at_ms);
CREATE TABLE IF NOT EXISTS outbox_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS ix_outbox_open ON usage_outbox (state) WHERE state = 'open';
CREATE INDEX IF NOT EXISTS ix_outbox_unchained ON usage_outbox (finished_at_ms)
    WHERE state = 'settled' AND chain_seq IS NULL;
-- A row waits for a sink only once it is chained (delivery reads rows in chain order), so a
-- settled row folded from the journal enters one of these three partial indexes, not three.
DROP INDEX IF EXISTS ix_outbox_undelivered;
DROP INDEX IF EXISTS ix_outbox_unpublished;
CREATE INDEX IF NOT EXISTS ix_outbox_chained_undelivered ON usage_outbox (chain_seq)
    WHERE state = 'settled' AND chain_seq IS NOT NULL AND delivered_at_ms IS NULL;
CREATE INDEX IF NOT EXISTS ix_outbox_chained_unpublished ON usage_outbox (chain_seq)
    WHERE state = 'settled' AND chain_seq IS NOT NULL AND published_at_ms IS NULL;
";

/// The journal's directory beside the outbox file (`outbox.db` → `outbox.journal/`).
pub fn journal_dir(outbox: &Path) -> PathBuf {
    let mut name = outbox
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".journal");
    outbox.with_file_name(name)
}

/// Columns added after the first release, for outbox files an older sidecar created (a
/// container restarted onto a newer image keeps its emptyDir).
const ADDED_COLUMNS: &[(&str, &str)] = &[
    ("chain_seq", "INTEGER"),
    ("prev_hash", "TEXT"),
    ("hash", "TEXT"),
    ("cache_write_1h_input_tokens", "INTEGER NOT NULL DEFAULT 0"),
    ("web_search_requests", "INTEGER NOT NULL DEFAULT 0"),
    ("web_fetch_requests", "INTEGER NOT NULL DEFAULT 0"),
    ("unmetered", "TEXT NOT NULL DEFAULT ''"),
];

/// A request about to leave for the provider.
#[derive(Clone, Debug)]
pub struct OpenRecord {
    /// Idempotency key.
    pub id: String,
    /// Agent namespace.
    pub namespace: String,
    /// Agent name.
    pub agent: String,
    /// Budget chain, comma-separated (empty without a Budget).
    pub budgets: String,
    /// Endpoint label.
    pub endpoint: &'static str,
    /// Model sent upstream.
    pub model: String,
    /// When the reservation was taken.
    pub started_at: Timestamp,
    /// Pre-call prompt estimate.
    pub prompt_estimate: u64,
    /// Output tokens assumed for the worst case.
    pub max_output_tokens: u64,
    /// The worst case reserved.
    pub reserved: Amount,
}

/// How a request ended.
#[derive(Clone, Debug)]
pub struct Settlement {
    /// Tokens and server-tool uses.
    pub usage: Usage,
    /// Usage fields the provider sent and the sidecar did not meter, comma-separated.
    pub unmetered: String,
    /// Cost in micros.
    pub cost_micros: u64,
    /// Whether `usage` is the sidecar's estimate rather than the provider's numbers.
    pub estimated: bool,
    /// `ok`, `client_disconnected`, `upstream_cut`, `upstream_timeout`, `upstream_error`, ...
    pub outcome: &'static str,
    /// Status the client saw (0 when the stream was cut).
    pub http_status: u16,
}

/// Spend replayed into the budget authority at start-up.
#[derive(Clone, Debug)]
pub struct PastSpend {
    /// Budget chain.
    pub budgets: String,
    /// When the request started.
    pub at: Timestamp,
    /// What it counted.
    pub amount: Amount,
}

/// Where settled rows are delivered; each has its own mark in the outbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sink {
    /// The PostgreSQL ledger.
    Ledger,
    /// NATS JetStream.
    Events,
}

impl Sink {
    fn column(self) -> &'static str {
        match self {
            Sink::Ledger => "delivered_at_ms",
            Sink::Events => "published_at_ms",
        }
    }
}

/// Which sinks are configured: a row is deleted by [`Outbox::prune`] only once every
/// configured sink has it, and never when none is (the outbox is then the only record).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sinks {
    /// `databaseUrl` is set.
    pub ledger: bool,
    /// `natsUrl` is set.
    pub events: bool,
}

/// Totals over settled rows (tests, reports).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Settled rows.
    pub rows: u64,
    /// Open rows.
    pub open: u64,
    /// Input + output tokens.
    pub tokens: u64,
    /// Cost.
    pub micros: u64,
}

/// What waits in the outbox for one sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backlog {
    /// Settled records not yet delivered.
    pub records: u64,
    /// When the oldest of them finished.
    pub oldest_finished_at: Option<Timestamp>,
}

/// The outbox: the journal the request path appends to, the SQLite connection the journal is
/// folded into, and a sqlx pool for start-up, delivery and reads.
#[derive(Clone, Debug)]
pub struct Outbox {
    pool: SqlitePool,
    journal: Arc<Journal>,
    fold: Arc<Mutex<(rusqlite::Connection, Folder)>>,
}

/// Why a request-path write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The journal could not be appended to.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// Why folding the journal into SQLite failed.
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    /// Reading the journal failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// SQLite refused the batch.
    #[error("folding the journal into the outbox failed")]
    Sqlite(#[source] rusqlite::Error),
}

impl From<FoldError> for sqlx::Error {
    fn from(e: FoldError) -> sqlx::Error {
        sqlx::Error::Protocol(e.to_string())
    }
}

const BEGIN_SQL: &str =
    "INSERT OR IGNORE INTO usage_outbox (id, namespace, agent, budgets, endpoint, model,
        state, started_at_ms, prompt_estimate, max_output_tokens, reserved_tokens, reserved_micros)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'open', ?7, ?8, ?9, ?10, ?11)";

const SETTLE_SQL: &str = "UPDATE usage_outbox SET state = 'settled', finished_at_ms = ?2,
        input_tokens = ?3, cached_input_tokens = ?4, cache_write_input_tokens = ?5,
        output_tokens = ?6, reasoning_tokens = ?7, cost_micros = ?8, estimated = ?9,
        outcome = ?10, http_status = ?11, cache_write_1h_input_tokens = ?12,
        web_search_requests = ?13, web_fetch_requests = ?14, unmetered = ?15
     WHERE id = ?1 AND state = 'open'";

/// The columns of a row inserted settled: a begin's, then its settle's without the id.
const SETTLED_COLUMNS: &str = "id, namespace, agent, budgets, endpoint, model,
        state, started_at_ms, prompt_estimate, max_output_tokens, reserved_tokens, reserved_micros,
        finished_at_ms, input_tokens, cached_input_tokens, cache_write_input_tokens,
        output_tokens, reasoning_tokens, cost_micros, estimated, outcome, http_status,
        cache_write_1h_input_tokens, web_search_requests, web_fetch_requests, unmetered";

/// Parameters per settled row.
const SETTLED_PARAMS: usize = 25;

/// Settled rows inserted by one statement: the per-statement work (cursors on the table and
/// its indexes opened and closed, the statement reset) is shared by this many rows.
const SETTLED_CHUNK: usize = 16;

/// `INSERT OR IGNORE` of `rows` settled rows, parameters numbered row after row.
fn insert_settled_sql(rows: usize) -> String {
    let tuples: Vec<String> = (0..rows)
        .map(|r| {
            let p: Vec<String> = (1..=SETTLED_PARAMS)
                .map(|k| format!("?{}", r * SETTLED_PARAMS + k))
                .collect();
            format!("({}, 'settled', {})", p[..6].join(", "), p[6..].join(", "))
        })
        .collect();
    format!(
        "INSERT OR IGNORE INTO usage_outbox ({SETTLED_COLUMNS}) VALUES {}",
        tuples.join(", ")
    )
}

/// Writes a batch of journal records. A begin whose settle is in the same batch (the common
/// case) becomes one settled row, inserted [`SETTLED_CHUNK`] rows per statement; a settle whose
/// begin was folded earlier updates the open row. Replaying records already folded changes
/// nothing: a begin already there is kept, and a settle only changes an open row.
fn apply(tx: &rusqlite::Transaction<'_>, entries: &[Entry<'_>]) -> Result<(), rusqlite::Error> {
    static CHUNK_SQL: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| insert_settled_sql(SETTLED_CHUNK));
    // The settles not paired with a begin of this batch are what is left in the map.
    let mut settles: HashMap<&str, &Settle<'_>, BuildHasherDefault<IdHasher>> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Settle(s) => Some((s.id, s)),
            Entry::Begin(_) => None,
        })
        .collect();
    let mut settled = Vec::new();
    for entry in entries {
        let Entry::Begin(begin) = entry else {
            continue;
        };
        match settles.remove(begin.id) {
            Some(settle) => settled.push((BeginColumns::of(begin), SettleColumns::of(settle))),
            None => {
                let b = BeginColumns::of(begin);
                tx.prepare_cached(BEGIN_SQL)?
                    .execute(b.params().as_slice())?;
            }
        }
    }
    // A settle applies to a row that is there already and still open: the settled insert of
    // a replay ignored it (its begin was folded before), or its begin was in an earlier batch.
    let settle = |s: &SettleColumns<'_>| -> Result<usize, rusqlite::Error> {
        tx.prepare_cached(SETTLE_SQL)?
            .execute(s.params().as_slice())
    };
    let mut chunks = settled.chunks_exact(SETTLED_CHUNK);
    if chunks.len() > 0 {
        let mut many = tx.prepare_cached(&CHUNK_SQL)?;
        for chunk in &mut chunks {
            if insert_settled(&mut many, chunk)? != chunk.len() {
                for (_, s) in chunk {
                    settle(s)?;
                }
            }
        }
    }
    let mut one = tx.prepare_cached(BEGIN_SETTLED_SQL)?;
    for row in chunks.remainder() {
        if insert_settled(&mut one, std::slice::from_ref(row))? != 1 {
            settle(&row.1)?;
        }
    }
    for s in settles.values() {
        settle(&SettleColumns::of(s))?;
    }
    Ok(())
}

/// Binds `rows` settled rows' parameters in place, row after row, and runs the insert:
/// no vector of parameters is built per statement. Returns the rows inserted.
fn insert_settled(
    stmt: &mut rusqlite::CachedStatement<'_>,
    rows: &[(BeginColumns<'_>, SettleColumns<'_>)],
) -> Result<usize, rusqlite::Error> {
    let mut at = 1;
    for (b, s) in rows {
        // A settled row: the begin's columns, then the settle's without its id.
        for p in b.params().into_iter().chain(s.params().into_iter().skip(1)) {
            stmt.raw_bind_parameter(at, p)?;
            at += 1;
        }
    }
    stmt.raw_execute()
}

/// Hashes the fold's idempotency keys (the sidecar's own UUIDs, not input an attacker picks):
/// a multiply-rotate per 8 bytes instead of SipHash.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

const BEGIN_SETTLED_SQL: &str =
    "INSERT OR IGNORE INTO usage_outbox (id, namespace, agent, budgets, endpoint, model,
        state, started_at_ms, prompt_estimate, max_output_tokens, reserved_tokens, reserved_micros,
        finished_at_ms, input_tokens, cached_input_tokens, cache_write_input_tokens,
        output_tokens, reasoning_tokens, cost_micros, estimated, outcome, http_status,
        cache_write_1h_input_tokens, web_search_requests, web_fetch_requests, unmetered)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'settled', ?7, ?8, ?9, ?10, ?11,
        ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25)";

/// A begin record's columns, in `BEGIN_SQL`'s order.
struct BeginColumns<'a> {
    b: &'a Begin<'a>,
    n: [i64; 4],
}

impl<'a> BeginColumns<'a> {
    fn of(b: &'a Begin<'a>) -> Self {
        BeginColumns {
            b,
            n: [
                i(b.prompt),
                i(b.max_out),
                i(b.reserved.tokens),
                i(b.reserved.micros),
            ],
        }
    }

    fn params(&self) -> [&dyn ToSql; 11] {
        let (b, n) = (self.b, &self.n);
        [
            &b.id,
            &b.ns,
            &b.agent,
            &b.budgets,
            &b.endpoint,
            &b.model,
            &b.at,
            &n[0],
            &n[1],
            &n[2],
            &n[3],
        ]
    }
}

/// A settle record's id and then what `SETTLE_SQL` sets, in its order. A settled row's
/// parameters are a begin's followed by its settle's without the id, so each column list is
/// written once.
struct SettleColumns<'a> {
    s: &'a Settle<'a>,
    n: [i64; 10],
}

impl<'a> SettleColumns<'a> {
    fn of(s: &'a Settle<'a>) -> Self {
        let usage = &s.usage;
        SettleColumns {
            s,
            n: [
                i(usage.input_tokens),
                i(usage.cached_input_tokens),
                i(usage.cache_write_input_tokens),
                i(usage.output_tokens),
                i(usage.reasoning_tokens),
                i(s.cost),
                i64::from(s.status),
                i(usage.cache_write_1h_input_tokens),
                i(usage.web_search_requests),
                i(usage.web_fetch_requests),
            ],
        }
    }

    fn params(&self) -> [&dyn ToSql; 15] {
        let (s, n) = (self.s, &self.n);
        [
            &s.id,
            &s.at,
            &n[0],
            &n[1],
            &n[2],
            &n[3],
            &n[4],
            &n[5],
            &s.est,
            &s.outcome,
            &n[6],
            &n[7],
            &n[8],
            &n[9],
            &s.unmetered,
        ]
    }
}

/// Folds what was appended since the last fold into SQLite, in one transaction, then deletes
/// the journal segments that are closed and fully committed. Returns how many records.
fn fold_now(
    journal: &Journal,
    fold: &Mutex<(rusqlite::Connection, Folder)>,
) -> Result<usize, FoldError> {
    let mut guard = fold.lock().unwrap_or_else(PoisonError::into_inner);
    let (conn, folder) = &mut *guard;
    let batch = folder.read(journal.dir(), journal.current())?;
    if !batch.is_empty() {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(FoldError::Sqlite)?;
        apply(&tx, &batch.entries()).map_err(FoldError::Sqlite)?;
        tx.commit().map_err(FoldError::Sqlite)?;
    }
    for path in &batch.done {
        // Committed above (or in an earlier fold): the segment is not needed any more. A
        // segment left behind by a failed delete is folded again, harmlessly, next start.
        let _ = std::fs::remove_file(path);
    }
    Ok(batch.len())
}

/// The columns a [`UsageRecord`] is read from.
const RECORD_COLUMNS: &str = "id, namespace, agent, budgets, endpoint, model, started_at_ms,
    finished_at_ms, input_tokens, cached_input_tokens, cache_write_input_tokens, output_tokens,
    reasoning_tokens, cost_micros, estimated, outcome, http_status, chain_seq, prev_hash, hash,
    cache_write_1h_input_tokens, web_search_requests, web_fetch_requests, unmetered";

fn record_of(r: &sqlx::sqlite::SqliteRow) -> UsageRecord {
    UsageRecord {
        id: r.get("id"),
        namespace: r.get("namespace"),
        agent: r.get("agent"),
        budgets: r.get("budgets"),
        endpoint: r.get("endpoint"),
        model: r.get("model"),
        started_at_ms: r.get("started_at_ms"),
        finished_at_ms: r.get("finished_at_ms"),
        input_tokens: r.get("input_tokens"),
        cached_input_tokens: r.get("cached_input_tokens"),
        cache_write_input_tokens: r.get("cache_write_input_tokens"),
        output_tokens: r.get("output_tokens"),
        reasoning_tokens: r.get("reasoning_tokens"),
        cost_micros: r.get("cost_micros"),
        estimated: r.get("estimated"),
        outcome: r.get("outcome"),
        http_status: r.get("http_status"),
        holder: String::new(),
        seq: r.get::<Option<i64>, _>("chain_seq").unwrap_or_default(),
        prev_hash: r.get::<Option<String>, _>("prev_hash").unwrap_or_default(),
        hash: r.get::<Option<String>, _>("hash").unwrap_or_default(),
        cache_write_1h_input_tokens: r.get("cache_write_1h_input_tokens"),
        web_search_requests: r.get("web_search_requests"),
        web_fetch_requests: r.get("web_fetch_requests"),
        unmetered: r.get("unmetered"),
    }
}

fn ms(t: Timestamp) -> i64 {
    t.as_millisecond()
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Outbox {
    /// Opens (creating) the file and its schema.
    pub async fn open(path: &Path) -> Result<Outbox, sqlx::Error> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(sqlx::Error::Io)?;
        }
        let opts = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(5));
        // One writer: SQLite serialises writes anyway, and one connection never sees BUSY.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await?;
        for (column, kind) in ADDED_COLUMNS {
            let have: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pragma_table_info('usage_outbox') WHERE name = ?1",
            )
            .bind(column)
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
            if have == 0 {
                // A fresh file has no table yet: the schema below creates the column.
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "ALTER TABLE usage_outbox ADD COLUMN {column} {kind}"
                )))
                .execute(&pool)
                .await;
            }
        }
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        let conn = rusqlite::Connection::open(path)
            .and_then(|c| {
                c.pragma_update(None, "journal_mode", "WAL")?;
                c.pragma_update(None, "synchronous", "NORMAL")?;
                c.busy_timeout(std::time::Duration::from_secs(5))?;
                Ok(c)
            })
            .map_err(|e| sqlx::Error::Configuration(Box::new(e)))?;
        let journal_dir = journal_dir(path);
        let outbox = Outbox {
            pool,
            journal: Arc::new(
                Journal::open(&journal_dir).map_err(|e| sqlx::Error::Configuration(Box::new(e)))?,
            ),
            fold: Arc::new(Mutex::new((conn, Folder::default()))),
        };
        // What a previous process appended and did not fold is folded before anything reads.
        outbox.fold().await?;
        Ok(outbox)
    }

    /// Folds the journal into SQLite now (off the async workers).
    pub async fn fold(&self) -> Result<usize, FoldError> {
        let (journal, fold) = (self.journal.clone(), self.fold.clone());
        tokio::task::spawn_blocking(move || fold_now(&journal, &fold))
            .await
            .unwrap_or_else(|e| {
                Err(FoldError::Journal(JournalError::Io {
                    path: PathBuf::new(),
                    source: std::io::Error::other(e.to_string()),
                }))
            })
    }

    /// Settles rows a previous process left open, at their worst case. Returns how many.
    pub async fn recover_interrupted(&self, now: Timestamp) -> Result<u64, sqlx::Error> {
        self.fold().await?;
        let r = sqlx::query(
            "UPDATE usage_outbox SET state = 'settled', finished_at_ms = ?1,
                input_tokens = prompt_estimate, output_tokens = max_output_tokens,
                cost_micros = reserved_micros, estimated = 1, outcome = 'interrupted',
                http_status = 0
             WHERE state = 'open'",
        )
        .bind(ms(now))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// Records a request before it leaves: one journal append on the caller's thread.
    pub fn begin(&self, r: &OpenRecord) -> Result<(), WriteError> {
        Ok(self.journal.append(&Entry::begin(r))?)
    }

    /// Settles a request: one journal append on the caller's thread. Idempotent: a row already
    /// settled is left as it is.
    pub fn settle(
        &self,
        id: &str,
        s: &Settlement,
        finished_at: Timestamp,
    ) -> Result<(), WriteError> {
        Ok(self.journal.append(&Entry::settle(id, s, finished_at))?)
    }

    /// Settled spend of requests started at or after `since`.
    pub async fn spend_since(&self, since: Timestamp) -> Result<Vec<PastSpend>, sqlx::Error> {
        self.fold().await?;
        let rows = sqlx::query(
            "SELECT budgets, started_at_ms, input_tokens + output_tokens AS tokens, cost_micros
             FROM usage_outbox WHERE state = 'settled' AND budgets != '' AND started_at_ms >= ?1",
        )
        .bind(ms(since))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| PastSpend {
                budgets: r.get("budgets"),
                at: Timestamp::from_millisecond(r.get("started_at_ms"))
                    .unwrap_or(Timestamp::UNIX_EPOCH),
                amount: Amount {
                    tokens: u(r.get("tokens")),
                    micros: u(r.get("cost_micros")),
                },
            })
            .collect())
    }

    /// Row counts and sums.
    pub async fn totals(&self) -> Result<Totals, sqlx::Error> {
        self.fold().await?;
        let r = sqlx::query(
            "SELECT
                COALESCE(SUM(state = 'settled'), 0) AS settled,
                COALESCE(SUM(state = 'open'), 0) AS open,
                COALESCE(SUM(CASE WHEN state = 'settled' THEN input_tokens + output_tokens END), 0) AS tokens,
                COALESCE(SUM(CASE WHEN state = 'settled' THEN cost_micros END), 0) AS micros
             FROM usage_outbox",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Totals {
            rows: u(r.get("settled")),
            open: u(r.get("open")),
            tokens: u(r.get("tokens")),
            micros: u(r.get("micros")),
        })
    }

    /// Every row as JSON (tests and debugging).
    pub async fn rows(&self) -> Result<Vec<serde_json::Value>, sqlx::Error> {
        self.fold().await?;
        let rows = sqlx::query(
            "SELECT id, endpoint, model, state, input_tokens, cached_input_tokens,
                cache_write_input_tokens, cache_write_1h_input_tokens, output_tokens,
                reasoning_tokens, web_search_requests, web_fetch_requests, cost_micros,
                estimated, outcome, http_status, prompt_estimate, reserved_micros, unmetered
             FROM usage_outbox ORDER BY started_at_ms, id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.get::<String, _>("id"),
                    "endpoint": r.get::<String, _>("endpoint"),
                    "model": r.get::<String, _>("model"),
                    "state": r.get::<String, _>("state"),
                    "prompt_estimate": r.get::<i64, _>("prompt_estimate"),
                    "input_tokens": r.get::<i64, _>("input_tokens"),
                    "cached_input_tokens": r.get::<i64, _>("cached_input_tokens"),
                    "cache_write_input_tokens": r.get::<i64, _>("cache_write_input_tokens"),
                    "cache_write_1h_input_tokens": r.get::<i64, _>("cache_write_1h_input_tokens"),
                    "output_tokens": r.get::<i64, _>("output_tokens"),
                    "reasoning_tokens": r.get::<i64, _>("reasoning_tokens"),
                    "web_search_requests": r.get::<i64, _>("web_search_requests"),
                    "web_fetch_requests": r.get::<i64, _>("web_fetch_requests"),
                    "unmetered": r.get::<String, _>("unmetered"),
                    "cost_micros": r.get::<i64, _>("cost_micros"),
                    "estimated": r.get::<bool, _>("estimated"),
                    "outcome": r.get::<Option<String>, _>("outcome"),
                    "http_status": r.get::<Option<i64>, _>("http_status"),
                    "reserved_micros": r.get::<i64, _>("reserved_micros"),
                })
            })
            .collect())
    }

    /// Links settled rows that are not yet in this outbox's audit chain, in the order they
    /// were settled, to the chain of `holder` (see `soma_ledger::record`). Runs off the
    /// request path, before delivery; a row keeps its link for every redelivery. Returns how
    /// many were linked.
    pub async fn chain_pending(&self, holder: &str, limit: u32) -> Result<u64, sqlx::Error> {
        self.fold().await?;
        let mut tx = self.pool.begin().await?;
        let head: Option<String> =
            sqlx::query_scalar("SELECT value FROM outbox_meta WHERE key = 'chain_head'")
                .fetch_optional(&mut *tx)
                .await?;
        let (mut seq, mut prev) = head
            .and_then(|h| {
                let (s, hash) = h.split_once(' ')?;
                Some((s.parse::<i64>().ok()?, hash.to_owned()))
            })
            .unwrap_or_else(|| (0, soma_ledger::record::genesis(holder)));
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM usage_outbox WHERE state = 'settled' AND chain_seq IS NULL
             ORDER BY finished_at_ms, id LIMIT ?1"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
        let n = rows.len() as u64;
        for row in rows {
            let mut r = record_of(&row);
            seq += 1;
            r.chain(holder, seq, &prev);
            sqlx::query(
                "UPDATE usage_outbox SET chain_seq = ?2, prev_hash = ?3, hash = ?4 WHERE id = ?1",
            )
            .bind(&r.id)
            .bind(seq)
            .bind(&r.prev_hash)
            .bind(&r.hash)
            .execute(&mut *tx)
            .await?;
            prev = r.hash;
        }
        if n > 0 {
            sqlx::query(
                "INSERT OR REPLACE INTO outbox_meta (key, value) VALUES ('chain_head', ?1)",
            )
            .bind(format!("{seq} {prev}"))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(n)
    }

    /// Settled, chained rows not yet delivered to `sink`, in chain order.
    pub async fn undelivered(
        &self,
        sink: Sink,
        limit: u32,
    ) -> Result<Vec<UsageRecord>, sqlx::Error> {
        let holder = self.holder_id().await?;
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM usage_outbox
             WHERE state = 'settled' AND chain_seq IS NOT NULL AND {} IS NULL
             ORDER BY chain_seq LIMIT ?1",
            sink.column()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                let mut r = record_of(row);
                r.holder.clone_from(&holder);
                r
            })
            .collect())
    }

    /// Marks rows as delivered to `sink`.
    pub async fn mark_delivered(
        &self,
        sink: Sink,
        ids: &[String],
        at: Timestamp,
    ) -> Result<(), sqlx::Error> {
        if ids.is_empty() {
            return Ok(());
        }
        // The column comes from a closed enum, never from input.
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(format!(
            "UPDATE usage_outbox SET {} = ",
            sink.column()
        ));
        q.push_bind(ms(at)).push(" WHERE id IN (");
        let mut sep = q.separated(", ");
        for id in ids {
            sep.push_bind(id);
        }
        q.push(")");
        q.build().execute(&self.pool).await?;
        Ok(())
    }

    /// Settled rows not yet delivered to `sink`.
    pub async fn pending_delivery(&self, sink: Sink) -> Result<u64, sqlx::Error> {
        Ok(self.backlog(sink).await?.records)
    }

    /// Settled rows not yet delivered to `sink`, and when the oldest of them finished.
    pub async fn backlog(&self, sink: Sink) -> Result<Backlog, sqlx::Error> {
        self.fold().await?;
        // Rows not chained yet, and chained rows the sink does not have: each part read
        // through its partial index.
        let sql = format!(
            "SELECT COUNT(*), MIN(finished_at_ms) FROM (
                SELECT finished_at_ms FROM usage_outbox
                WHERE state = 'settled' AND chain_seq IS NULL AND {col} IS NULL
                UNION ALL
                SELECT finished_at_ms FROM usage_outbox
                WHERE state = 'settled' AND chain_seq IS NOT NULL AND {col} IS NULL)",
            col = sink.column()
        );
        let (n, oldest): (i64, Option<i64>) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await?;
        Ok(Backlog {
            records: u(n),
            oldest_finished_at: oldest.and_then(|ms| Timestamp::from_millisecond(ms).ok()),
        })
    }

    /// Forgets deliveries to `sink` (tests: a sidecar that crashed after delivering).
    pub async fn forget_deliveries(&self, sink: Sink) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE usage_outbox SET {} = NULL",
            sink.column()
        )))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// This outbox's stable name (a UUID made on first use and kept in the file): the cluster
    /// budget authority's lease holder, the same after a restart on the same file.
    pub async fn holder_id(&self) -> Result<String, sqlx::Error> {
        sqlx::query("INSERT OR IGNORE INTO outbox_meta (key, value) VALUES ('holder', ?1)")
            .bind(uuid::Uuid::now_v7().to_string())
            .execute(&self.pool)
            .await?;
        sqlx::query_scalar("SELECT value FROM outbox_meta WHERE key = 'holder'")
            .fetch_one(&self.pool)
            .await
    }

    /// Deletes settled rows that started before `before` and that every configured sink has
    /// (delivered to the ledger, published to JetStream). Returns how many. `before` is the
    /// start of the longest budget window (minus a minute): younger rows are still replayed
    /// into the authority at start-up.
    pub async fn prune(&self, before: Timestamp, sinks: Sinks) -> Result<u64, sqlx::Error> {
        self.fold().await?;
        if !sinks.ledger && !sinks.events {
            return Ok(0);
        }
        let r = sqlx::query(
            "DELETE FROM usage_outbox WHERE state = 'settled' AND started_at_ms < ?1
                AND (?2 = 0 OR delivered_at_ms IS NOT NULL)
                AND (?3 = 0 OR published_at_ms IS NOT NULL)",
        )
        .bind(ms(before))
        .bind(sinks.ledger)
        .bind(sinks.events)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// Closes the sqlx pool (tests that reopen the file). The writer thread ends when the last
    /// clone of this outbox is dropped.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A version-1 line, as the sidecar before the binary journal wrote it.
    fn v1_line(json: &str) -> String {
        format!("{json} {:08x}\n", crc32fast::hash(json.as_bytes()))
    }

    #[tokio::test]
    async fn a_journal_left_by_the_previous_version_is_folded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let journal = journal_dir(&path);
        std::fs::create_dir_all(&journal).unwrap();
        // A settled request, and one the old sidecar was killed during.
        let begin = |id: &str| {
            format!(
                r#"{{"b":{{"id":"{id}","ns":"a","agent":"bot","budgets":"a/team","endpoint":"chat_completions","model":"gpt-4o","at":1000,"prompt":10,"max_out":20,"reserved":{{"tokens":30,"micros":40}}}}}}"#
            )
        };
        let settle = r#"{"s":{"id":"done","at":2000,"usage":{"inputTokens":12,"cachedInputTokens":0,"cacheWriteInputTokens":0,"outputTokens":7,"reasoningTokens":0},"cost":25,"est":false,"outcome":"ok","status":200}}"#;
        let old = [begin("done"), settle.to_owned(), begin("cut")]
            .map(|j| v1_line(&j))
            .concat();
        let segment = journal.join("journal.0000000003");
        std::fs::write(&segment, old).unwrap();

        let outbox = Outbox::open(&path).await.unwrap();
        assert!(!segment.exists(), "a folded segment is deleted");
        assert_eq!(
            outbox
                .recover_interrupted(Timestamp::from_millisecond(3000).unwrap())
                .await
                .unwrap(),
            1
        );
        let rows = outbox.rows().await.unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        let done = rows.iter().find(|r| r["id"] == "done").unwrap();
        assert_eq!(
            (
                &done["state"],
                &done["input_tokens"],
                &done["output_tokens"],
                &done["cost_micros"],
                &done["outcome"]
            ),
            (
                &serde_json::json!("settled"),
                &serde_json::json!(12),
                &serde_json::json!(7),
                &serde_json::json!(25),
                &serde_json::json!("ok")
            )
        );
        let cut = rows.iter().find(|r| r["id"] == "cut").unwrap();
        assert_eq!(cut["outcome"], "interrupted");
        assert_eq!(cut["output_tokens"], 20);
        // The new version appends version-2 records after the old segment, and they fold too.
        let r = OpenRecord {
            id: "new".into(),
            namespace: "a".into(),
            agent: "bot".into(),
            budgets: "a/team".into(),
            endpoint: "chat_completions",
            model: "gpt-4o".into(),
            started_at: Timestamp::from_millisecond(4000).unwrap(),
            prompt_estimate: 1,
            max_output_tokens: 2,
            reserved: Amount {
                tokens: 3,
                micros: 4,
            },
        };
        outbox.begin(&r).unwrap();
        let totals = outbox.totals().await.unwrap();
        assert_eq!((totals.rows, totals.open), (2, 1));
        outbox.close().await;
    }

    fn open_record(id: String) -> OpenRecord {
        OpenRecord {
            id,
            namespace: "a".into(),
            agent: "bot".into(),
            budgets: "a/team".into(),
            endpoint: "chat_completions",
            model: "gpt-4o".into(),
            started_at: Timestamp::from_millisecond(1000).unwrap(),
            prompt_estimate: 10,
            max_output_tokens: 20,
            reserved: Amount {
                tokens: 30,
                micros: 40,
            },
        }
    }

    #[tokio::test]
    async fn chunked_inserts_fold_replays_once() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("outbox.db")).await.unwrap();
        let settlement = |n: u64| Settlement {
            usage: Usage {
                input_tokens: n,
                output_tokens: 1,
                ..Usage::default()
            },
            unmetered: String::new(),
            cost_micros: n,
            estimated: false,
            outcome: "ok",
            http_status: 200,
        };
        let at = Timestamp::from_millisecond(2000).unwrap();
        // 20 requests folded open (their begins only).
        let ids: Vec<String> = (0..50).map(|n| format!("id-{n:03}")).collect();
        for id in &ids[..20] {
            outbox.begin(&open_record(id.clone())).unwrap();
        }
        assert_eq!(outbox.fold().await.unwrap(), 20);
        // Then a batch with begins and settles of all 50, as a replay after a crash has it:
        // in chunks of 16, some rows inserted settled and some already there, open.
        let settle_all = || {
            for (n, id) in ids.iter().enumerate() {
                outbox.begin(&open_record(id.clone())).unwrap();
                outbox.settle(id, &settlement(n as u64), at).unwrap();
            }
        };
        settle_all();
        assert_eq!(outbox.fold().await.unwrap(), 100);
        let want = Totals {
            rows: 50,
            open: 0,
            tokens: (0..50).map(|n| n + 1).sum(),
            micros: (0..50).sum(),
        };
        assert_eq!(outbox.totals().await.unwrap(), want);
        // Replayed once more: nothing changes.
        settle_all();
        outbox.fold().await.unwrap();
        assert_eq!(outbox.totals().await.unwrap(), want);
        outbox.close().await;
    }
}
