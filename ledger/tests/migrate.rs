//! The migration that makes Budget identity `namespace/name`, on a real PostgreSQL started by
//! the harness: a ledger written by the first release (bare Budget names, two namespaces that
//! both had a Budget `team` sharing one window) is migrated, and every row lands under its
//! namespace. A missing PostgreSQL fails the test (`scripts/test-deps/servers.sh`).
#![allow(clippy::unwrap_used)]

use soma_testsupport::Pg;
use sqlx::PgPool;

/// A migrator of the first release's migrations (0001 to 0003), read from a copy of them.
async fn first_release(dir: &std::path::Path) -> sqlx::migrate::Migrator {
    let src = std::path::Path::new(
        &std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()),
    )
    .join("migrations");
    for name in [
        "0001_usage_records.sql",
        "0002_budget_leases.sql",
        "0003_usage_minute.sql",
    ] {
        std::fs::copy(src.join(name), dir.join(name)).unwrap();
    }
    sqlx::migrate::Migrator::new(dir).await.unwrap()
}

async fn rows<T>(pool: &PgPool, sql: &'static str) -> Vec<T>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    sqlx::query_as(sql).fetch_all(pool).await.unwrap()
}

#[tokio::test]
async fn bare_budget_names_move_to_namespace_name() {
    let pg = Pg::start();
    let pool = pg.pool().await;
    let dir = tempfile::tempdir().unwrap();
    first_release(dir.path()).await.run(&pool).await.unwrap();
    // What the first release wrote: tenant-a and tenant-b both charged a Budget called `team`,
    // and their sidecars shared one window of it; tenant-b's chain also had `tenant`.
    let window = 1_765_000_000_000i64; // a day window, in ms
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO usage_records (id, namespace, agent, budgets, endpoint, model, started_at,
            finished_at, input_tokens, cached_input_tokens, cache_write_input_tokens, output_tokens,
            reasoning_tokens, cost_micros, estimated, outcome, http_status) VALUES
          ('r1', 'tenant-a', 'bot', 'team', 'chat_completions', 'm', to_timestamp({w} / 1000.0 + 60), NULL, 10, 0, 0, 5, 0, 100, false, 'ok', 200),
          ('r2', 'tenant-a', 'bot', 'team', 'chat_completions', 'm', to_timestamp({w} / 1000.0 + 120), NULL, 10, 0, 0, 5, 0, 50, false, 'ok', 200),
          ('r3', 'tenant-b', 'bot', 'team,tenant', 'chat_completions', 'm', to_timestamp({w} / 1000.0 + 60), NULL, 20, 0, 0, 10, 0, 150, false, 'ok', 200),
          ('r4', 'tenant-b', 'bot', '', 'chat_completions', 'm', to_timestamp({w} / 1000.0 + 60), NULL, 1, 0, 0, 1, 0, 1, false, 'ok', 200);
         INSERT INTO budget_windows (budget, window_start_ms, window_end_ms, cap_tokens, cap_micros, granted_tokens, granted_micros) VALUES
          ('team', {w}, {w} + 86400000, NULL, 1000, 0, 300),
          ('tenant', {w}, {w} + 86400000, NULL, 5000, 0, 150),
          ('ghost', {w}, {w} + 86400000, NULL, 10, 0, 5);
         INSERT INTO budget_leases (budget, window_start_ms, holder, granted_tokens, granted_micros, used_tokens, used_micros, expires_at) VALUES
          ('team', {w}, 'h-a', 0, 200, 0, 150, now()),
          ('team', {w}, 'h-b', 0, 100, 0, 150, now()),
          ('tenant', {w}, 'h-b', 0, 150, 0, 150, now()),
          ('ghost', {w}, 'h-x', 0, 5, 0, 5, now());",
        w = window
    )))
    .execute(&pool)
    .await
    .unwrap();

    soma_ledger::MIGRATOR.run(&pool).await.unwrap();

    let records: Vec<(String, String)> =
        rows(&pool, "SELECT id, budgets FROM usage_records ORDER BY id").await;
    assert_eq!(
        records,
        vec![
            ("r1".into(), "tenant-a/team".into()),
            ("r2".into(), "tenant-a/team".into()),
            ("r3".into(), "tenant-b/team,tenant-b/tenant".into()),
            ("r4".into(), String::new()),
        ]
    );
    // The shared window is copied to each tenant with the combined spend (never less than
    // either spent); the window no record names is dropped.
    let windows: Vec<(String, String, i64)> = rows(
        &pool,
        "SELECT budget, budget_uid, granted_micros FROM budget_windows ORDER BY budget",
    )
    .await;
    assert_eq!(
        windows,
        vec![
            ("tenant-a/team".into(), String::new(), 300),
            ("tenant-b/team".into(), String::new(), 300),
            ("tenant-b/tenant".into(), String::new(), 150),
        ]
    );
    let leases: Vec<(String, String)> = rows(
        &pool,
        "SELECT budget, holder FROM budget_leases ORDER BY budget, holder",
    )
    .await;
    assert_eq!(
        leases,
        vec![
            ("tenant-a/team".into(), "h-a".into()),
            ("tenant-a/team".into(), "h-b".into()),
            ("tenant-b/team".into(), "h-a".into()),
            ("tenant-b/team".into(), "h-b".into()),
            ("tenant-b/tenant".into(), "h-b".into()),
        ]
    );
    // Per-Budget spend is rolled up from the records already there.
    let spend: Vec<(String, i64, i64)> = rows(
        &pool,
        "SELECT budget, SUM(requests)::BIGINT, SUM(cost_micros)::BIGINT FROM budget_spend_minute
          GROUP BY budget ORDER BY budget",
    )
    .await;
    assert_eq!(
        spend,
        vec![
            ("tenant-a/team".into(), 2, 150),
            ("tenant-b/team".into(), 1, 150),
            ("tenant-b/tenant".into(), 1, 150),
        ]
    );
    // Running the migrations again changes nothing.
    soma_ledger::MIGRATOR.run(&pool).await.unwrap();
    let again: Vec<(String, String, i64)> = rows(
        &pool,
        "SELECT budget, budget_uid, granted_micros FROM budget_windows ORDER BY budget",
    )
    .await;
    assert_eq!(again, windows);
}
