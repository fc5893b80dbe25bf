//! `bench/dr-drill`: `soma dr drill` on a ledger of at least 100,000 usage records written by
//! real sidecar traffic, with its NATS JetStream copy, measured twice: on a quiet ledger (the
//! RTO of a verified restore), and while usage keeps being committed (what the backup misses:
//! the RPO).
//!
//! ```text
//!  64 clients ─▶ 4 soma-proxy sidecars ─▶ fake provider        (fill: N calls)
//!                    └─ outbox ─▶ PostgreSQL ledger + NATS SOMA_USAGE (+ seals per Budget window)
//!  soma dr drill ─▶ pg_dump (snapshot) ─▶ psql into scratch ─▶ audit chain, totals, every record vs the stream
//! ```
//!
//! Usage: bench/dr-drill [--records 100000] [--clients 64] [--sidecars 4] [--load-rps 200]
//! Ends with one line: `RESULT dr-drill records=.. passed=.. rto_s=.. rpo_s=.. ...`
#![allow(clippy::unwrap_used)] // a benchmark: a failed set-up should stop it

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use soma_ledger::audit::SealKey;
use soma_metering::{BudgetKey, BudgetRef};
use soma_proxy::fake_upstream::FakeUpstream;
use soma_testsupport::{Nats, Pg};

const KEY: &str = "sk-bench-dr";
const TOKEN: &str = "pod-uid-bench-dr";

type Http = Client<HttpConnector, Full<Bytes>>;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number, not {v:?}"))
        })
}

async fn call(client: &Http, url: &str, n: u64) -> u16 {
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 8 + n % 32,
        "messages": [{"role": "user", "content": format!("benchmark question {n}")}]});
    let req = hyper::Request::post(url)
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    match client.request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            status
        }
        Err(_) => 0,
    }
}

fn month_window() -> (i64, i64) {
    let def: soma_metering::BudgetDef = serde_json::from_value(json!({
        "name": "team", "limits": {"costMicros": 1}, "period": {"calendar": "month"}
    }))
    .unwrap();
    let w = soma_metering::Period::try_from(&def.period)
        .unwrap()
        .window(jiff::Timestamp::now())
        .unwrap();
    (w.start.as_millisecond(), w.end.as_millisecond())
}

fn pg_client_bin() -> PathBuf {
    let server = std::env::var_os("SOMA_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"));
    std::fs::canonicalize(server.join("postgres"))
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

fn soma_bin() -> PathBuf {
    let me = std::env::current_exe().unwrap();
    // target/release/examples/dr_drill → target/release/soma
    me.parent().unwrap().parent().unwrap().join("soma")
}

fn drill(ledger: &str, scratch: &str, nats: &str, public: &str) -> Value {
    let out = Command::new(soma_bin())
        .args([
            "dr",
            "drill",
            "--database-url",
            ledger,
            "--scratch-url",
            scratch,
        ])
        .args([
            "--nats-url",
            nats,
            "--seal-public-key",
            public,
            "-o",
            "json",
        ])
        .arg("--pg-bin")
        .arg(pg_client_bin())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = text.find('{').unwrap_or_else(|| {
        panic!(
            "soma dr drill printed no report: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(&text[start..]).unwrap()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let records = arg("--records", 100_000);
    let clients = arg("--clients", 64);
    let sidecars = arg("--sidecars", 4);
    let load_rps = arg("--load-rps", 200);

    let pg = Pg::start();
    let nats = Nats::start();
    let ledger = pg.database("ledger").await;
    let scratch = pg.database("scratch").await;
    let upstream = FakeUpstream::start(KEY).await.unwrap();
    let mut running = Vec::new();
    let mut urls = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..sidecars {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key"), KEY).unwrap();
        let config = json!({
            "listen": "127.0.0.1:0", "adminListen": "127.0.0.1:0",
            "agent": {"namespace": "research", "name": format!("assistant-{i}")},
            "provider": {"kind": "openai", "upstream": upstream.url(), "model": "gpt-4o-mini"},
            "credentials": {"file": dir.path().join("key")},
            "clientTokenEnv": "SOMA_POD_UID",
            "outboxPath": dir.path().join("outbox.db"),
            "prices": {"gpt-4o-mini": {"inputPerMTok": 150_000, "outputPerMTok": 600_000}},
            "databaseUrl": ledger, "natsUrl": nats.url(), "deliveryIntervalMs": 50,
            "authority": {"postgres": {}},
            "budget": "team",
            "budgets": [{"name": "team", "uid": "uid-1", "limits": {"costMicros": 1_000_000_000_000u64},
                         "period": {"calendar": "month"}}],
        });
        let config = soma_proxy::Config::parse(&config.to_string()).unwrap();
        let proxy = soma_proxy::start(config, TOKEN.to_owned(), None)
            .await
            .unwrap();
        urls.push(format!("http://{}/v1/chat/completions", proxy.proxy_addr));
        running.push(proxy);
        dirs.push(dir);
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(connector);

    // Fill: `records` calls from `clients` closed-loop clients.
    println!("filling the ledger with {records} records through {sidecars} sidecars ...");
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, urls, next, failed) =
            (client.clone(), urls.clone(), next.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= records {
                    return;
                }
                if call(&client, &urls[(n as usize) % urls.len()], n).await != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "calls failed while filling"
    );
    let pool = soma_ledger::pool(&ledger, 2, Duration::from_secs(5)).unwrap();
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM usage_records")
            .fetch_one(&pool)
            .await
            .unwrap_or(0)
    };
    let want = i64::try_from(records).unwrap();
    for _ in 0..6000 {
        if count().await == want && nats.messages().await == Some(records) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count().await, want, "the ledger holds every call");
    assert_eq!(
        nats.messages().await,
        Some(records),
        "the stream holds every call"
    );
    let fill_s = started.elapsed().as_secs_f64();
    println!(
        "filled in {fill_s:.1} s ({:.0} calls/s, delivered to the ledger and the stream)",
        records as f64 / fill_s
    );
    let key = SealKey::generate().unwrap();
    let (start, end) = month_window();
    soma_ledger::audit::seal_window(
        &pool,
        &key,
        &BudgetRef {
            key: BudgetKey::new("research", "team"),
            uid: "uid-1".into(),
        },
        start,
        end,
        jiff::Timestamp::now().as_millisecond(),
    )
    .await
    .unwrap();
    // Past the drill's default grace, so every record is settled in both copies.
    tokio::time::sleep(Duration::from_secs(2)).await;

    println!("drill 1: a quiet ledger ...");
    let quiet = drill(&ledger, &scratch, &nats.url(), &key.public());
    println!("{}", serde_json::to_string_pretty(&quiet).unwrap());

    println!("drill 2: while usage is committed at {load_rps} calls/s ...");
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let (client, urls, stop) = (client.clone(), urls.clone(), stop.clone());
        async move {
            let mut tick =
                tokio::time::interval(Duration::from_secs_f64(1.0 / load_rps.max(1) as f64));
            let mut n = records;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let (client, url) = (client.clone(), urls[(n as usize) % urls.len()].clone());
                tokio::spawn(async move { call(&client, &url, n).await });
                n += 1;
            }
            n - records
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = tokio::task::spawn_blocking({
        let (ledger, scratch, nats, public) =
            (ledger.clone(), scratch.clone(), nats.url(), key.public());
        move || drill(&ledger, &scratch, &nats, &public)
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let sent = load.await.unwrap();
    println!("{}", serde_json::to_string_pretty(&loaded).unwrap());
    for proxy in running {
        proxy.stop().await;
    }
    pool.close().await;

    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let i = |v: &Value, k: &str| v[k].as_i64().unwrap_or(-1);
    println!(
        "\n| drill | records restored | backup | restore | verify | RTO | RPO | records missed | passed |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for (name, r) in [("quiet", &quiet), ("under load", &loaded)] {
        println!(
            "| {name} | {} | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {} | {} |",
            i(r, "recordsRestored"),
            f(r, "backupSeconds"),
            f(r, "restoreSeconds"),
            f(r, "verifySeconds"),
            f(r, "rtoSeconds"),
            f(r, "rpoSeconds"),
            i(r, "recordsMissed"),
            r["passed"]
        );
    }
    println!(
        "RESULT dr-drill records={records} fill_calls_per_s={:.0} passed={} rto_s={:.2} backup_s={:.2} restore_s={:.2} verify_s={:.2} load_rps={load_rps} load_calls={sent} loaded_passed={} loaded_rto_s={:.2} rpo_s={:.2} records_missed={}",
        records as f64 / fill_s,
        quiet["passed"],
        f(&quiet, "rtoSeconds"),
        f(&quiet, "backupSeconds"),
        f(&quiet, "restoreSeconds"),
        f(&quiet, "verifySeconds"),
        loaded["passed"],
        f(&loaded, "rtoSeconds"),
        f(&loaded, "rpoSeconds"),
        i(&loaded, "recordsMissed"),
    );
}
