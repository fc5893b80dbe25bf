//! Several sidecars sharing one Budget through the postgres authority, and clients that add up
//! the usage they see in responses.
#![allow(dead_code, clippy::unwrap_used)] // test support: a failed set-up should panic

use serde_json::{Value, json};

use super::{Reply, cost};

/// The shared Budget chain: `team` (a cost cap, monthly) under `tenant` (a token cap, daily).
pub fn budgets(cap_micros: u64, tenant_tokens: u64) -> Value {
    json!([
        {"name": "team", "limits": {"costMicros": cap_micros}, "period": {"calendar": "month"},
         "parentRef": {"name": "tenant"}},
        {"name": "tenant", "limits": {"tokens": tenant_tokens}, "period": {"calendar": "day"}},
    ])
}

/// The extra config fields of a replica in the fleet.
pub fn replica_config(pg_url: &str, nats_url: &str, budgets: &Value, ttl_ms: u64) -> Value {
    json!({
        "databaseUrl": pg_url,
        "natsUrl": nats_url,
        "deliveryIntervalMs": 50,
        "authority": {"postgres": {"leaseTtlMs": ttl_ms}},
        "budget": "team",
        "budgets": budgets,
    })
}

/// A deterministic generator (xorshift64*), so a failing run can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// A chat request of random size; streams ask for usage so the client can add it up.
pub fn request(rng: &mut Rng, stream: bool) -> Value {
    let words = 1 + rng.below(300);
    let text: String = (0..words).map(|i| format!("w{} ", i % 97)).collect();
    let mut body = json!({"model": "gpt-4o", "max_tokens": 1 + rng.below(200),
        "messages": [{"role": "user", "content": text}]});
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// The cost the client can compute from the usage in a 200 response (JSON or SSE).
pub fn observed_cost(r: &Reply) -> u64 {
    let usage = if r.text().starts_with("data:") {
        r.text()
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| v.get("usage").filter(|u| !u.is_null()).cloned())
            .next_back()
            .unwrap_or_else(|| panic!("no usage in stream: {}", r.text()))
    } else {
        r.json()["usage"].clone()
    };
    let n = |p: &str| usage.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    cost(
        "gpt-4o",
        n("/prompt_tokens"),
        n("/prompt_tokens_details/cached_tokens"),
        n("/completion_tokens"),
    )
}

/// The ledger's per-request rows: (count, distinct ids, cost, tokens).
pub async fn ledger(pool: &sqlx::PgPool) -> (i64, i64, i64, i64) {
    sqlx::query_as(
        "SELECT COUNT(*), COUNT(DISTINCT id), COALESCE(SUM(cost_micros), 0)::BIGINT,
            COALESCE(SUM(input_tokens + output_tokens), 0)::BIGINT FROM usage_records",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The per-minute rollup's totals: (requests, cost, tokens).
pub async fn rollup(pool: &sqlx::PgPool) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT COALESCE(SUM(requests), 0)::BIGINT, COALESCE(SUM(cost_micros), 0)::BIGINT,
            COALESCE(SUM(input_tokens + output_tokens), 0)::BIGINT FROM usage_minute",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Every Budget window's cap and granted total: (budget, cap_tokens, cap_micros, granted_tokens, granted_micros).
pub async fn windows(pool: &sqlx::PgPool) -> Vec<(String, Option<i64>, Option<i64>, i64, i64)> {
    sqlx::query_as(
        "SELECT budget, cap_tokens, cap_micros, granted_tokens, granted_micros FROM budget_windows
         ORDER BY budget",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}
