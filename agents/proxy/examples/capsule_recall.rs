//! `bench/capsule-recall`: packs a folder of text into a Capsule bundle with embeddings made by
//! a real model served at `--embedder` (OpenAI-compatible `/v1/embeddings`), or by the lexical
//! `soma-hash-<d>` when no embedder is given; delivers it into a folder; measures the
//! approximate (HNSW) index against exact search, the same-run peer, on two query sets; then
//! queries two running sidecars holding it (one searching the graph, one scanning) with each
//! query embedded through the sidecar's metered provider call. See the script for the corpus
//! and the RESULT line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use soma_capsule::format::{Chunk, Embedding};
use soma_capsule::hashed;
use soma_capsule::index::{ApproximateIndex, IndexParams};
use soma_capsule::pack::{Embeddings, PackOptions, pack_documents, read_documents};
use soma_capsule::recall::{ExactIndex, Hit};
use soma_proxy::fake_upstream::FakeUpstream;

const TOKEN: &str = "bench-pod-token";
const KEY: &str = "sk-bench";
const K: usize = 10;

type Http = Client<HttpConnector, Full<Bytes>>;
/// Whether a chunk answers a query.
type Relevant = Box<dyn Fn(&Chunk) -> bool>;

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

/// A small deterministic generator (SplitMix64), so the query samples are the same every run.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Who embeds: the lexical hash in process, or a model behind an embeddings endpoint.
enum Embedder {
    Hashed(usize),
    Remote {
        // Boxed: the client (whose size depends on the build's hyper-util features) would
        // make every `Hashed` as large.
        client: Box<Http>,
        url: String,
        model: String,
    },
}

impl Embedder {
    async fn embed(&self, texts: &[String]) -> Vec<Vec<f32>> {
        let (client, url, model) = match self {
            Embedder::Hashed(dims) => {
                return texts.iter().map(|t| hashed::embed(t, *dims)).collect();
            }
            Embedder::Remote { client, url, model } => (client, url, model),
        };
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(64) {
            let req = hyper::Request::post(format!("{url}/v1/embeddings"))
                .header("authorization", format!("Bearer {KEY}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(
                    json!({"model": model, "input": batch}).to_string(),
                )))
                .unwrap();
            let resp = client.request(req).await.expect("the embedder answers");
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert!(
                status.is_success(),
                "embedder: {status}: {}",
                String::from_utf8_lossy(&body)
            );
            let v: Value = serde_json::from_slice(&body).unwrap();
            for d in v["data"].as_array().unwrap() {
                out.push(
                    d["embedding"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                        .collect(),
                );
            }
        }
        assert_eq!(out.len(), texts.len());
        out
    }
}

/// A query set: texts, and for each the chunks that answer it.
struct QuerySet {
    name: &'static str,
    texts: Vec<String>,
    relevant: Vec<Relevant>,
}

/// The first 12 words of a seeded sample of chunks (answered by the chunk it was cut from).
fn prefix_queries(chunks: &[Chunk], n: usize) -> QuerySet {
    let mut seed = 0x5eed_u64;
    let (mut texts, mut relevant, mut taken) = (Vec::new(), Vec::<Relevant>::new(), Vec::new());
    let mut tries = 0;
    while texts.len() < n && tries < n * 50 {
        tries += 1;
        let i = (splitmix(&mut seed) % chunks.len() as u64) as usize;
        let words: Vec<&str> = chunks[i].text.split_whitespace().take(12).collect();
        if words.len() == 12 && !taken.contains(&i) {
            taken.push(i);
            texts.push(words.join(" "));
            let id = chunks[i].id.clone();
            relevant.push(Box::new(move |c: &Chunk| c.id == id));
        }
    }
    QuerySet {
        name: "prefix",
        texts,
        relevant,
    }
}

/// What a man page is about, in its own words: the text after " - " on the line under its
/// NAME heading ("open and possibly create a file"), for a seeded sample of the documents that
/// have one (answered by any chunk of that document). These share few words with the chunks
/// around them, so they test meaning more than wording.
fn name_queries(docs: &[(String, String)], n: usize) -> QuerySet {
    let mut described: Vec<(String, String)> = Vec::new();
    for (path, text) in docs {
        let mut lines = text.lines().map(str::trim);
        if lines.by_ref().any(|l| l == "NAME")
            && let Some(line) = lines.find(|l| !l.is_empty())
            && let Some((_, what)) = line.split_once(" - ")
            && what.split_whitespace().count() >= 3
        {
            described.push((path.clone(), what.to_owned()));
        }
    }
    let mut seed = 0x0a3e_u64;
    let (mut texts, mut relevant, mut taken) = (Vec::new(), Vec::<Relevant>::new(), Vec::new());
    while texts.len() < n.min(described.len()) {
        let i = (splitmix(&mut seed) % described.len() as u64) as usize;
        if !taken.contains(&i) {
            taken.push(i);
            let (doc, what) = described[i].clone();
            texts.push(what);
            relevant.push(Box::new(move |c: &Chunk| c.document == doc));
        }
    }
    QuerySet {
        name: "name",
        texts,
        relevant,
    }
}

/// One query set measured: exact search, and the graph at each `ef`.
struct Measured {
    exact_us: Vec<f64>,
    exact_hit: f64,
    /// (ef, recall@10 against exact, hit@10, sorted µs)
    graph: Vec<(usize, f64, f64, Vec<f64>)>,
}

fn measure(
    set: &QuerySet,
    vectors: &[Vec<f32>],
    chunks: &[Chunk],
    exact: &ExactIndex,
    graph: &ApproximateIndex,
    efs: &[usize],
) -> Measured {
    let hit_rate = |results: &[Vec<Hit>]| {
        results
            .iter()
            .zip(&set.relevant)
            .filter(|(hits, rel)| hits.iter().any(|h| rel(&chunks[h.row])))
            .count() as f64
            / results.len() as f64
    };
    let mut exact_us = Vec::new();
    let mut truth = Vec::new();
    for q in vectors {
        let t = Instant::now();
        let hits = exact.search(q, K).unwrap();
        exact_us.push(t.elapsed().as_secs_f64() * 1e6);
        truth.push(hits);
    }
    exact_us.sort_by(f64::total_cmp);
    let exact_hit = hit_rate(&truth);
    let mut out = Vec::new();
    for &ef in efs {
        let (mut us, mut found, mut results) = (Vec::new(), 0usize, Vec::new());
        for (q, want) in vectors.iter().zip(&truth) {
            let t = Instant::now();
            let got = graph.search_with(q, K, Some(ef)).unwrap();
            us.push(t.elapsed().as_secs_f64() * 1e6);
            found += got
                .iter()
                .filter(|h| want.iter().any(|w| w.row == h.row))
                .count();
            results.push(got);
        }
        us.sort_by(f64::total_cmp);
        let asked: usize = truth.iter().map(Vec::len).sum();
        out.push((ef, found as f64 / asked as f64, hit_rate(&results), us));
    }
    Measured {
        exact_us,
        exact_hit,
        graph: out,
    }
}

/// Queries a running sidecar holding the Capsule; returns sorted latencies (ms), how many
/// answers held a relevant chunk, and the embedding calls the sidecar metered.
async fn through_sidecar(
    recall: Value,
    upstream: &str,
    digest: &str,
    set: &QuerySet,
    chunks: &[Chunk],
) -> (Vec<f64>, usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key"), KEY).unwrap();
    let config = json!({
        "listen": "127.0.0.1:0", "adminListen": "127.0.0.1:0",
        "agent": {"namespace": "bench", "name": "recall"},
        "provider": {"kind": "openaiCompatible", "upstream": upstream, "model": "gpt-4o"},
        "credentials": {"file": dir.path().join("key")},
        "clientTokenEnv": "SOMA_POD_UID",
        "outboxPath": dir.path().join("outbox.db"),
        "capsules": [{"name": "manpages", "digest": digest}],
        "recall": recall,
    });
    let t = Instant::now();
    let proxy = soma_proxy::start(
        soma_proxy::Config::parse(&config.to_string()).unwrap(),
        TOKEN.into(),
        None,
    )
    .await
    .unwrap();
    eprintln!(
        "  sidecar start with load {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let client: Http = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("http://{}/v1/recall", proxy.proxy_addr);
    let (mut ms, mut answered) = (Vec::new(), 0usize);
    for (round, (q, rel)) in set.texts.iter().zip(&set.relevant).enumerate() {
        let req = hyper::Request::post(&url)
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                json!({"query": q, "k": K}).to_string(),
            )))
            .unwrap();
        let t = Instant::now();
        let resp = client.request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let elapsed = t.elapsed().as_secs_f64() * 1e3;
        assert!(
            status.is_success(),
            "{status}: {}",
            String::from_utf8_lossy(&body)
        );
        // The first round warms connections: not counted.
        if round > 0 {
            ms.push(elapsed);
        }
        let v: Value = serde_json::from_slice(&body).unwrap();
        answered += usize::from(v["data"].as_array().is_some_and(|d| {
            d.iter().any(|x| {
                chunks
                    .iter()
                    .find(|c| x["chunk"] == c.id.as_str())
                    .is_some_and(rel)
            })
        }));
    }
    ms.sort_by(f64::total_cmp);
    let rows = proxy.state.outbox.rows().await.unwrap();
    let metered = rows
        .iter()
        .filter(|r| r["endpoint"] == "embeddings")
        .count();
    proxy.stop().await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    (ms, answered, metered)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let corpus = std::path::PathBuf::from(arg("--corpus", ""));
    let queries: usize = arg("--queries", "300").parse().unwrap();
    let max_bytes: usize = arg("--max-bytes", "1500").parse().unwrap();
    let embedder_url = arg("--embedder", "");
    let model = arg("--model", "soma-hash-256");
    let defaults = IndexParams::default();
    let params = IndexParams {
        approximate_above_rows: 0,
        connections: arg("--m", &defaults.connections.to_string())
            .parse()
            .unwrap(),
        ef_construction: arg("--ef-construction", &defaults.ef_construction.to_string())
            .parse()
            .unwrap(),
        ef_search: arg("--ef", &defaults.ef_search.to_string())
            .parse()
            .unwrap(),
    };
    let mut efs: Vec<usize> = arg("--sweep", "10,16,32,64,128,256")
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    efs.retain(|e| *e != params.ef_search);
    efs.insert(0, params.ef_search);

    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    let embedder = if embedder_url.is_empty() {
        Embedder::Hashed(
            hashed::dims_of(&model).expect("without --embedder, --model is soma-hash-<d>"),
        )
    } else {
        Embedder::Remote {
            client: Box::new(http.clone()),
            url: embedder_url.clone(),
            model: model.clone(),
        }
    };

    // Pack: chunks, their embeddings, the bundle; deliver it as the init container does.
    let t = Instant::now();
    let docs = read_documents(&corpus).expect("reading the corpus");
    let chunks = soma_capsule::pack::chunks(&docs, max_bytes);
    let texts: Vec<String> = chunks.iter().map(|c| c.text.clone()).collect();
    let vectors = embedder.embed(&texts).await;
    let dims = vectors[0].len();
    let records: Vec<Embedding> = chunks
        .iter()
        .zip(&vectors)
        .map(|(c, v)| Embedding {
            id: c.id.clone(),
            vector: v.clone(),
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
                records,
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
        "packed {} documents into {} chunks, embedded by {model} ({dims} dims), in {:.1} s; digest {}",
        docs.len(),
        chunks.len(),
        t.elapsed().as_secs_f64(),
        bundle.digest
    );

    // The two indexes over the same rows.
    let t = Instant::now();
    let exact = ExactIndex::build(dims, vectors.iter().map(Vec::as_slice)).unwrap();
    let exact_build_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let graph = ApproximateIndex::build(
        ExactIndex::build(dims, vectors.iter().map(Vec::as_slice)).unwrap(),
        &params,
    );
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "exact index {exact_build_ms:.0} ms; HNSW (M={}, efConstruction={}) {build_ms:.0} ms on one thread",
        params.connections, params.ef_construction
    );

    let sets = [
        prefix_queries(&chunks, queries),
        name_queries(&docs, queries),
    ];
    let mut measured = Vec::new();
    for set in &sets {
        let qv = embedder.embed(&set.texts).await;
        let m = measure(set, &qv, &chunks, &exact, &graph, &efs);
        eprintln!(
            "query set {:?} ({} queries): exact hit@10 {:.3}, p50/p95 {:.0}/{:.0} µs",
            set.name,
            set.texts.len(),
            m.exact_hit,
            pct(&m.exact_us, 50.0),
            pct(&m.exact_us, 95.0)
        );
        let mut rows = m.graph.clone();
        rows.sort_by_key(|r| r.0);
        for (ef, recall, hit, us) in &rows {
            eprintln!(
                "  hnsw ef={ef:<4} recall@10 {recall:.3}  hit@10 {hit:.3}  p50/p95 {:.0}/{:.0} µs",
                pct(us, 50.0),
                pct(us, 95.0)
            );
        }
        measured.push(m);
    }

    // End to end: the embedding provider, then two sidecars (graph, and the default scan).
    let fake;
    let upstream = if embedder_url.is_empty() {
        fake = FakeUpstream::start(KEY).await.unwrap();
        fake.url()
    } else {
        embedder_url.clone()
    };
    let dir = capsules.path();
    eprintln!(
        "sidecar searching the graph (recall.approximateAboveRows 0, approximateEf {}):",
        params.ef_search
    );
    let (e2e, answered, metered) = through_sidecar(
        json!({"capsulesDir": dir, "approximateAboveRows": 0, "approximateEf": params.ef_search}),
        &upstream,
        &bundle.digest,
        &sets[0],
        &chunks,
    )
    .await;
    eprintln!("sidecar with the default settings (exact up to 20,000 chunks):");
    let (e2e_exact, answered_exact, metered_exact) = through_sidecar(
        json!({"capsulesDir": dir}),
        &upstream,
        &bundle.digest,
        &sets[0],
        &chunks,
    )
    .await;
    let n = sets[0].texts.len();
    eprintln!(
        "end to end: the source chunk in the top 10 for {answered}/{n} (graph) and {answered_exact}/{n} (scan); {} embedding calls metered",
        metered + metered_exact
    );

    let (prefix, names) = (&measured[0], &measured[1]);
    let (_, recall, hit, us) = &prefix.graph[0];
    let (_, recall_names, hit_names, _) = &names.graph[0];
    println!(
        "RESULT capsule-recall model={model} chunks={} documents={} dims={dims} queries={n} index=hnsw m={} ef_construction={} ef={} recall_at_10={recall:.3} hit_at_10={hit:.3} exact_hit_at_10={:.3} name_queries={} recall_at_10_names={recall_names:.3} hit_at_10_names={hit_names:.3} exact_hit_at_10_names={:.3} index_p50_us={:.0} index_p95_us={:.0} exact_p50_us={:.0} exact_p95_us={:.0} build_ms={build_ms:.0} exact_build_ms={exact_build_ms:.0} e2e_p50_ms={:.2} e2e_p95_ms={:.2} e2e_exact_p50_ms={:.2} e2e_exact_p95_ms={:.2} metered_calls={metered}",
        chunks.len(),
        docs.len(),
        params.connections,
        params.ef_construction,
        params.ef_search,
        prefix.exact_hit,
        sets[1].texts.len(),
        names.exact_hit,
        pct(us, 50.0),
        pct(us, 95.0),
        pct(&prefix.exact_us, 50.0),
        pct(&prefix.exact_us, 95.0),
        pct(&e2e, 50.0),
        pct(&e2e, 95.0),
        pct(&e2e_exact, 50.0),
        pct(&e2e_exact, 95.0),
    );
}
