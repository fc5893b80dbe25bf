//! Usage events on a real nats-server with JetStream, started by this harness on a free
//! 127.0.0.1 port with its store in a temporary folder and stopped by PID. Skips, saying so,
//! when nats-server is not installed (`scripts/test-deps/servers.sh` installs it).
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on a failed set-up too

mod support;

use std::time::Duration;

use serde_json::json;
use soma_proxy::outbox::Sink;
use support::nats::Nats;
use support::*;

async fn traffic(h: &Harness, n: usize) {
    for i in 0..n {
        let body = json!({"model": "gpt-4o", "max_tokens": 1 + i % 5, "stream": i % 2 == 1,
            "messages": [{"role": "user", "content": format!("event {i}")}]});
        assert_eq!(h.post("/v1/chat/completions", &body).await.status, 200);
    }
}

async fn drained(h: &Harness) {
    for _ in 0..600 {
        if h.proxy
            .state
            .outbox
            .pending_delivery(Sink::Events)
            .await
            .unwrap()
            == 0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("events never drained");
}

#[tokio::test]
async fn usage_events_are_published_once_through_an_outage_and_a_republish() {
    let mut nats = Nats::start();
    let h = Harness::start(
        "openai",
        json!({"natsUrl": nats.url(), "deliveryIntervalMs": 50}),
    )
    .await;
    traffic(&h, 12).await;
    nats.wait_for(12).await;
    drained(&h).await;

    // Outage: served and recorded meanwhile, published after.
    nats.stop();
    traffic(&h, 8).await;
    assert!(
        h.proxy
            .state
            .outbox
            .pending_delivery(Sink::Events)
            .await
            .unwrap()
            >= 8
    );
    nats.run();
    nats.wait_for(20).await;
    drained(&h).await;

    // Everything published again (a crash between the ack and the mark): JetStream's
    // duplicate detection on Nats-Msg-Id keeps one copy.
    h.proxy
        .state
        .outbox
        .forget_deliveries(Sink::Events)
        .await
        .unwrap();
    drained(&h).await;
    assert_eq!(nats.messages().await, Some(20));
    assert_eq!(h.proxy.state.outbox.totals().await.unwrap().rows, 20);

    // One message, checked field by field against its outbox row.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(soma_proxy::events::STREAM).await.unwrap();
    let msg = stream.get_raw_message(1).await.unwrap();
    assert_eq!(msg.subject.as_str(), "soma.usage.research.assistant");
    let event: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    let rows = h.rows().await;
    let row = rows.iter().find(|r| r["id"] == event["id"]).unwrap();
    assert_eq!(event["cost_micros"], row["cost_micros"]);
    assert_eq!(event["output_tokens"], row["output_tokens"]);
}
