//! Delivery from the outbox to a real PostgreSQL 15, started by this harness on a free
//! 127.0.0.1 port in a temporary folder and stopped by PID. Skips, saying so, when PostgreSQL
//! is not installed (`scripts/test-deps/servers.sh` installs it).
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on a failed set-up too

mod support;

use std::time::Duration;

use serde_json::json;
use sqlx::Row;
use support::pg::Pg;
use support::*;

/// Waits until the ledger holds `rows` rows, and returns (rows, tokens, micros).
async fn ledger_totals(pool: &sqlx::PgPool, rows: i64) -> (i64, i64, i64) {
    let mut last = (0, 0, 0);
    for _ in 0..600 {
        let r = sqlx::query(
            "SELECT COUNT(*) AS n, COALESCE(SUM(input_tokens + output_tokens), 0)::BIGINT AS t,
                COALESCE(SUM(cost_micros), 0)::BIGINT AS c FROM usage_records",
        )
        .fetch_one(pool)
        .await;
        if let Ok(r) = r {
            last = (r.get("n"), r.get("t"), r.get("c"));
            if last.0 == rows {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("ledger never reached {rows} rows: {last:?}");
}

async fn traffic(h: &Harness, n: usize) {
    for i in 0..n {
        let body = json!({"model": "gpt-4o", "max_tokens": 1 + i % 7, "stream": i % 2 == 0,
            "messages": [{"role": "user", "content": format!("request {i}")}]});
        assert_eq!(h.post("/v1/chat/completions", &body).await.status, 200);
    }
}

/// The value of the series `series` (name and labels as exposed) on the sidecar's `/metrics`.
async fn metric(h: &Harness, series: &str) -> f64 {
    let url = format!("http://{}/metrics", h.proxy.admin_addr);
    let text = send(&h.client, "GET", &url, &[], String::new())
        .await
        .text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test]
async fn usage_reaches_the_ledger_once_through_an_outage_and_a_redelivery() {
    let mut pg = Pg::start();
    let h = Harness::start(
        "openai",
        json!({"databaseUrl": pg.url(), "deliveryIntervalMs": 50}),
    )
    .await;
    let pool = pg.pool().await;
    traffic(&h, 20).await;
    let outbox = h.proxy.state.outbox.totals().await.unwrap();
    let (rows, tokens, micros) = ledger_totals(&pool, 20).await;
    assert_eq!(
        (rows as u64, tokens as u64, micros as u64),
        (outbox.rows, outbox.tokens, outbox.micros)
    );

    // Outage: requests keep being served and recorded; nothing is lost or doubled after.
    pool.close().await;
    pg.stop();
    traffic(&h, 15).await;
    assert!(
        h.proxy
            .state
            .outbox
            .pending_delivery(soma_proxy::outbox::Sink::Ledger)
            .await
            .unwrap()
            >= 15
    );
    // The outage shows on /metrics: a backlog with an age, and failed rounds.
    assert!(metric(&h, "soma_proxy_outbox_pending_records{sink=\"ledger\"}").await >= 15.0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        metric(
            &h,
            "soma_proxy_outbox_oldest_pending_age_seconds{sink=\"ledger\"}"
        )
        .await
            >= 1.0
    );
    // A round fails once the pool gives up waiting for a connection (5 s).
    let failed = "soma_proxy_deliveries_total{sink=\"ledger\",outcome=\"failed\"}";
    for _ in 0..150 {
        if metric(&h, failed).await >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metric(&h, failed).await >= 1.0);
    pg.run();
    let pool = pg.pool().await;
    let outbox = h.proxy.state.outbox.totals().await.unwrap();
    let (rows, tokens, micros) = ledger_totals(&pool, 35).await;
    assert_eq!(
        (rows as u64, tokens as u64, micros as u64),
        (outbox.rows, outbox.tokens, outbox.micros)
    );

    // A sidecar that died after inserting but before marking delivers everything again:
    // the idempotency key keeps one copy.
    h.proxy
        .state
        .outbox
        .forget_deliveries(soma_proxy::outbox::Sink::Ledger)
        .await
        .unwrap();
    for _ in 0..600 {
        if h.proxy
            .state
            .outbox
            .pending_delivery(soma_proxy::outbox::Sink::Ledger)
            .await
            .unwrap()
            == 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        h.proxy
            .state
            .outbox
            .pending_delivery(soma_proxy::outbox::Sink::Ledger)
            .await
            .unwrap(),
        0
    );
    assert_eq!(ledger_totals(&pool, 35).await.0, 35);
    // Each record was delivered twice (the second time a duplicate the ledger ignored).
    assert_eq!(
        metric(&h, "soma_proxy_delivered_records_total{sink=\"ledger\"}").await,
        70.0
    );
    assert_eq!(
        metric(&h, "soma_proxy_outbox_pending_records{sink=\"ledger\"}").await,
        0.0
    );
    assert_eq!(
        metric(
            &h,
            "soma_proxy_outbox_oldest_pending_age_seconds{sink=\"ledger\"}"
        )
        .await,
        0.0
    );
    // The per-minute rollup was kept in step, redelivery included.
    let (rows, _, cost, tokens) = support::fleet::ledger(&pool).await;
    assert_eq!(support::fleet::rollup(&pool).await, (rows, cost, tokens));
}

#[tokio::test]
async fn delivered_rows_older_than_the_longest_window_are_pruned() {
    use soma_proxy::outbox::Sinks;
    let pg = Pg::start();
    // A daily Budget: today's rows are still replayed at start-up, so they stay.
    let h = Harness::start(
        "openai",
        json!({"databaseUrl": pg.url(), "deliveryIntervalMs": 50, "pruneIntervalMs": 50,
            "budget": "team",
            "budgets": [{"name": "team", "limits": {"costMicros": 1_000_000_000}, "period": {"calendar": "day"}}]}),
    )
    .await;
    let pool = pg.pool().await;
    traffic(&h, 10).await;
    ledger_totals(&pool, 10).await;
    let outbox = &h.proxy.state.outbox;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(outbox.totals().await.unwrap().rows, 10);
    }
    // Past the window: only what every configured sink has is deleted.
    let later = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(48);
    let both = Sinks {
        ledger: true,
        events: true,
    };
    assert_eq!(
        outbox.prune(later, both).await.unwrap(),
        0,
        "nothing was published"
    );
    let none = Sinks {
        ledger: false,
        events: false,
    };
    assert_eq!(
        outbox.prune(later, none).await.unwrap(),
        0,
        "the outbox is the only record"
    );
    let ledger_only = Sinks {
        ledger: true,
        events: false,
    };
    assert_eq!(outbox.prune(later, ledger_only).await.unwrap(), 10);
    assert_eq!(outbox.totals().await.unwrap().rows, 0);
    assert_eq!(ledger_totals(&pool, 10).await.0, 10);

    // Without a Budget nothing is replayed: the background task deletes rows once delivered.
    let h = Harness::start(
        "openai",
        json!({"databaseUrl": pg.url(), "deliveryIntervalMs": 50, "pruneIntervalMs": 50}),
    )
    .await;
    traffic(&h, 5).await;
    let mut left = u64::MAX;
    for _ in 0..600 {
        left = h.proxy.state.outbox.totals().await.unwrap().rows;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, 0, "delivered rows were never pruned");
    assert_eq!(ledger_totals(&pool, 15).await.0, 15);
}
