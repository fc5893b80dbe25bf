//! A stopping sidecar delivers its outbox before it exits: a Job's pod is removed once its
//! agent has finished, and the outbox (an emptyDir) with it, so what the sidecar did not
//! deliver by then would be lost. Real PostgreSQL and nats-server, started by the harness.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on a failed set-up too

mod support;

use std::time::Duration;

use serde_json::json;
use soma_proxy::outbox::Sink;
use support::nats::Nats;
use support::pg::Pg;
use support::*;

async fn ledger_rows(pg: &Pg) -> i64 {
    let pool = pg.pool().await;
    let n: Result<i64, _> = sqlx::query_scalar("SELECT COUNT(*) FROM usage_records")
        .fetch_one(&pool)
        .await;
    pool.close().await;
    n.unwrap_or(0)
}

/// A sidecar whose delivery rounds are an hour apart, past its first (empty) rounds, with
/// `n` calls settled in its outbox and delivered nowhere yet.
async fn with_undelivered(pg: &Pg, nats: &Nats, n: usize, flush_ms: u64) -> Harness {
    let h = Harness::start(
        "openai",
        json!({"databaseUrl": pg.url(), "natsUrl": nats.url(),
               "deliveryIntervalMs": 3_600_000, "flushOnStopMs": flush_ms}),
    )
    .await;
    // The first rounds (migrations, the stream) run at start; wait until both have, and a
    // moment more for the rest of those rounds, so the calls below are not part of them.
    for _ in 0..200 {
        if nats.messages().await.is_some() && ledger_table(pg).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..n {
        let body = json!({"model": "gpt-4o", "max_tokens": 3,
            "messages": [{"role": "user", "content": format!("task step {i}")}]});
        assert_eq!(h.post("/v1/chat/completions", &body).await.status, 200);
    }
    h.settled_rows().await;
    let outbox = &h.proxy.state.outbox;
    assert_eq!(
        outbox.pending_delivery(Sink::Ledger).await.unwrap(),
        n as u64
    );
    assert_eq!(
        outbox.pending_delivery(Sink::Events).await.unwrap(),
        n as u64
    );
    h
}

async fn ledger_table(pg: &Pg) -> bool {
    let pool = pg.pool().await;
    // The last migration's table: the migrations are done.
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass('ledger_seals')::text")
        .fetch_one(&pool)
        .await
        .unwrap_or(None);
    pool.close().await;
    exists.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_sidecar_delivers_its_outbox_to_the_ledger_and_the_stream_first() {
    let pg = Pg::start();
    let nats = Nats::start();

    // Without a flush (flushOnStopMs: 0) the rows stay behind: what follows is the drain's doing.
    let h = with_undelivered(&pg, &nats, 3, 0).await;
    h.proxy.stop().await;
    assert_eq!(ledger_rows(&pg).await, 0);
    assert_eq!(nats.messages().await, Some(0));

    // With the default flush, every settled call is in the ledger and the stream when stop
    // returns (the pod may be gone a moment later).
    let h = with_undelivered(&pg, &nats, 5, 10_000).await;
    let started = std::time::Instant::now();
    h.proxy.stop().await;
    assert_eq!(ledger_rows(&pg).await, 5);
    assert_eq!(nats.messages().await, Some(5));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_sidecar_with_its_database_down_exits_without_waiting_out_the_flush() {
    let mut pg = Pg::start();
    let nats = Nats::start();
    let h = with_undelivered(&pg, &nats, 2, 20_000).await;
    pg.stop();
    let started = std::time::Instant::now();
    h.proxy.stop().await;
    // One failed round, no retries: the stream got the records, the ledger could not.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(nats.messages().await, Some(2));
}
