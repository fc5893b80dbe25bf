//! Usage events on NATS JetStream: each settled outbox row is published to
//! `soma.usage.<namespace>.<agent>` with `Nats-Msg-Id` set to its idempotency key, and marked
//! published only after JetStream acknowledges it. A publish retried after a crash or an
//! outage is dropped by JetStream's duplicate detection within the stream's duplicate window
//! (2 minutes unless the stream says otherwise); the JSON payload carries the `id` too, so a
//! consumer can deduplicate beyond that window. Nothing here is on the request path.

use std::time::Duration;

use async_nats::jetstream;

use crate::outbox::{Outbox, Sink};

/// The stream the sidecar creates when it does not exist.
pub const STREAM: &str = "SOMA_USAGE";

/// Why a publish round failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The outbox could not be read or marked.
    #[error("outbox read or mark failed")]
    Outbox(#[source] sqlx::Error),
    /// The stream could not be found or created.
    #[error("JetStream stream {STREAM} unavailable: {0}")]
    Stream(String),
    /// A publish was not acknowledged.
    #[error("JetStream publish failed: {0}")]
    Publish(String),
}

/// The subject for an Agent: dots and wildcards in names would change the subject's shape,
/// so they become `_`.
pub fn subject(namespace: &str, agent: &str) -> String {
    let clean = |s: &str| s.replace(['.', '*', '>', ' '], "_");
    format!("soma.usage.{}.{}", clean(namespace), clean(agent))
}

/// One round: up to `batch` rows published and acknowledged. Returns how many.
pub async fn publish_once(
    outbox: &Outbox,
    js: &jetstream::Context,
    stream_ready: &mut bool,
    batch: u32,
) -> Result<usize, PublishError> {
    if !*stream_ready {
        js.get_or_create_stream(jetstream::stream::Config {
            name: STREAM.to_owned(),
            subjects: vec!["soma.usage.>".to_owned()],
            ..Default::default()
        })
        .await
        .map_err(|e| PublishError::Stream(e.to_string()))?;
        *stream_ready = true;
    }
    // Events carry the audit chain too, so a consumer (the DR drill) can check them.
    let holder = outbox.holder_id().await.map_err(PublishError::Outbox)?;
    outbox
        .chain_pending(&holder, batch)
        .await
        .map_err(PublishError::Outbox)?;
    let rows = outbox
        .undelivered(Sink::Events, batch)
        .await
        .map_err(PublishError::Outbox)?;
    if rows.is_empty() {
        return Ok(0);
    }
    // Send the whole batch, then wait for the acks: one round trip per batch, not per row.
    let mut acks = Vec::with_capacity(rows.len());
    for r in &rows {
        let payload = serde_json::to_vec(r).map_err(|e| PublishError::Publish(e.to_string()))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", r.id.as_str());
        let ack = js
            .publish_with_headers(subject(&r.namespace, &r.agent), headers, payload.into())
            .await
            .map_err(|e| PublishError::Publish(e.to_string()))?;
        acks.push((r.id.clone(), ack));
    }
    let mut done = Vec::with_capacity(acks.len());
    let mut failed = None;
    for (id, ack) in acks {
        match ack.await {
            Ok(_) => done.push(id),
            Err(e) => failed = Some(e.to_string()),
        }
    }
    outbox
        .mark_delivered(Sink::Events, &done, jiff::Timestamp::now())
        .await
        .map_err(PublishError::Outbox)?;
    match failed {
        Some(e) => Err(PublishError::Publish(e)),
        None => Ok(done.len()),
    }
}

/// Publishes until `stop` turns true, paced like ledger delivery ([`crate::ledger::Pacer`]);
/// then publishes what is left for at most `flush` ([`crate::ledger::Drain`]).
pub async fn run(
    outbox: Outbox,
    url: String,
    interval: Duration,
    batch: u32,
    meter: crate::metrics::DeliveryMeter,
    flush: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let client = loop {
        // Connect in the background: the sidecar serves while NATS is down.
        let connect = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(url.as_str());
        match connect.await {
            Ok(c) => break c,
            Err(e) => {
                meter.failed();
                tracing::warn!(error = %e, "NATS unreachable; usage events stay in the outbox");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
    };
    let js = jetstream::new(client.clone());
    let mut ready = false;
    let mut pacer = crate::ledger::Pacer::new(interval, batch);
    loop {
        let result = publish_once(&outbox, &js, &mut ready, batch).await;
        meter.round(&result);
        let wait = pacer.after("usage event publish", result);
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    if let Some(mut drain) = crate::ledger::Drain::start("usage event publish", flush) {
        loop {
            let round = tokio::time::timeout_at(
                drain.deadline,
                publish_once(&outbox, &js, &mut ready, batch),
            )
            .await
            .ok();
            if let Some(result) = &round {
                meter.round(result);
            }
            if !drain.go_on(round) {
                break;
            }
        }
    }
    let _ = client.flush().await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn subjects_keep_their_shape() {
        assert_eq!(
            super::subject("research", "assistant"),
            "soma.usage.research.assistant"
        );
        assert_eq!(super::subject("a.b", "c*>"), "soma.usage.a_b.c__");
    }
}
