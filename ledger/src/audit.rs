//! The audit trail: seals over the holders' hash chains, and `verify`, which re-derives
//! everything from the rows and reports what broke and where.
//!
//! A **seal** (written by the operator's Budget controller, off the request path) covers one
//! Budget window as the ledger holds it at that moment: how many records were charged to it,
//! their tokens and cost, and the head (`seq`, `hash`) of every sidecar chain that charged it.
//! Seals form their own chain and each is signed with the operator's Ed25519 key, so rows
//! changed after a seal cannot be made consistent again without that key.
//!
//! | tampering | how `verify` sees it |
//! | --- | --- |
//! | a record edited | its hash no longer matches its content (`edited`) |
//! | a record deleted | a gap in its holder's `seq` (`missing`), or a sealed head that is gone |
//! | a record inserted into a chain | the links after it break (`link`), or the seq is taken twice (`inserted`) |
//! | records reordered | a record's hash matches its content only at another position (`reordered`) |
//! | a record inserted into a sealed window | delivered before a seal of its window that does not count it (`inserted`) |
//! | a seal changed or removed | its hash, signature or the seal chain (`seal`) |
//!
//! What a seal cannot cover: records appended after the latest seal of their window are
//! listed as `unsealed` (normal for a window still in use); the DR drill reconciles them
//! against the NATS JetStream copy of every record.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use soma_metering::BudgetRef;
use sqlx::{PgPool, Row};

use crate::record::{UsageRecord, genesis};

/// Why a seal key could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not base64 of 32 bytes.
    #[error("a seal key is base64 of 32 bytes")]
    Format,
    /// The system's random source failed.
    #[error("no randomness for a new seal key: {0}")]
    Random(String),
}

/// The operator's Ed25519 key for seals.
#[derive(Clone, Debug)]
pub struct SealKey {
    signing: SigningKey,
}

impl SealKey {
    /// A new random key.
    pub fn generate() -> Result<SealKey, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(SealKey {
            signing: SigningKey::from_bytes(&seed),
        })
    }

    /// Reads the private seed (base64 of 32 bytes) as stored in the operator's Secret.
    pub fn from_seed(text: &str) -> Result<SealKey, KeyError> {
        let bytes = B64.decode(text.trim()).map_err(|_| KeyError::Format)?;
        let seed: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Format)?;
        Ok(SealKey {
            signing: SigningKey::from_bytes(&seed),
        })
    }

    /// The private seed, base64, for the operator's Secret.
    pub fn seed(&self) -> String {
        B64.encode(self.signing.to_bytes())
    }

    /// The public key, base64: what an auditor is given.
    pub fn public(&self) -> String {
        B64.encode(self.signing.verifying_key().to_bytes())
    }

    /// `ed25519:<first 16 hex of SHA-256 of the public key>`.
    pub fn key_id(&self) -> String {
        key_id(&self.signing.verifying_key())
    }
}

fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.to_bytes());
    format!("ed25519:{}", &hex::encode(digest)[..16])
}

/// Reads a public key (base64 of 32 bytes).
pub fn public_key(text: &str) -> Result<VerifyingKey, KeyError> {
    let bytes = B64.decode(text.trim()).map_err(|_| KeyError::Format)?;
    let raw: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Format)?;
    VerifyingKey::from_bytes(&raw).map_err(|_| KeyError::Format)
}

/// The head of one holder's chain as a seal saw it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Head {
    /// The sidecar.
    pub holder: String,
    /// Its last record charged to the sealed window.
    pub seq: i64,
    /// That record's hash.
    pub hash: String,
}

/// One seal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    /// Its place in the seal chain (1-based).
    pub seq: i64,
    /// When it was made (Unix ms).
    pub sealed_at_ms: i64,
    /// The Budget (`namespace/name@uid`).
    pub budget: String,
    /// The window's start (Unix ms).
    pub window_start_ms: i64,
    /// The window's end (Unix ms).
    pub window_end_ms: i64,
    /// Records charged to the window.
    pub records: i64,
    /// Their tokens.
    pub tokens: i64,
    /// Their cost.
    pub cost_micros: i64,
    /// Each charging holder's last record in the window.
    pub heads: Vec<Head>,
    /// The previous seal's hash.
    pub prev_hash: String,
    /// This seal's hash.
    pub hash: String,
    /// The key that signed it.
    pub key_id: String,
    /// Ed25519 signature of `hash`, base64.
    pub signature: String,
}

/// The hash before the first seal.
pub fn seal_genesis() -> String {
    hex::encode(Sha256::digest(b"soma-seal-genesis"))
}

impl Seal {
    /// The hash this seal must carry.
    pub fn compute_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"soma-seal-v1");
        let mut field = |s: &str| {
            h.update(u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
            h.update(s.as_bytes());
        };
        field(&self.prev_hash);
        field(&self.seq.to_string());
        field(&self.sealed_at_ms.to_string());
        field(&self.budget);
        field(&self.window_start_ms.to_string());
        field(&self.window_end_ms.to_string());
        field(&self.records.to_string());
        field(&self.tokens.to_string());
        field(&self.cost_micros.to_string());
        for head in &self.heads {
            field(&head.holder);
            field(&head.seq.to_string());
            field(&head.hash);
        }
        field(&self.key_id);
        hex::encode(h.finalize())
    }

    fn same_content(&self, other: &Seal) -> bool {
        (self.records, self.tokens, self.cost_micros, &self.heads)
            == (other.records, other.tokens, other.cost_micros, &other.heads)
    }
}

/// What the records charged to one Budget window add up to, and each holder's last record.
async fn window_state(
    pool: &PgPool,
    label: &str,
    start_ms: i64,
    end_ms: i64,
) -> Result<(i64, i64, i64, Vec<Head>), sqlx::Error> {
    let totals = sqlx::query(
        "SELECT COUNT(*)::BIGINT, COALESCE(SUM(input_tokens + output_tokens), 0)::BIGINT,
                COALESCE(SUM(cost_micros), 0)::BIGINT
           FROM usage_records
          WHERE $1 = ANY (string_to_array(budgets, ','))
            AND started_at >= to_timestamp($2 / 1000.0) AND started_at < to_timestamp($3 / 1000.0)",
    )
    .bind(label)
    .bind(start_ms)
    .bind(end_ms)
    .fetch_one(pool)
    .await?;
    let heads = sqlx::query(
        "SELECT DISTINCT ON (holder) holder, seq, hash FROM usage_records
          WHERE holder IS NOT NULL AND $1 = ANY (string_to_array(budgets, ','))
            AND started_at >= to_timestamp($2 / 1000.0) AND started_at < to_timestamp($3 / 1000.0)
          ORDER BY holder, seq DESC",
    )
    .bind(label)
    .bind(start_ms)
    .bind(end_ms)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| Head {
        holder: r.get(0),
        seq: r.get(1),
        hash: r.get::<Option<String>, _>(2).unwrap_or_default(),
    })
    .collect();
    Ok((totals.get(0), totals.get(1), totals.get(2), heads))
}

fn seal_from_row(r: &sqlx::postgres::PgRow) -> Seal {
    let heads: serde_json::Value = r.get("heads");
    Seal {
        seq: r.get("seq"),
        sealed_at_ms: r.get("sealed_at_ms"),
        budget: {
            let b: String = r.get("budget");
            let uid: String = r.get("budget_uid");
            if uid.is_empty() {
                b
            } else {
                format!("{b}@{uid}")
            }
        },
        window_start_ms: r.get("window_start_ms"),
        window_end_ms: r.get("window_end_ms"),
        records: r.get("records"),
        tokens: r.get("tokens"),
        cost_micros: r.get("cost_micros"),
        heads: serde_json::from_value(heads).unwrap_or_default(),
        prev_hash: r.get("prev_hash"),
        hash: r.get("hash"),
        key_id: r.get("key_id"),
        signature: r.get("signature"),
    }
}

const SEAL_COLUMNS: &str = "seq, sealed_at_ms, budget, budget_uid, window_start_ms, window_end_ms,
    records, tokens, cost_micros, heads, prev_hash, hash, key_id, signature";

/// Seals `budget`'s window as the ledger holds it now, unless its latest seal already says
/// the same. Seals are chained one at a time (an advisory lock serialises writers). Returns
/// the new seal, if one was written.
pub async fn seal_window(
    pool: &PgPool,
    key: &SealKey,
    budget: &BudgetRef,
    start_ms: i64,
    end_ms: i64,
    now_ms: i64,
) -> Result<Option<Seal>, sqlx::Error> {
    let label = budget.label();
    let (records, tokens, cost_micros, mut heads) =
        window_state(pool, &label, start_ms, end_ms).await?;
    heads.sort();
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(7236001)")
        .execute(&mut *tx)
        .await?;
    let latest = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {SEAL_COLUMNS} FROM ledger_seals
          WHERE budget = $1 AND budget_uid = $2 AND window_start_ms = $3
          ORDER BY seq DESC LIMIT 1"
    )))
    .bind(budget.key.to_string())
    .bind(&budget.uid)
    .bind(start_ms)
    .fetch_optional(&mut *tx)
    .await?
    .map(|r| seal_from_row(&r));
    let last = sqlx::query("SELECT seq, hash FROM ledger_seals ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| (r.get::<i64, _>(0), r.get::<String, _>(1)));
    let (prev_seq, prev_hash) = last.unwrap_or((0, seal_genesis()));
    let mut seal = Seal {
        seq: prev_seq + 1,
        sealed_at_ms: now_ms,
        budget: label,
        window_start_ms: start_ms,
        window_end_ms: end_ms,
        records,
        tokens,
        cost_micros,
        heads,
        prev_hash,
        hash: String::new(),
        key_id: key.key_id(),
        signature: String::new(),
    };
    if records == 0 || latest.as_ref().is_some_and(|l| l.same_content(&seal)) {
        return Ok(None);
    }
    seal.hash = seal.compute_hash();
    let hash_bytes = hex::decode(&seal.hash).unwrap_or_default();
    seal.signature = B64.encode(key.signing.sign(&hash_bytes).to_bytes());
    sqlx::query(
        "INSERT INTO ledger_seal_keys (key_id, public_key) VALUES ($1, $2)
         ON CONFLICT (key_id) DO NOTHING",
    )
    .bind(&seal.key_id)
    .bind(key.public())
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO ledger_seals (seq, sealed_at_ms, budget, budget_uid, window_start_ms,
            window_end_ms, records, tokens, cost_micros, heads, prev_hash, hash, key_id, signature)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(seal.seq)
    .bind(seal.sealed_at_ms)
    .bind(budget.key.to_string())
    .bind(&budget.uid)
    .bind(seal.window_start_ms)
    .bind(seal.window_end_ms)
    .bind(seal.records)
    .bind(seal.tokens)
    .bind(seal.cost_micros)
    .bind(serde_json::to_value(&seal.heads).unwrap_or_default())
    .bind(&seal.prev_hash)
    .bind(&seal.hash)
    .bind(&seal.key_id)
    .bind(&seal.signature)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(seal))
}

/// What `verify` covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One Budget (`namespace/name`): the chains of every sidecar that charged it, its seals.
    Budget(String),
    /// Every Budget and Agent of a namespace.
    Namespace(String),
    /// Everything.
    All,
}

/// Where a finding points.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    /// `edited`, `missing`, `inserted`, `reordered`, `link`, `seal`, `unsealed`, `unchained`.
    pub kind: &'static str,
    /// Whether this is tampering (`false`: information, such as unsealed recent records).
    pub tampering: bool,
    /// The sidecar chain, if the finding is about one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// The position in it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    /// The record's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
    /// The seal, if the finding is about one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seal: Option<i64>,
    /// What is wrong, in words.
    pub message: String,
}

/// The outcome of [`verify`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Records checked.
    pub records: u64,
    /// Holder chains checked.
    pub chains: u64,
    /// Seals checked.
    pub seals: u64,
    /// Whether seal signatures were checked against a key given from outside the ledger.
    pub trusted_key: bool,
    /// What was found, tampering first.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Whether anything was tampered with.
    pub fn tampered(&self) -> bool {
        self.findings.iter().any(|f| f.tampering)
    }
}

fn finding(kind: &'static str, message: String) -> Finding {
    Finding {
        kind,
        tampering: !matches!(kind, "unsealed" | "unchained"),
        holder: None,
        seq: None,
        record: None,
        seal: None,
        message,
    }
}

/// The columns [`record_from_row`] reads.
pub const RECORD_COLUMNS: &str = "id, namespace, agent, budgets, endpoint, model,
    (EXTRACT(EPOCH FROM started_at) * 1000)::BIGINT AS started_at_ms,
    (EXTRACT(EPOCH FROM finished_at) * 1000)::BIGINT AS finished_at_ms,
    input_tokens, cached_input_tokens, cache_write_input_tokens, output_tokens,
    reasoning_tokens, cost_micros, estimated, outcome, http_status::BIGINT AS http_status,
    holder, seq, prev_hash, hash, cache_write_1h_input_tokens, web_search_requests,
    web_fetch_requests, unmetered,
    (EXTRACT(EPOCH FROM delivered_at) * 1000)::BIGINT AS delivered_ms";

/// A usage record and when it was delivered (Unix ms), from a row of [`RECORD_COLUMNS`].
pub fn record_from_row(r: &sqlx::postgres::PgRow) -> (UsageRecord, i64) {
    (
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
            holder: r.get::<Option<String>, _>("holder").unwrap_or_default(),
            seq: r.get::<Option<i64>, _>("seq").unwrap_or_default(),
            prev_hash: r.get::<Option<String>, _>("prev_hash").unwrap_or_default(),
            hash: r.get::<Option<String>, _>("hash").unwrap_or_default(),
            cache_write_1h_input_tokens: r.get("cache_write_1h_input_tokens"),
            web_search_requests: r.get("web_search_requests"),
            web_fetch_requests: r.get("web_fetch_requests"),
            unmetered: r.get("unmetered"),
        },
        r.get::<Option<i64>, _>("delivered_ms").unwrap_or_default(),
    )
}

/// How far from its current seq a record is looked for where it was written.
const REORDER_SEARCH: i64 = 1_000;

/// Checks one holder's chain (records in stored `seq` order).
fn check_chain(holder: &str, records: &[(UsageRecord, i64)], out: &mut Vec<Finding>) {
    let at = |kind: &'static str, r: &UsageRecord, message: String| Finding {
        holder: Some(holder.to_owned()),
        seq: Some(r.seq),
        record: Some(r.id.clone()),
        ..finding(kind, message)
    };
    let mut expected_seq = 1;
    let mut prev = genesis(holder);
    let mut last_seq = 0;
    for (r, _) in records {
        if r.seq == last_seq {
            out.push(at(
                "inserted",
                r,
                format!(
                    "seq {} of holder {holder} is taken by more than one record",
                    r.seq
                ),
            ));
            continue;
        }
        last_seq = r.seq;
        if r.seq > expected_seq {
            out.push(Finding {
                holder: Some(holder.to_owned()),
                seq: Some(expected_seq),
                ..finding(
                    "missing",
                    format!(
                        "records {expected_seq}..{} of holder {holder} are missing (deleted)",
                        r.seq - 1
                    ),
                )
            });
        }
        let content_ok = r.link_hash(&r.prev_hash) == r.hash;
        if !content_ok {
            // Written at another position? A record whose content still matches its hash at
            // a nearby seq was moved there, not edited.
            let moved = (r.seq.saturating_sub(REORDER_SEARCH).max(1)..=r.seq + REORDER_SEARCH)
                .filter(|s| *s != r.seq)
                .find(|s| {
                    let mut probe = r.clone();
                    probe.seq = *s;
                    probe.link_hash(&r.prev_hash) == r.hash
                });
            match moved {
                Some(s) => out.push(at(
                    "reordered",
                    r,
                    format!(
                        "record {} was written as seq {s} of holder {holder} and now sits at seq {}",
                        r.id, r.seq
                    ),
                )),
                None => out.push(at(
                    "edited",
                    r,
                    format!(
                        "record {} (seq {} of holder {holder}) does not match its hash: its content was changed",
                        r.id, r.seq
                    ),
                )),
            }
        } else if r.prev_hash != prev && r.seq == expected_seq {
            out.push(at(
                "link",
                r,
                format!(
                    "record {} (seq {} of holder {holder}) does not follow the record before it: one was inserted, removed or replaced before it",
                    r.id, r.seq
                ),
            ));
        }
        prev = r.hash.clone();
        expected_seq = r.seq + 1;
    }
}

/// Verifies the chains and seals in `scope`. With `trusted` (the operator's public key, from
/// outside the ledger) seal signatures are checked against it; without, against the key the
/// ledger itself records, which proves only that the seals agree with each other.
pub async fn verify(
    pool: &PgPool,
    scope: &Scope,
    trusted: Option<&VerifyingKey>,
) -> Result<Report, sqlx::Error> {
    let mut report = Report {
        trusted_key: trusted.is_some(),
        ..Report::default()
    };
    // Which holders and seals are in scope.
    let (holder_filter, seal_filter): (String, String) = match scope {
        Scope::All => ("TRUE".into(), "TRUE".into()),
        Scope::Namespace(_) => (
            "holder IN (SELECT DISTINCT holder FROM usage_records WHERE holder IS NOT NULL AND (namespace = $1 OR EXISTS (SELECT 1 FROM unnest(string_to_array(budgets, ',')) b WHERE split_part(b, '/', 1) = $1)))".into(),
            "split_part(budget, '/', 1) = $1".into(),
        ),
        Scope::Budget(_) => (
            "holder IN (SELECT DISTINCT holder FROM usage_records WHERE holder IS NOT NULL AND EXISTS (SELECT 1 FROM unnest(string_to_array(budgets, ',')) b WHERE split_part(b, '@', 1) = $1))".into(),
            "budget = $1".into(),
        ),
    };
    let arg = match scope {
        Scope::All => String::new(),
        Scope::Namespace(n) | Scope::Budget(n) => n.clone(),
    };
    let with_arg = |q: &str| -> String {
        if matches!(scope, Scope::All) {
            q.replace("$1", "''")
        } else {
            q.to_owned()
        }
    };
    let rows = sqlx::query(sqlx::AssertSqlSafe(with_arg(&format!(
        "SELECT {RECORD_COLUMNS} FROM usage_records
          WHERE holder IS NOT NULL AND {holder_filter}
          ORDER BY holder, seq, id"
    ))))
    .bind(&arg)
    .fetch_all(pool)
    .await?;
    let mut chains: BTreeMap<String, Vec<(UsageRecord, i64)>> = BTreeMap::new();
    for row in &rows {
        let (r, delivered) = record_from_row(row);
        chains
            .entry(r.holder.clone())
            .or_default()
            .push((r, delivered));
    }
    report.records = rows.len() as u64;
    report.chains = chains.len() as u64;
    for (holder, records) in &chains {
        check_chain(holder, records, &mut report.findings);
    }
    let unchained: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(with_arg(&format!(
        "SELECT COUNT(*) FROM usage_records WHERE holder IS NULL AND ({})",
        match scope {
            Scope::All => "TRUE".to_owned(),
            Scope::Namespace(_) => "namespace = $1".to_owned(),
            Scope::Budget(_) => "EXISTS (SELECT 1 FROM unnest(string_to_array(budgets, ',')) b WHERE split_part(b, '@', 1) = $1)".to_owned(),
        }
    ))))
    .bind(&arg)
    .fetch_one(pool)
    .await?;
    if unchained > 0 {
        report.findings.push(finding(
            "unchained",
            format!("{unchained} records were delivered before the audit chain existed and are not chained"),
        ));
    }

    // The seal chain is global: check all of it, report the seals in scope.
    let seals: Vec<Seal> = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {SEAL_COLUMNS} FROM ledger_seals ORDER BY seq"
    )))
    .fetch_all(pool)
    .await?
    .iter()
    .map(seal_from_row)
    .collect();
    let keys: HashMap<String, String> =
        sqlx::query("SELECT key_id, public_key FROM ledger_seal_keys")
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    let in_scope: BTreeSet<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(with_arg(&format!(
        "SELECT seq FROM ledger_seals WHERE {seal_filter}"
    ))))
    .bind(&arg)
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    report.seals = in_scope.len() as u64;
    let mut prev = seal_genesis();
    let mut expected = 1;
    for s in &seals {
        let seal_finding = |message: String| Finding {
            seal: Some(s.seq),
            ..finding("seal", message)
        };
        if s.seq != expected {
            report.findings.push(seal_finding(format!(
                "seals {expected}..{} are missing",
                s.seq - 1
            )));
        }
        if s.prev_hash != prev && s.seq == expected {
            report.findings.push(seal_finding(format!(
                "seal {} does not follow the seal before it",
                s.seq
            )));
        }
        if s.compute_hash() != s.hash {
            report.findings.push(seal_finding(format!(
                "seal {} was changed after it was signed",
                s.seq
            )));
        }
        let key = match trusted {
            Some(k) => (key_id(k) == s.key_id).then_some(*k),
            None => keys.get(&s.key_id).and_then(|p| public_key(p).ok()),
        };
        let signed = key.is_some_and(|k| {
            let sig = B64
                .decode(&s.signature)
                .ok()
                .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok());
            let msg = hex::decode(&s.hash).unwrap_or_default();
            sig.is_some_and(|sig| k.verify(&msg, &sig).is_ok())
        });
        if !signed {
            report.findings.push(seal_finding(format!(
                "seal {} is not signed by {}",
                s.seq,
                if trusted.is_some() {
                    "the trusted key"
                } else {
                    "a key the ledger records"
                }
            )));
        }
        prev = s.hash.clone();
        expected = s.seq + 1;
    }

    // Each Budget window's latest seal in scope against the records as they are now.
    let mut latest: BTreeMap<(String, i64), &Seal> = BTreeMap::new();
    for s in seals.iter().filter(|s| in_scope.contains(&s.seq)) {
        latest.insert((s.budget.clone(), s.window_start_ms), s);
    }
    let by_id: HashMap<(&str, i64), &(UsageRecord, i64)> = chains
        .values()
        .flatten()
        .map(|e| ((e.0.holder.as_str(), e.0.seq), e))
        .collect();
    for s in latest.values() {
        check_seal(pool, s, &by_id, &mut report.findings).await?;
    }
    report.findings.sort_by_key(|f| !f.tampering);
    Ok(report)
}

/// A record delivered this long before a seal must be in it: a delivery that started before
/// the seal read the window but committed after is not mistaken for an insertion.
const SEAL_MARGIN_MS: i64 = 5_000;

/// Compares one seal with the records charged to its window now.
async fn check_seal(
    pool: &PgPool,
    s: &Seal,
    chain_records: &HashMap<(&str, i64), &(UsageRecord, i64)>,
    out: &mut Vec<Finding>,
) -> Result<(), sqlx::Error> {
    let seal_finding = |kind: &'static str, message: String| Finding {
        seal: Some(s.seq),
        ..finding(kind, message)
    };
    for head in &s.heads {
        match chain_records.get(&(head.holder.as_str(), head.seq)) {
            Some((r, _)) if r.hash == head.hash => {}
            Some((r, _)) => out.push(Finding {
                holder: Some(head.holder.clone()),
                seq: Some(head.seq),
                record: Some(r.id.clone()),
                ..seal_finding(
                    "edited",
                    format!(
                        "seal {} names record seq {} of holder {} with another hash: it was replaced",
                        s.seq, head.seq, head.holder
                    ),
                )
            }),
            None => out.push(Finding {
                holder: Some(head.holder.clone()),
                seq: Some(head.seq),
                ..seal_finding(
                    "missing",
                    format!(
                        "seal {} names record seq {} of holder {}, which is gone (deleted)",
                        s.seq, head.seq, head.holder
                    ),
                )
            }),
        }
    }
    let heads: HashMap<&str, i64> = s.heads.iter().map(|h| (h.holder.as_str(), h.seq)).collect();
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {RECORD_COLUMNS} FROM usage_records
          WHERE $1 = ANY (string_to_array(budgets, ','))
            AND started_at >= to_timestamp($2 / 1000.0) AND started_at < to_timestamp($3 / 1000.0)"
    )))
    .bind(&s.budget)
    .bind(s.window_start_ms)
    .bind(s.window_end_ms)
    .fetch_all(pool)
    .await?;
    let (mut n, mut tokens, mut micros, mut unsealed) = (0i64, 0i64, 0i64, 0i64);
    for row in &rows {
        let (r, delivered_ms) = record_from_row(row);
        let sealed = heads.get(r.holder.as_str()).is_some_and(|h| r.seq <= *h);
        if sealed {
            n += 1;
            tokens += r.tokens();
            micros += r.cost_micros;
        } else if delivered_ms.saturating_add(SEAL_MARGIN_MS) <= s.sealed_at_ms {
            out.push(Finding {
                holder: (!r.holder.is_empty()).then(|| r.holder.clone()),
                seq: (r.seq > 0).then_some(r.seq),
                record: Some(r.id.clone()),
                ..seal_finding(
                    "inserted",
                    format!(
                        "record {} was delivered before seal {} of {} but the seal does not count it: it was inserted",
                        r.id, s.seq, s.budget
                    ),
                )
            });
        } else {
            unsealed += 1;
        }
    }
    if (n, tokens, micros) != (s.records, s.tokens, s.cost_micros) {
        out.push(seal_finding(
            "seal",
            format!(
                "seal {} of {} counts {} records, {} tokens, {} micros; the ledger now holds {n}, {tokens}, {micros} under it",
                s.seq, s.budget, s.records, s.tokens, s.cost_micros
            ),
        ));
    }
    if unsealed > 0 {
        out.push(seal_finding(
            "unsealed",
            format!(
                "{unsealed} records of {} were delivered after its latest seal ({}); the next seal covers them",
                s.budget, s.seq
            ),
        ));
    }
    Ok(())
}
