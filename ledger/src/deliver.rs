//! Inserting a batch of records: one statement that inserts the per-request rows with
//! `ON CONFLICT (id) DO NOTHING` and adds exactly the rows it inserted to the per-minute
//! rollups (`usage_minute` by Agent and model, `budget_spend_minute` by Budget). A batch
//! delivered twice (a sidecar that crashed between the insert and marking its outbox) is
//! inserted once and counted once. It ends with `NOTIFY soma_usage` carrying the Budgets that
//! were charged, which the operator's Budget controller listens to for its status.

use sqlx::{PgPool, Postgres, QueryBuilder};

use crate::record::UsageRecord;
use crate::rfc3339;

/// The channel the insert notifies, with a comma-separated list of the Budget labels charged.
pub const USAGE_CHANNEL: &str = "soma_usage";

/// Inserts `rows` (already chained) and their rollups; returns how many were new.
pub async fn insert(pool: &PgPool, rows: &[UsageRecord]) -> Result<u64, sqlx::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let mut q = QueryBuilder::<Postgres>::new(
        "WITH ins AS (INSERT INTO usage_records (id, namespace, agent, budgets, endpoint, model,
            started_at, finished_at, input_tokens, cached_input_tokens, cache_write_input_tokens,
            output_tokens, reasoning_tokens, cost_micros, estimated, outcome, http_status,
            holder, seq, prev_hash, hash, cache_write_1h_input_tokens, web_search_requests,
            web_fetch_requests, unmetered) ",
    );
    q.push_values(rows, |mut b, r| {
        b.push_bind(&r.id)
            .push_bind(&r.namespace)
            .push_bind(&r.agent)
            .push_bind(&r.budgets)
            .push_bind(&r.endpoint)
            .push_bind(&r.model)
            .push_bind(rfc3339(r.started_at_ms))
            .push_unseparated("::timestamptz")
            .push_bind(r.finished_at_ms.map(rfc3339))
            .push_unseparated("::timestamptz")
            .push_bind(r.input_tokens)
            .push_bind(r.cached_input_tokens)
            .push_bind(r.cache_write_input_tokens)
            .push_bind(r.output_tokens)
            .push_bind(r.reasoning_tokens)
            .push_bind(r.cost_micros)
            .push_bind(r.estimated)
            .push_bind(&r.outcome)
            .push_bind(r.http_status.and_then(|s| i32::try_from(s).ok()))
            .push_bind((!r.holder.is_empty()).then_some(&r.holder))
            .push_bind((r.seq > 0).then_some(r.seq))
            .push_bind((!r.prev_hash.is_empty()).then_some(&r.prev_hash))
            .push_bind((!r.hash.is_empty()).then_some(&r.hash))
            .push_bind(r.cache_write_1h_input_tokens)
            .push_bind(r.web_search_requests)
            .push_bind(r.web_fetch_requests)
            .push_bind(&r.unmetered);
    });
    q.push(
        " ON CONFLICT (id) DO NOTHING RETURNING namespace, agent, model, budgets, started_at,
            input_tokens, cached_input_tokens, cache_write_input_tokens, output_tokens,
            reasoning_tokens, cost_micros),
        by_agent AS (
            INSERT INTO usage_minute AS m (namespace, agent, model, minute, requests,
                input_tokens, cached_input_tokens, cache_write_input_tokens, output_tokens,
                reasoning_tokens, cost_micros)
            SELECT namespace, agent, model, date_trunc('minute', started_at), COUNT(*),
                SUM(input_tokens), SUM(cached_input_tokens), SUM(cache_write_input_tokens),
                SUM(output_tokens), SUM(reasoning_tokens), SUM(cost_micros)
            FROM ins GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
            ON CONFLICT (namespace, agent, model, minute) DO UPDATE SET
                requests = m.requests + EXCLUDED.requests,
                input_tokens = m.input_tokens + EXCLUDED.input_tokens,
                cached_input_tokens = m.cached_input_tokens + EXCLUDED.cached_input_tokens,
                cache_write_input_tokens = m.cache_write_input_tokens + EXCLUDED.cache_write_input_tokens,
                output_tokens = m.output_tokens + EXCLUDED.output_tokens,
                reasoning_tokens = m.reasoning_tokens + EXCLUDED.reasoning_tokens,
                cost_micros = m.cost_micros + EXCLUDED.cost_micros
            RETURNING 1),
        by_budget AS (
            INSERT INTO budget_spend_minute AS s (budget, budget_uid, minute, requests, tokens,
                cost_micros)
            SELECT split_part(b, '@', 1), split_part(b, '@', 2), date_trunc('minute', started_at),
                COUNT(*), SUM(input_tokens + output_tokens), SUM(cost_micros)
            FROM ins, unnest(string_to_array(ins.budgets, ',')) AS b
            WHERE b <> ''
            GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
            ON CONFLICT (budget, budget_uid, minute) DO UPDATE SET
                requests = s.requests + EXCLUDED.requests,
                tokens = s.tokens + EXCLUDED.tokens,
                cost_micros = s.cost_micros + EXCLUDED.cost_micros
            RETURNING 1),
        charged AS (
            SELECT string_agg(DISTINCT b, ',') AS budgets
            FROM ins, unnest(string_to_array(ins.budgets, ',')) AS b WHERE b <> ''),
        -- A payload is at most 8000 bytes: a longer list is cut, and a listener that cannot
        -- read a label in it refreshes everything.
        notified AS (
            SELECT pg_notify('",
    );
    q.push(USAGE_CHANNEL);
    q.push(
        "', left(COALESCE((SELECT budgets FROM charged), ''), 7900)))
        SELECT (SELECT COUNT(*) FROM ins) AS inserted,
               (SELECT COUNT(*) FROM by_agent) + (SELECT COUNT(*) FROM by_budget)
               + (SELECT COUNT(*) FROM notified) AS side_effects",
    );
    let row: (i64, i64) = q.build_query_as().fetch_one(pool).await?;
    Ok(u64::try_from(row.0).unwrap_or(0))
}
