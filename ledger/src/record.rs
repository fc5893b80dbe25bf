//! One usage record as the ledger stores it, and the hash chain that links a sidecar's
//! records.
//!
//! Each sidecar (a *holder*: the stable id kept in its outbox) numbers its records 1, 2, 3 …
//! and links each to the one before: `hash_n = SHA-256(hash_{n-1} ‖ canonical(record_n))`, with
//! `hash_0` derived from the holder's id. The link is computed when the record leaves the
//! outbox for the ledger (off the request path), and stored with it. An edited record no longer
//! matches its hash; a deleted one leaves a gap in `seq`; an inserted or reordered one breaks
//! the link of the record after it. Tail deletions and wholly invented holders are caught by
//! the seals (`crate::audit`).
//!
//! ```text
//!  genesis(holder) ─► h1 = H(h0 ‖ r1) ─► h2 = H(h1 ‖ r2) ─► … ─► head (sealed per Budget window)
//! ```

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A settled usage record: what the sidecar's outbox delivers to the ledger and publishes on
/// NATS, and what `soma audit verify` re-hashes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Idempotency key (UUIDv7).
    pub id: String,
    /// The Agent's namespace.
    pub namespace: String,
    /// The Agent.
    pub agent: String,
    /// The Budget chain charged: `namespace/name@uid`, comma-separated (empty: none).
    pub budgets: String,
    /// Endpoint label.
    pub endpoint: String,
    /// Model sent upstream.
    pub model: String,
    /// When the reservation was taken (Unix ms).
    pub started_at_ms: i64,
    /// When it was settled (Unix ms).
    pub finished_at_ms: Option<i64>,
    /// All prompt tokens.
    pub input_tokens: i64,
    /// Prompt tokens read from the provider's cache.
    pub cached_input_tokens: i64,
    /// Prompt tokens written to the provider's cache.
    pub cache_write_input_tokens: i64,
    /// The part of the cache writes kept for an hour.
    #[serde(default)]
    pub cache_write_1h_input_tokens: i64,
    /// Generated tokens.
    pub output_tokens: i64,
    /// Generated tokens spent on reasoning.
    pub reasoning_tokens: i64,
    /// Web searches the provider ran for the call.
    #[serde(default)]
    pub web_search_requests: i64,
    /// Web pages the provider fetched for the call.
    #[serde(default)]
    pub web_fetch_requests: i64,
    /// Cost in micros.
    pub cost_micros: i64,
    /// The sidecar's estimate rather than the provider's numbers.
    pub estimated: bool,
    /// How the call ended.
    pub outcome: Option<String>,
    /// Status the client saw.
    pub http_status: Option<i64>,
    /// Usage fields the sidecar saw and did not meter, comma-separated (empty: none).
    #[serde(default)]
    pub unmetered: String,
    /// The sidecar that wrote it (its outbox's holder id).
    #[serde(default)]
    pub holder: String,
    /// Its place in the holder's chain (1-based; 0: not chained).
    #[serde(default)]
    pub seq: i64,
    /// The previous record's hash (hex).
    #[serde(default)]
    pub prev_hash: String,
    /// This record's hash (hex).
    #[serde(default)]
    pub hash: String,
}

impl UsageRecord {
    /// Input plus output tokens.
    pub fn tokens(&self) -> i64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }

    /// The bytes the chain hashes: every field but the chain's own, each length-prefixed, so
    /// no two different records share them.
    ///
    /// Version 2 adds the one-hour cache writes, the server-tool uses and the unmetered
    /// fields; a record with all of them zero or empty keeps the version 1 form, so records
    /// hashed before version 2 existed still verify.
    pub fn canonical(&self) -> Vec<u8> {
        let v2 = self.cache_write_1h_input_tokens != 0
            || self.web_search_requests != 0
            || self.web_fetch_requests != 0
            || !self.unmetered.is_empty();
        let mut out = if v2 {
            b"soma-usage-v2".to_vec()
        } else {
            b"soma-usage-v1".to_vec()
        };
        let mut field = |bytes: &[u8]| {
            out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
            out.extend_from_slice(bytes);
        };
        let num = |v: i64| v.to_string();
        let opt = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
        field(self.id.as_bytes());
        field(self.namespace.as_bytes());
        field(self.agent.as_bytes());
        field(self.budgets.as_bytes());
        field(self.endpoint.as_bytes());
        field(self.model.as_bytes());
        field(num(self.started_at_ms).as_bytes());
        field(opt(self.finished_at_ms).as_bytes());
        field(num(self.input_tokens).as_bytes());
        field(num(self.cached_input_tokens).as_bytes());
        field(num(self.cache_write_input_tokens).as_bytes());
        field(num(self.output_tokens).as_bytes());
        field(num(self.reasoning_tokens).as_bytes());
        field(num(self.cost_micros).as_bytes());
        field(if self.estimated { b"1" } else { b"0" });
        field(self.outcome.as_deref().unwrap_or("-").as_bytes());
        field(opt(self.http_status).as_bytes());
        field(self.holder.as_bytes());
        field(num(self.seq).as_bytes());
        if v2 {
            field(num(self.cache_write_1h_input_tokens).as_bytes());
            field(num(self.web_search_requests).as_bytes());
            field(num(self.web_fetch_requests).as_bytes());
            field(self.unmetered.as_bytes());
        }
        out
    }

    /// The hash this record must carry after `prev` (hex).
    pub fn link_hash(&self, prev: &str) -> String {
        let mut h = Sha256::new();
        h.update(prev.as_bytes());
        h.update(self.canonical());
        hex::encode(h.finalize())
    }

    /// Places the record in `holder`'s chain at `seq`, after `prev`.
    pub fn chain(&mut self, holder: &str, seq: i64, prev: &str) {
        self.holder = holder.to_owned();
        self.seq = seq;
        self.prev_hash = prev.to_owned();
        self.hash = self.link_hash(prev);
    }
}

/// The hash before a holder's first record.
pub fn genesis(holder: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"soma-ledger-genesis\n");
    h.update(holder.as_bytes());
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rec(id: &str, tokens: i64) -> UsageRecord {
        UsageRecord {
            id: id.into(),
            namespace: "a".into(),
            agent: "bot".into(),
            budgets: "a/team@u1".into(),
            endpoint: "chat_completions".into(),
            model: "gpt-4o-mini".into(),
            started_at_ms: 1_700_000_000_000,
            finished_at_ms: Some(1_700_000_000_100),
            input_tokens: tokens,
            output_tokens: 5,
            cost_micros: 7,
            outcome: Some("ok".into()),
            http_status: Some(200),
            ..UsageRecord::default()
        }
    }

    #[test]
    fn every_field_is_covered_and_links_depend_on_order() {
        let mut a = rec("1", 10);
        a.chain("h", 1, &genesis("h"));
        let base = a.hash.clone();
        assert_eq!(a.link_hash(&genesis("h")), base);
        type Edit = Box<dyn Fn(&mut UsageRecord)>;
        let edits: Vec<Edit> = vec![
            Box::new(|r| r.id.push('x')),
            Box::new(|r| r.namespace.push('x')),
            Box::new(|r| r.agent.push('x')),
            Box::new(|r| r.budgets.push('x')),
            Box::new(|r| r.endpoint.push('x')),
            Box::new(|r| r.model.push('x')),
            Box::new(|r| r.started_at_ms += 1),
            Box::new(|r| r.finished_at_ms = None),
            Box::new(|r| r.input_tokens += 1),
            Box::new(|r| r.cached_input_tokens += 1),
            Box::new(|r| r.cache_write_input_tokens += 1),
            Box::new(|r| r.output_tokens += 1),
            Box::new(|r| r.reasoning_tokens += 1),
            Box::new(|r| r.cost_micros += 1),
            Box::new(|r| r.estimated = true),
            Box::new(|r| r.outcome = None),
            Box::new(|r| r.http_status = Some(500)),
            Box::new(|r| r.holder.push('x')),
            Box::new(|r| r.seq += 1),
            Box::new(|r| r.cache_write_1h_input_tokens += 1),
            Box::new(|r| r.web_search_requests += 1),
            Box::new(|r| r.web_fetch_requests += 1),
            Box::new(|r| r.unmetered.push('x')),
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut b = a.clone();
            edit(&mut b);
            assert_ne!(b.link_hash(&genesis("h")), base, "edit {i} not covered");
        }
        // Records without the version 2 fields keep the version 1 form, so hashes made before
        // those fields existed still verify; setting one moves the record to version 2.
        assert!(a.canonical().starts_with(b"soma-usage-v1"));
        let mut v2 = a.clone();
        v2.web_search_requests = 1;
        assert!(v2.canonical().starts_with(b"soma-usage-v2"));
        // Field boundaries matter: moving a character between fields changes the hash.
        let mut c = a.clone();
        c.agent = "bo".into();
        c.budgets = "ta/team@u1".into();
        assert_ne!(c.link_hash(&genesis("h")), base);
        let mut b = rec("2", 20);
        b.chain("h", 2, &a.hash);
        let mut b_first = rec("2", 20);
        b_first.chain("h", 2, &genesis("h"));
        assert_ne!(b.hash, b_first.hash);
        assert_ne!(genesis("h"), genesis("h2"));
    }
}
