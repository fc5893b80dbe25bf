//! What a DR drill checks about a restored ledger: the queries it needs (a snapshot the backup
//! is taken from and the manifest of what that snapshot holds, the records of a ledger, the
//! live ledger's records committed since the snapshot) and the pure reconciliation of the
//! restore against the NATS JetStream copy of every record and against the live ledger, which
//! also measures the recovery point.
//!
//! ```text
//!  live ledger ──snapshot (REPEATABLE READ, exported)──▶ pg_dump ──▶ backup + manifest
//!       │                                                              │ restore (psql)
//!       │ records committed since the snapshot                         ▼
//!       └───────────────────────────────┐                    scratch database (the restore)
//!  NATS stream (every record, by id) ───┼──▶ reconcile ◀──────────────┘
//!                                       └──▶ discrepancies, notes, RPO (what the backup missed)
//! ```
//!
//! | found | means |
//! | --- | --- |
//! | in the restore and the stream, different | a record was changed (in the ledger before the backup, or in the backup) |
//! | in the restore, not in the stream (older than the grace) | the stream lost it, or it was written into the ledger by something other than a sidecar |
//! | in the stream, not in the restore, committed to the live ledger before the snapshot | the backup is incomplete |
//! | in the stream, not in the restore, committed during the backup | what a restore from this backup loses: the RPO |
//! | in the stream, in neither ledger (older than the grace) | it was deleted from the ledger |

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::record::UsageRecord;

/// What the backup's snapshot holds, recorded with the backup so a restore can be checked
/// against it, and the backup file's digest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// When the snapshot was taken (Unix ms).
    pub snapshot_at_ms: i64,
    /// When the backup file was complete (Unix ms).
    pub backup_done_at_ms: i64,
    /// Usage records in the snapshot.
    pub records: i64,
    /// Their tokens (input plus output).
    pub tokens: i64,
    /// Their cost in micros.
    pub cost_micros: i64,
    /// Seals in the snapshot.
    pub seals: i64,
    /// SHA-256 of the backup file (hex).
    pub sha256: String,
    /// Its size in bytes.
    pub bytes: u64,
}

/// Totals of a ledger's usage records and seals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Usage records.
    pub records: i64,
    /// Their tokens.
    pub tokens: i64,
    /// Their cost in micros.
    pub cost_micros: i64,
    /// Seals.
    pub seals: i64,
}

const TOTALS: &str = "SELECT (SELECT COUNT(*) FROM usage_records)::BIGINT,
    (SELECT COALESCE(SUM(input_tokens + output_tokens), 0) FROM usage_records)::BIGINT,
    (SELECT COALESCE(SUM(cost_micros), 0) FROM usage_records)::BIGINT,
    (SELECT COUNT(*) FROM ledger_seals)::BIGINT";

fn totals_of(row: &sqlx::postgres::PgRow) -> Totals {
    Totals {
        records: row.get(0),
        tokens: row.get(1),
        cost_micros: row.get(2),
        seals: row.get(3),
    }
}

/// The totals of the ledger at `pool`.
pub async fn totals(pool: &PgPool) -> Result<Totals, sqlx::Error> {
    Ok(totals_of(&sqlx::query(TOTALS).fetch_one(pool).await?))
}

/// A snapshot of the live ledger held open for `pg_dump --snapshot`: what it sees is exactly
/// what the backup holds.
pub struct Snapshot {
    tx: Transaction<'static, Postgres>,
    /// The id `pg_dump --snapshot` takes.
    pub id: String,
    /// When it was taken (Unix ms, the server's clock).
    pub at_ms: i64,
    /// What it holds.
    pub totals: Totals,
}

impl Snapshot {
    /// Opens a REPEATABLE READ transaction, exports its snapshot and counts what it holds.
    pub async fn take(pool: &PgPool) -> Result<Snapshot, sqlx::Error> {
        let mut tx = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query(
            "SELECT pg_export_snapshot(), (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
        )
        .fetch_one(&mut *tx)
        .await?;
        let (id, at_ms): (String, i64) = (row.get(0), row.get(1));
        let totals = totals_of(&sqlx::query(TOTALS).fetch_one(&mut *tx).await?);
        Ok(Snapshot {
            tx,
            id,
            at_ms,
            totals,
        })
    }

    /// Ends the transaction (once the backup has been taken from it).
    pub async fn release(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

/// Every usage record of the ledger at `pool`, with when it was delivered (Unix ms).
pub async fn records(pool: &PgPool) -> Result<Vec<(UsageRecord, i64)>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {} FROM usage_records",
        crate::audit::RECORD_COLUMNS
    )))
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(crate::audit::record_from_row).collect())
}

/// When each record of the live ledger delivered at or after `since_ms`, or named in `ids`,
/// was delivered (Unix ms).
pub async fn delivered(
    pool: &PgPool,
    since_ms: i64,
    ids: &[String],
) -> Result<HashMap<String, i64>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, (EXTRACT(EPOCH FROM delivered_at) * 1000)::BIGINT FROM usage_records
          WHERE delivered_at >= to_timestamp($1 / 1000.0) OR id = ANY ($2)",
    )
    .bind(since_ms)
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// What the reconciliation is given.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// The restore's records with when they were delivered.
    pub restored: &'a [(UsageRecord, i64)],
    /// The stream's records with when they were published (`None`: no stream was read).
    pub stream: Option<&'a HashMap<String, (UsageRecord, i64)>>,
    /// The live ledger's records delivered since shortly before the snapshot, and those the
    /// stream holds and the restore lacks: id → delivered (Unix ms).
    pub live: &'a HashMap<String, i64>,
    /// The snapshot.
    pub snapshot_ms: i64,
    /// When the backup was complete.
    pub backup_done_ms: i64,
    /// Now.
    pub now_ms: i64,
    /// How long a record may take to reach the one of ledger and stream it is not in yet.
    pub grace_ms: i64,
    /// When the stream's oldest message was published (older records may have aged out of it).
    pub stream_first_ms: Option<i64>,
    /// The stream's name, for messages.
    pub stream_name: &'a str,
}

/// A delivery's `delivered_at` is when its transaction began, not when it committed: records
/// delivered this shortly before the snapshot may commit after it, and are not required in it.
pub const COMMIT_MARGIN_MS: i64 = 5_000;

/// What the reconciliation found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reconciled {
    /// What is wrong, exactly.
    pub discrepancies: Vec<String>,
    /// What is worth knowing.
    pub notes: Vec<String>,
    /// Records committed after the snapshot, before the backup was complete.
    pub missed: i64,
    /// The newest of them, measured from the snapshot (ms; 0 when none).
    pub rpo_ms: i64,
    /// Distinct records in the stream.
    pub stream_records: i64,
}

fn describe(r: &UsageRecord) -> String {
    if r.holder.is_empty() {
        format!("record {} ({}/{})", r.id, r.namespace, r.agent)
    } else {
        format!(
            "record {} ({}/{}, seq {} of holder {})",
            r.id, r.namespace, r.agent, r.seq, r.holder
        )
    }
}

fn rfc3339(ms: i64) -> String {
    crate::rfc3339(ms)
}

/// The fields in which two copies of a record differ, as `field: a vs b`.
fn differences(a: &UsageRecord, b: &UsageRecord) -> Vec<String> {
    let (Ok(serde_json::Value::Object(x)), Ok(serde_json::Value::Object(y))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return vec!["the record".to_owned()];
    };
    let keys: BTreeMap<&String, ()> = x.keys().chain(y.keys()).map(|k| (k, ())).collect();
    keys.into_keys()
        .filter(|k| x.get(*k) != y.get(*k))
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| v.map_or("-".to_owned(), |v| v.to_string());
            format!(
                "{k} is {} in the restore, {} in the stream",
                show(x.get(k)),
                show(y.get(k))
            )
        })
        .collect()
}

/// Reconciles the restore with the stream and the live ledger.
pub fn reconcile(input: &Inputs<'_>) -> Reconciled {
    let mut out = Reconciled::default();
    let restored: HashMap<&str, &(UsageRecord, i64)> = input
        .restored
        .iter()
        .map(|e| (e.0.id.as_str(), e))
        .collect();
    // What the backup missed: committed to the live ledger after the snapshot (less the commit
    // margin) and before the backup was complete.
    let mut after_backup = 0i64;
    for (id, delivered) in input.live {
        if restored.contains_key(id.as_str()) {
            continue;
        }
        if *delivered >= input.snapshot_ms - COMMIT_MARGIN_MS {
            if *delivered <= input.backup_done_ms {
                out.missed += 1;
                out.rpo_ms = out.rpo_ms.max(delivered - input.snapshot_ms);
            } else {
                after_backup += 1;
            }
        }
    }
    if after_backup > 0 {
        out.notes.push(format!(
            "{after_backup} records were committed after the backup was complete (the next backup has them)"
        ));
    }
    let Some(stream) = input.stream else {
        out.notes.push(
            "the restore was not reconciled against the stream (no NATS URL given): records deleted from the ledger before the backup are caught only by the audit chain".to_owned(),
        );
        return out;
    };
    out.stream_records = stream.len() as i64;
    let (mut pending_publish, mut aged_out, mut pending_delivery) = (0i64, 0i64, 0i64);
    let mut restored_ids: Vec<&(UsageRecord, i64)> = input.restored.iter().collect();
    restored_ids.sort_by(|a, b| {
        (a.0.holder.as_str(), a.0.seq, a.0.id.as_str()).cmp(&(
            b.0.holder.as_str(),
            b.0.seq,
            b.0.id.as_str(),
        ))
    });
    for (r, delivered) in restored_ids {
        match stream.get(&r.id) {
            Some((s, _)) if s != r => out.discrepancies.push(format!(
                "{} differs between the restore and the stream {}: {}",
                describe(r),
                input.stream_name,
                differences(r, s).join("; ")
            )),
            Some(_) => {}
            None if input.stream_first_ms.is_none_or(|first| *delivered < first) => aged_out += 1,
            None if *delivered > input.snapshot_ms - input.grace_ms => pending_publish += 1,
            None => out.discrepancies.push(format!(
                "{} is in the ledger (delivered {}) but not in the stream {}: the stream lost it, or it was written into the ledger by something other than a sidecar",
                describe(r),
                rfc3339(*delivered),
                input.stream_name
            )),
        }
    }
    let mut stream_only: Vec<&(UsageRecord, i64)> = stream
        .values()
        .filter(|(r, _)| !restored.contains_key(r.id.as_str()))
        .collect();
    stream_only.sort_by(|a, b| {
        (a.0.holder.as_str(), a.0.seq, a.0.id.as_str()).cmp(&(
            b.0.holder.as_str(),
            b.0.seq,
            b.0.id.as_str(),
        ))
    });
    for (r, published) in stream_only {
        match input.live.get(&r.id) {
            Some(delivered) if *delivered < input.snapshot_ms - COMMIT_MARGIN_MS => {
                out.discrepancies.push(format!(
                    "{} was committed to the ledger at {}, before the backup's snapshot at {}, but the restore lacks it: the backup is incomplete",
                    describe(r),
                    rfc3339(*delivered),
                    rfc3339(input.snapshot_ms)
                ));
            }
            // Committed after the snapshot: counted above.
            Some(_) => {}
            None if *published > input.now_ms - input.grace_ms => pending_delivery += 1,
            None => out.discrepancies.push(format!(
                "{} is in the stream {} (published {}) but in neither the ledger nor the backup: it was deleted from the ledger",
                describe(r),
                input.stream_name,
                rfc3339(*published)
            )),
        }
    }
    if pending_publish > 0 {
        out.notes.push(format!(
            "{pending_publish} records delivered within the grace before the snapshot are not in the stream yet"
        ));
    }
    if pending_delivery > 0 {
        out.notes.push(format!(
            "{pending_delivery} records published within the grace are not in the ledger yet"
        ));
    }
    if aged_out > 0 {
        out.notes.push(format!(
            "{aged_out} records are older than the stream's oldest message (outside its retention) and were not reconciled"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, seq: i64, cost: i64) -> UsageRecord {
        UsageRecord {
            id: id.into(),
            namespace: "research".into(),
            agent: "bot".into(),
            budgets: "research/team@u1".into(),
            endpoint: "chat_completions".into(),
            model: "gpt-4o-mini".into(),
            started_at_ms: 1_000,
            input_tokens: 10,
            output_tokens: 5,
            cost_micros: cost,
            holder: "h1".into(),
            seq,
            ..UsageRecord::default()
        }
    }

    const SNAP: i64 = 1_000_000;
    const DONE: i64 = 1_004_000;
    const NOW: i64 = 1_010_000;

    fn run(
        restored: &[(UsageRecord, i64)],
        stream: &[(UsageRecord, i64)],
        live: &[(&str, i64)],
    ) -> Reconciled {
        let stream: HashMap<String, (UsageRecord, i64)> = stream
            .iter()
            .map(|(r, t)| (r.id.clone(), (r.clone(), *t)))
            .collect();
        let live: HashMap<String, i64> = live.iter().map(|(i, t)| ((*i).to_owned(), *t)).collect();
        reconcile(&Inputs {
            restored,
            stream: Some(&stream),
            live: &live,
            snapshot_ms: SNAP,
            backup_done_ms: DONE,
            now_ms: NOW,
            grace_ms: 60_000,
            stream_first_ms: Some(0),
            stream_name: "SOMA_USAGE",
        })
    }

    #[test]
    fn a_clean_restore_passes_and_measures_what_the_backup_missed() {
        let old = |i: i64| (rec(&format!("r{i}"), i, 7), SNAP - 100_000);
        let restored: Vec<_> = (1..=3).map(old).collect();
        let mut stream: Vec<_> = (1..=3)
            .map(|i| (rec(&format!("r{i}"), i, 7), SNAP - 99_000))
            .collect();
        // Two records committed while the backup ran, one after it was complete.
        stream.push((rec("r4", 4, 7), SNAP + 1_000));
        stream.push((rec("r5", 5, 7), SNAP + 2_500));
        stream.push((rec("r6", 6, 7), DONE + 1_000));
        let live = [("r4", SNAP + 900), ("r5", SNAP + 2_400), ("r6", DONE + 900)];
        let out = run(&restored, &stream, &live);
        assert!(out.discrepancies.is_empty(), "{:?}", out.discrepancies);
        assert_eq!((out.missed, out.rpo_ms, out.stream_records), (2, 2_400, 6));
        assert!(
            out.notes
                .iter()
                .any(|n| n.starts_with("1 records were committed after the backup")),
            "{:?}",
            out.notes
        );
    }

    #[test]
    fn each_discrepancy_is_named_exactly() {
        let t = SNAP - 100_000;
        // r2 edited in the restore; r3 missing from the stream; r4 deleted from the ledger;
        // r5 committed long before the snapshot but missing from the backup.
        let restored = vec![
            (rec("r1", 1, 7), t),
            (rec("r2", 2, 6), t),
            (rec("r3", 3, 7), t),
        ];
        let stream = vec![
            (rec("r1", 1, 7), t),
            (rec("r2", 2, 7), t),
            (rec("r4", 4, 7), t),
            (rec("r5", 5, 7), t),
        ];
        let out = run(&restored, &stream, &[("r5", t)]);
        let all = out.discrepancies.join("\n");
        assert_eq!(out.discrepancies.len(), 4, "{all}");
        assert!(all.contains("record r2 (research/bot, seq 2 of holder h1) differs between the restore and the stream SOMA_USAGE: cost_micros is 6 in the restore, 7 in the stream"), "{all}");
        assert!(
            all.contains(
                "record r3 (research/bot, seq 3 of holder h1) is in the ledger (delivered"
            ),
            "{all}"
        );
        assert!(all.contains("but not in the stream SOMA_USAGE"), "{all}");
        assert!(all.contains("record r4 (research/bot, seq 4 of holder h1) is in the stream SOMA_USAGE (published"), "{all}");
        assert!(all.contains("it was deleted from the ledger"), "{all}");
        assert!(
            all.contains(
                "record r5 (research/bot, seq 5 of holder h1) was committed to the ledger at"
            ),
            "{all}"
        );
        assert!(all.contains("the backup is incomplete"), "{all}");
        assert_eq!(out.missed, 0);
    }

    #[test]
    fn records_in_flight_between_ledger_and_stream_are_notes_not_discrepancies() {
        // Delivered just before the snapshot, not published yet; published just now, not
        // delivered yet; older than the stream's retention.
        let restored = vec![(rec("a", 1, 7), SNAP - 10_000), (rec("old", 2, 7), 10)];
        let stream = [(rec("b", 3, 7), NOW - 5_000)];
        let s: HashMap<String, (UsageRecord, i64)> = stream
            .iter()
            .map(|(r, t)| (r.id.clone(), (r.clone(), *t)))
            .collect();
        let out = reconcile(&Inputs {
            restored: &restored,
            stream: Some(&s),
            live: &HashMap::new(),
            snapshot_ms: SNAP,
            backup_done_ms: DONE,
            now_ms: NOW,
            grace_ms: 60_000,
            stream_first_ms: Some(100),
            stream_name: "SOMA_USAGE",
        });
        assert!(out.discrepancies.is_empty(), "{:?}", out.discrepancies);
        assert_eq!(out.notes.len(), 3, "{:?}", out.notes);
        // Without a stream, the drill says what it could not check.
        let out = reconcile(&Inputs {
            restored: &restored,
            stream: None,
            live: &HashMap::new(),
            snapshot_ms: SNAP,
            backup_done_ms: DONE,
            now_ms: NOW,
            grace_ms: 60_000,
            stream_first_ms: None,
            stream_name: "SOMA_USAGE",
        });
        assert!(
            out.notes[0].contains("not reconciled against the stream"),
            "{:?}",
            out.notes
        );
    }
}
