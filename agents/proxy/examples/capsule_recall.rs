//! `bench/capsule-recall`: packs a folder of text into a Capsule bundle with `soma-hash-<d>`
//! embeddings, delivers it into a folder, starts a sidecar holding it (in process, with the
//! fake upstream answering the query embeddings), and measures recall quality and latency.
//! See the script for the corpus and the RESULT line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use soma_capsule::format::Embedding;
use soma_capsule::hashed;
use soma_capsule::pack::{Embeddings, PackOptions, pack_documents, read_documents};
use soma_capsule::recall::{ExactIndex, Hit, sort_hits};
use soma_proxy::fake_upstream::FakeUpstream;

const TOKEN: &str = "bench-pod-token";

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_owned())
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A small deterministic generator (SplitMix64), so the query sample is the same every run.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let corpus = std::path::PathBuf::from(arg("--corpus", ""));
    let queries: usize = arg("--queries", "300").parse().unwrap();
    let dims: usize = arg("--dims", "256").parse().unwrap();
    let model = hashed::model_name(dims);
    let k = 10;

    // Pack: chunks, their embeddings, the bundle; deliver it as the init container does.
    let t = Instant::now();
    let docs = read_documents(&corpus).expect("reading the corpus");
    let max_bytes = 1500;
    let chunks = soma_capsule::pack::chunks(&docs, max_bytes);
    let records: Vec<Embedding> = chunks
        .iter()
        .map(|c| Embedding {
            id: c.id.clone(),
            vector: hashed::embed(&c.text, dims),
        })
        .collect();
    let bundle = pack_documents(
        &docs,
        &PackOptions {
            version: "6.03-2".into(),
            policy_hash: format!("sha256:{}", "0".repeat(64)),
            max_bytes,
            embeddings: Some(Embeddings {
                model: model.clone(),
                records: records.clone(),
            }),
        },
    )
    .expect("packing");
    let capsules = tempfile::tempdir().unwrap();
    bundle
        .open()
        .unwrap()
        .write_into(&capsules.path().join("manpages"))
        .unwrap();
    eprintln!(
        "packed {} documents into {} chunks ({} dims) in {:.1} s; digest {}",
        docs.len(),
        chunks.len(),
        dims,
        t.elapsed().as_secs_f64(),
        bundle.digest
    );

    // Queries: the first 12 words of a seeded sample of chunks with at least 12 words.
    let mut seed = 0x5eed_u64;
    let mut sample: Vec<(usize, String)> = Vec::new();
    let mut tries = 0;
    while sample.len() < queries && tries < queries * 50 {
        tries += 1;
        let i = (splitmix(&mut seed) % chunks.len() as u64) as usize;
        let words: Vec<&str> = chunks[i].text.split_whitespace().take(12).collect();
        if words.len() == 12 && !sample.iter().any(|(j, _)| *j == i) {
            sample.push((i, words.join(" ")));
        }
    }

    // The index alone, and exact search by sorting every score, for recall@10.
    let t = Instant::now();
    let index = ExactIndex::build(dims, records.iter().map(|r| r.vector.as_slice())).unwrap();
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut index_us = Vec::new();
    let (mut overlap, mut hit) = (0usize, 0usize);
    for (source, q) in &sample {
        let qv = hashed::embed(q, dims);
        let t = Instant::now();
        let got = index.search(&qv, k).unwrap();
        index_us.push(t.elapsed().as_secs_f64() * 1e6);
        let norm = qv
            .iter()
            .map(|x| x * x)
            .sum::<f32>()
            .sqrt()
            .max(f32::MIN_POSITIVE);
        let mut all: Vec<Hit> = records
            .iter()
            .enumerate()
            .map(|(row, r)| {
                let rn = r
                    .vector
                    .iter()
                    .map(|x| x * x)
                    .sum::<f32>()
                    .sqrt()
                    .max(f32::MIN_POSITIVE);
                let dot: f32 = r.vector.iter().zip(&qv).map(|(a, b)| a * b).sum();
                Hit {
                    row,
                    score: dot / (rn * norm),
                }
            })
            .collect();
        sort_hits(&mut all);
        let exact: Vec<usize> = all.iter().take(k).map(|h| h.row).collect();
        overlap += got.iter().filter(|h| exact.contains(&h.row)).count();
        hit += usize::from(got.iter().any(|h| h.row == *source));
    }
    index_us.sort_by(f64::total_cmp);

    // End to end through a running sidecar.
    let upstream = FakeUpstream::start("sk-bench").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key"), "sk-bench").unwrap();
    let config = json!({
        "listen": "127.0.0.1:0", "adminListen": "127.0.0.1:0",
        "agent": {"namespace": "bench", "name": "recall"},
        "provider": {"kind": "openaiCompatible", "upstream": upstream.url(), "model": "gpt-4o"},
        "credentials": {"file": dir.path().join("key")},
        "clientTokenEnv": "SOMA_POD_UID",
        "outboxPath": dir.path().join("outbox.db"),
        "capsules": [{"name": "manpages", "digest": bundle.digest}],
        "recall": {"capsulesDir": capsules.path()},
    });
    let t = Instant::now();
    let proxy = soma_proxy::start(
        soma_proxy::Config::parse(&config.to_string()).unwrap(),
        TOKEN.into(),
        None,
    )
    .await
    .unwrap();
    let load_s = t.elapsed().as_secs_f64();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("http://{}/v1/recall", proxy.proxy_addr);
    let mut e2e_ms = Vec::new();
    let mut agree = 0usize;
    for (round, (source, q)) in sample.iter().enumerate() {
        let req = hyper::Request::post(&url)
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                json!({"query": q, "k": k}).to_string(),
            )))
            .unwrap();
        let t = Instant::now();
        let resp = client.request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        assert!(
            status.is_success(),
            "{status}: {}",
            String::from_utf8_lossy(&body)
        );
        // The first round warms connections: not counted.
        if round > 0 {
            e2e_ms.push(ms);
        }
        let v: Value = serde_json::from_slice(&body).unwrap();
        let first = v["data"][0]["chunk"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        agree += usize::from(
            first == chunks[*source].id
                || v["data"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|x| x["chunk"] == chunks[*source].id.as_str())),
        );
    }
    e2e_ms.sort_by(f64::total_cmp);
    let rows = proxy.state.outbox.rows().await.unwrap();
    let metered = rows
        .iter()
        .filter(|r| r["endpoint"] == "embeddings")
        .count();
    proxy.stop().await;
    tokio::time::sleep(Duration::from_millis(10)).await;

    let n = sample.len();
    let recall_at_10 = overlap as f64 / (n * k) as f64;
    let hit_at_10 = hit as f64 / n as f64;
    eprintln!(
        "index build {build_ms:.1} ms; sidecar start with load {load_s:.2} s; {n} queries; {metered} embedding calls metered; e2e source-in-top-10 {agree}/{n}"
    );
    println!(
        "RESULT capsule-recall chunks={} documents={} dims={dims} queries={n} recall_at_10={recall_at_10:.3} hit_at_10={hit_at_10:.3} index_p50_us={:.0} index_p95_us={:.0} e2e_p50_ms={:.2} e2e_p95_ms={:.2} metered_calls={metered}",
        chunks.len(),
        docs.len(),
        pct(&index_us, 50.0),
        pct(&index_us, 95.0),
        pct(&e2e_ms, 50.0),
        pct(&e2e_ms, 95.0),
    );
}
