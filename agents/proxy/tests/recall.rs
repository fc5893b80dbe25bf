//! Recall over the pod's Capsules through a running sidecar: a bundle packed with the
//! deterministic `soma-hash-256` embeddings and delivered into a folder as the init container
//! does, the query embedded by the fake upstream through the sidecar's metered call.
//!
//! - top-k with score and provenance on every result; the query's embedding call reserved,
//!   charged and recorded in the outbox like any call; a precomputed vector costs nothing;
//! - bad input (k out of range, a query too large, both or neither of query and vector, an
//!   unknown Capsule, a vector of another dimension, no token) gets a clear error in OpenAI's
//!   format and records nothing; a Capsule whose folder no longer matches its digest, or
//!   embedded by another model than the configured one, is not served and says why;
//! - a Capsule above `recall.approximateAboveRows` chunks (the HNSW graph) answers as the scan;
//! - revocation mid-run stops recall with 410 and the reason: through the configuration file
//!   (a ConfigMap volume) and through the ledger's notification (a real PostgreSQL).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use soma_proxy::fake_upstream::FakeUpstream;
use support::capsules::{DIMS, MODEL, deliver, recall_refunds, tamper};
use support::pg::Pg;
use support::*;

struct Pod {
    h: Harness,
    digest: String,
    _capsules: tempfile::TempDir,
}

/// A sidecar holding Capsule `kb` (and whatever `extra` adds), prices including the
/// embedding model so the query's cost is metered.
async fn pod(extra: impl FnOnce(&Path, &str) -> Value) -> Pod {
    let capsules = tempfile::tempdir().unwrap();
    let digest = deliver(capsules.path(), "kb", MODEL, DIMS);
    let mut more = extra(capsules.path(), &digest);
    let capsules_dir = capsules.path().to_owned();
    let m = more.as_object_mut().unwrap();
    m.entry("capsules")
        .or_insert(json!([{"name": "kb", "digest": digest}]));
    m.entry("recall")
        .or_insert(json!({"capsulesDir": capsules_dir}));
    Pod {
        h: Harness::start_with_prices(
            "openai",
            more,
            json!({MODEL: {"inputPerMTok": 20_000, "outputPerMTok": 0}}),
        )
        .await,
        digest,
        _capsules: capsules,
    }
}

#[tokio::test]
async fn recall_answers_top_k_with_provenance_and_meters_the_query_embedding() {
    let Pod { h, digest, .. } = pod(|_, _| json!({})).await;
    let r = h
        .post(
            "/v1/recall",
            &json!({"query": "how long do refunds to my card take", "k": 3}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    assert_eq!(data[0]["chunk"], "billing.md#0", "{body}");
    assert!(data[0]["text"].as_str().unwrap().contains("Refunds"));
    for d in data {
        assert_eq!(d["capsule"], "kb");
        assert_eq!(d["version"], "1.2.0");
        assert_eq!(d["digest"], digest.as_str());
        assert!(d["document"].as_str().unwrap().ends_with(".md"));
        assert!(
            d["chunk"]
                .as_str()
                .unwrap()
                .starts_with(d["document"].as_str().unwrap())
        );
    }
    let scores: Vec<f64> = data.iter().map(|d| d["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    // The embedding went upstream with the provider key, once, and is on the record.
    let sent: Vec<_> = h
        .upstream
        .received()
        .into_iter()
        .filter(|r| r.path == "/v1/embeddings")
        .collect();
    assert_eq!(sent.len(), 1);
    let sent_body: Value = serde_json::from_slice(&sent[0].body).unwrap();
    assert_eq!(sent_body["model"], MODEL);
    let rows = h.settled_rows().await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["endpoint"], "embeddings");
    assert_eq!(rows[0]["model"], MODEL);
    assert!(
        rows[0]["input_tokens"].as_u64().unwrap() > 0,
        "{:?}",
        rows[0]
    );

    // A precomputed vector: the same best chunk, no provider call, nothing recorded.
    let v = soma_capsule::hashed::embed("how long do refunds to my card take", DIMS);
    let r = h
        .post(
            "/v1/recall",
            &json!({"vector": v, "k": 1, "capsules": ["kb"]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"][0]["chunk"], "billing.md#0");
    assert_eq!(h.rows().await.len(), 1);
    assert!(h.metrics().await.contains("endpoint=\"recall\""));
}

/// A Capsule above `recall.approximateAboveRows` chunks is searched through the HNSW graph:
/// the same scores and best answer as the scan (on a Capsule this small the graph reaches
/// every row), and the defaults the contract carries are the index crate's.
#[tokio::test]
async fn a_capsule_above_the_threshold_is_searched_through_the_graph_alike() {
    assert_eq!(
        soma_proxy::recall::index_params(&soma_contract::recall::RecallSettings::default()),
        soma_capsule::index::IndexParams::default()
    );
    let graph = pod(|dir, _| {
        json!({"recall": {"capsulesDir": dir, "approximateAboveRows": 0, "approximateEf": 4}})
    })
    .await;
    let scan = pod(|_, _| json!({})).await;
    for query in [
        "how long do refunds to my card take",
        "which warehouse do parcels ship from",
        "two-factor codes",
    ] {
        let body = json!({"query": query, "k": 4});
        let (g, s) = (
            graph.h.post("/v1/recall", &body).await,
            scan.h.post("/v1/recall", &body).await,
        );
        assert_eq!(
            (g.status.as_u16(), s.status.as_u16()),
            (200, 200),
            "{} {}",
            g.text(),
            s.text()
        );
        let (g, s) = (g.json()["data"].clone(), s.json()["data"].clone());
        assert_eq!(g.as_array().unwrap().len(), 4);
        // The same scores in the same order, the same best hit with its provenance; among
        // rows of equal score (here the many chunks sharing no word with the query, score 0)
        // the graph may keep others than the scan.
        let scores = |d: &Value| -> Vec<f64> {
            d.as_array()
                .unwrap()
                .iter()
                .map(|h| h["score"].as_f64().unwrap())
                .collect()
        };
        assert_eq!(scores(&g), scores(&s), "{query}");
        assert_eq!(g[0], s[0], "{query}");
        assert!(scores(&g)[0] > scores(&g)[1], "{query}: {g}");
    }
    // A vector of another dimension is refused by the graph as by the scan.
    let r = graph
        .h
        .post("/v1/recall", &json!({"vector": [0.5, 0.5], "k": 1}))
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "dimension_mismatch");
}

#[tokio::test]
async fn bad_recall_input_gets_a_clear_error_and_records_nothing() {
    let Pod { h, .. } = pod(|_, _| json!({})).await;
    let long = "x".repeat(8 * 1024 + 1);
    let cases = [
        (
            json!({"query": "refunds", "k": 0}),
            400,
            "invalid_request",
            "between 1 and 100",
        ),
        (
            json!({"query": "refunds", "k": 101}),
            400,
            "invalid_request",
            "recall.maxK",
        ),
        (
            json!({"query": long}),
            400,
            "query_too_large",
            "maxQueryBytes",
        ),
        (json!({"query": "   "}), 400, "invalid_request", "empty"),
        (json!({"k": 2}), 400, "invalid_request", "exactly one"),
        (
            json!({"query": "a", "vector": [1.0]}),
            400,
            "invalid_request",
            "exactly one",
        ),
        (
            json!({"query": "a", "capsules": ["nope"]}),
            404,
            "capsule_not_found",
            "\"nope\"",
        ),
        (
            json!({"query": "a", "capsules": []}),
            400,
            "invalid_request",
            "at least one",
        ),
        (
            json!({"vector": [1.0, 0.0, 0.5]}),
            400,
            "dimension_mismatch",
            "has 256",
        ),
        (
            json!({"query": "a", "kk": 2}),
            400,
            "invalid_request",
            "unknown field",
        ),
    ];
    for (body, status, code, says) in cases {
        let r = h.post("/v1/recall", &body).await;
        assert_eq!(r.status, status, "{body}: {}", r.text());
        let e = &r.json()["error"];
        assert_eq!(e["code"], code, "{body}: {}", r.text());
        assert!(
            e["message"].as_str().unwrap().contains(says),
            "{body}: {}",
            r.text()
        );
    }
    let r = send(
        &h.client,
        "POST",
        &h.proxy_url("/v1/recall"),
        &[("content-type", "application/json")],
        json!({"query": "refunds"}).to_string(),
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(h.rows().await.is_empty());
    assert!(h.upstream.received().is_empty());
}

#[tokio::test]
async fn a_capsule_that_fails_its_check_or_has_another_model_is_not_served() {
    let Pod { h, .. } = pod(|dir, _| {
        // "changed": delivered, then a chunk rewritten (as a writable folder would allow).
        let changed = deliver(dir, "changed", MODEL, DIMS);
        tamper(&dir.join("changed"));
        let other = deliver(dir, "other", "soma-hash-32", 32);
        json!({"capsules": [
            {"name": "kb", "digest": deliver(dir, "kb2", MODEL, DIMS)},
            {"name": "changed", "digest": changed},
            {"name": "other", "digest": other},
            "configmap-notes"
        ], "recall": {"capsulesDir": dir, "embeddingModel": MODEL}})
    })
    .await;
    for (name, says) in [
        ("changed", "BlobMismatch"),
        ("other", "\"soma-hash-32\""),
        ("configmap-notes", "without a verified digest"),
    ] {
        let r = h
            .post(
                "/v1/recall",
                &json!({"query": "refunds", "capsules": [name]}),
            )
            .await;
        assert_eq!(r.status, 409, "{name}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "capsule_unavailable");
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains(says), "{name}: {message}");
    }
    // Without naming Capsules: the servable one answers, the others are listed with why.
    let r = h.post("/v1/recall", &json!({"query": "refunds"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let skipped: Vec<&str> = body["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["capsule"].as_str().unwrap())
        .collect();
    assert_eq!(skipped, ["changed", "other", "configmap-notes"]);
    assert_eq!(body["data"][0]["chunk"], "billing.md#0");
    assert_eq!(h.rows().await.len(), 1, "only the served query was metered");
}

async fn recall_status(h: &Harness) -> (u16, Value) {
    let r = recall_refunds(h, "kb").await;
    (r.status.as_u16(), r.json())
}

async fn until_status(h: &Harness, want: u16) -> Value {
    for _ in 0..400 {
        let (s, body) = recall_status(h).await;
        if s == want {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("recall never answered {want}");
}

#[tokio::test]
async fn revocation_in_the_configuration_file_stops_recall_in_a_running_sidecar() {
    let upstream = FakeUpstream::start(KEY).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let digest = deliver(dir.path(), "kb", MODEL, DIMS);
    let mut config = config_json(
        &upstream.url(),
        "openai",
        dir.path(),
        json!({"capsules": [{"name": "kb", "digest": digest}],
               "recall": {"capsulesDir": dir.path()},
               "live": {"fileCheckMs": 20, "ledgerPollMs": 0}}),
    );
    let path = dir.path().join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let proxy = soma_proxy::start(
        soma_proxy::Config::parse(&config.to_string()).unwrap(),
        TOKEN.to_owned(),
        Some(path.clone()),
    )
    .await
    .unwrap();
    let h = Harness {
        upstream,
        proxy,
        dir,
        client: http(),
    };
    assert_eq!(recall_status(&h).await.0, 200);
    config["revokedCapsules"] = json!([{"name": "kb", "digest": digest, "reason": "Capsule research/kb is revoked (spec.revoked)"}]);
    std::fs::write(&path, config.to_string()).unwrap();
    let body = until_status(&h, 410).await;
    assert_eq!(body["error"]["code"], "capsule_revoked");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("spec.revoked"),
        "{body}"
    );
    // Without naming it, the revoked Capsule is skipped; nothing else is held, so 410 still.
    let r = h.post("/v1/recall", &json!({"query": "refunds"})).await;
    assert_eq!(r.status, 410, "{}", r.text());
    assert!(
        h.upstream.received().is_empty(),
        "nothing was embedded for a revoked Capsule"
    );
}

#[tokio::test]
async fn revocation_through_the_ledger_reaches_a_running_sidecar_and_can_be_lifted() {
    let pg = Pg::start();
    let pool = pg.pool().await;
    soma_ledger::MIGRATOR.run(&pool).await.unwrap();
    let Pod { h, digest, .. } =
        pod(|_, _| json!({"databaseUrl": pg.url(), "live": {"fileCheckMs": 0, "ledgerPollMs": 0}}))
            .await;
    assert_eq!(recall_status(&h).await.0, 200);
    let row = soma_ledger::live::CapsuleRevocation {
        namespace: "research".into(),
        name: "kb".into(),
        digest: digest.clone(),
        reason: "the signature of Capsule research/kb no longer verifies".into(),
    };
    // Another namespace's revocation of the same name and digest does not reach this pod.
    let elsewhere = soma_ledger::live::CapsuleRevocation {
        namespace: "other".into(),
        ..row.clone()
    };
    assert!(
        soma_ledger::live::revoke_capsule(&pool, &elsewhere)
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(recall_status(&h).await.0, 200);
    assert!(
        soma_ledger::live::revoke_capsule(&pool, &row)
            .await
            .unwrap()
    );
    assert!(
        !soma_ledger::live::revoke_capsule(&pool, &row)
            .await
            .unwrap(),
        "same row: no write"
    );
    let body = until_status(&h, 410).await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no longer verifies"),
        "{body}"
    );
    assert!(
        soma_ledger::live::reinstate_capsule(&pool, "research", "kb", &digest)
            .await
            .unwrap()
    );
    until_status(&h, 200).await;
}

/// A Capsule kept in Qdrant (`collection`): only its manifest is read from the folder, and it
/// is searched through the same interface. No Qdrant server runs here (docs/capsules.md): what
/// is checked is everything up to the server, and that a server which does not answer makes
/// the Capsule unavailable (409 with the reason), never a wrong answer, while a revocation is
/// decided before any request (410) and the other Capsules are served as before.
#[tokio::test]
async fn a_capsule_kept_in_qdrant_is_searched_through_the_same_interface() {
    let collection = |digest: &str| format!("soma_research_sha256_{}", &digest[7..]);
    // No recall.qdrantUrl: not served, and recall says what is missing.
    let Pod { h, .. } = pod(|dir, digest| {
        let big = deliver(dir, "big", MODEL, DIMS);
        json!({"capsules": [
            {"name": "kb", "digest": digest},
            {"name": "big", "digest": big, "collection": collection(&big)}
        ], "recall": {"capsulesDir": dir}})
    })
    .await;
    let r = recall_refunds(&h, "big").await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("no recall.qdrantUrl"), "{}", r.text());

    // A server that does not answer (nothing listens on port 9): 409 naming the collection.
    let mut big_digest = String::new();
    let Pod { h, .. } = pod(|dir, digest| {
        big_digest = deliver(dir, "big", MODEL, DIMS);
        // The embeddings are not read for a Qdrant Capsule: gone, it still loads.
        std::fs::remove_file(dir.join("big/embeddings.jsonl")).unwrap();
        json!({"capsules": [
            {"name": "kb", "digest": digest},
            {"name": "big", "digest": big_digest, "collection": collection(&big_digest)}
        ], "recall": {"capsulesDir": dir, "qdrantUrl": "http://127.0.0.1:9"}})
    })
    .await;
    let r = recall_refunds(&h, "big").await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "capsule_unavailable");
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains(&collection(&big_digest))
            && message.contains("not loaded yet or cannot be read"),
        "{message}"
    );
    // A vector of another dimension is refused before any request, as for an embedded index.
    let r = h
        .post(
            "/v1/recall",
            &json!({"vector": [1.0, 0.0], "capsules": ["big"]}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "dimension_mismatch");
    // The embedded Capsule beside it answers as before.
    let r = recall_refunds(&h, "kb").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(h.rows().await.is_empty(), "vectors given: nothing metered");

    // A folder that is not the verified content is refused at load, as for any bundle.
    let Pod { h, .. } = pod(|dir, digest| {
        let big = deliver(dir, "big", MODEL, DIMS);
        std::fs::write(dir.join("big/manifest.json"), "{}").unwrap();
        json!({"capsules": [
            {"name": "kb", "digest": digest},
            {"name": "big", "digest": big, "collection": collection(&big)}
        ], "recall": {"capsulesDir": dir, "qdrantUrl": "http://127.0.0.1:9"}})
    })
    .await;
    let r = recall_refunds(&h, "big").await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        r.text().contains("does not hold the verified content"),
        "{}",
        r.text()
    );

    // Revoked: 410 with the reason, decided before the server is asked.
    let Pod { h, .. } = pod(|dir, digest| {
        let big = deliver(dir, "big", MODEL, DIMS);
        json!({"capsules": [
            {"name": "kb", "digest": digest},
            {"name": "big", "digest": big, "collection": collection(&big)}
        ], "recall": {"capsulesDir": dir, "qdrantUrl": "http://127.0.0.1:9"},
           "revokedCapsules": [{"name": "big", "digest": big, "reason": "Capsule research/big is revoked (spec.revoked)"}]})
    })
    .await;
    let r = recall_refunds(&h, "big").await;
    assert_eq!(r.status, 410, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "capsule_revoked");
    assert!(r.text().contains("spec.revoked"), "{}", r.text());
}
