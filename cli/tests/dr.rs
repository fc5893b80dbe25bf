//! `soma dr drill`, `backup` and `restore` as an SRE runs them, against a real PostgreSQL and a
//! real nats-server started by the harness, on a ledger filled by real sidecar traffic: two
//! `soma-proxy` sidecars deliver to the ledger and publish every record to JetStream, and the
//! operator's seal code seals the Budget's window. A clean drill passes with a measured RTO, a
//! drill taken while usage keeps being committed measures what its backup missed (RPO), and a
//! tampered or corrupt backup, a deleted ledger row and a missing stream message are each
//! caught with the exact discrepancy. Bad input gets exit 2 and wipes nothing.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use soma_ledger::audit::SealKey;
use soma_metering::{BudgetKey, BudgetRef};
use soma_proxy::fake_upstream::FakeUpstream;
use soma_testsupport::{Nats, Pg};

const KEY: &str = "sk-dr-test-51aa";
const TOKEN: &str = "pod-uid-dr";

fn soma() -> Command {
    Command::new(env!("CARGO_BIN_EXE_soma"))
}

fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The folder holding pg_dump and psql of the PostgreSQL the harness runs.
fn pg_client_bin() -> PathBuf {
    let server = std::env::var_os("SOMA_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"));
    let real = std::fs::canonicalize(server.join("postgres")).unwrap();
    let dir = real.parent().unwrap().to_path_buf();
    assert!(
        dir.join("pg_dump").exists() && dir.join("psql").exists(),
        "pg_dump and psql are not installed beside {}: run scripts/test-deps/servers.sh",
        real.display()
    );
    dir
}

fn sidecar_config(dir: &Path, upstream: &str, url: &str, nats: &str, agent: &str) -> Value {
    std::fs::write(dir.join("key"), KEY).unwrap();
    json!({
        "listen": "127.0.0.1:0", "adminListen": "127.0.0.1:0",
        "agent": {"namespace": "research", "name": agent},
        "provider": {"kind": "openai", "upstream": upstream, "model": "gpt-4o-mini"},
        "credentials": {"file": dir.join("key")},
        "clientTokenEnv": "SOMA_POD_UID",
        "outboxPath": dir.join("outbox.db"),
        "prices": {"gpt-4o-mini": {"inputPerMTok": 150_000, "outputPerMTok": 600_000}},
        "databaseUrl": url,
        "natsUrl": nats,
        "deliveryIntervalMs": 50,
        "authority": {"postgres": {}},
        "budget": "team",
        "budgets": [{"name": "team", "uid": "uid-1", "limits": {"costMicros": 1_000_000_000},
                     "period": {"calendar": "month"}}],
    })
}

/// A running sidecar and the means to send it calls.
struct Sidecar {
    proxy: soma_proxy::Running,
    _dir: tempfile::TempDir,
}

async fn sidecar(upstream: &FakeUpstream, url: &str, nats: &str, agent: &str) -> Sidecar {
    let dir = tempfile::tempdir().unwrap();
    let config = soma_proxy::Config::parse(
        &sidecar_config(dir.path(), &upstream.url(), url, nats, agent).to_string(),
    )
    .unwrap();
    let proxy = soma_proxy::start(config, TOKEN.to_owned(), None)
        .await
        .unwrap();
    Sidecar { proxy, _dir: dir }
}

async fn call(addr: std::net::SocketAddr, i: usize) {
    let client = reqwest_like::Client::new();
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 10 + i % 7,
        "messages": [{"role": "user", "content": format!("drill question {i}")}]});
    let status = client
        .post(&format!("http://{addr}/v1/chat/completions"), TOKEN, &body)
        .await;
    assert_eq!(status, 200);
}

async fn count(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM usage_records")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

/// Waits until the ledger holds `n` records and the stream `n` messages.
async fn settled(url: &str, nats: &Nats, n: i64) {
    let pool = soma_ledger::pool(url, 1, Duration::from_secs(5)).unwrap();
    for _ in 0..600 {
        if count(&pool).await == n && nats.messages().await == Some(n as u64) {
            pool.close().await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the ledger ({}) and the stream ({:?}) never reached {n}",
        count(&pool).await,
        nats.messages().await
    );
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

struct World {
    pg: Pg,
    nats: Nats,
    upstream: FakeUpstream,
    ledger: String,
    scratch: String,
    public: String,
    records: i64,
    pg_bin: PathBuf,
}

impl World {
    fn url(&self, db: &str) -> String {
        format!("postgres://soma@127.0.0.1:{}/{db}", self.pg.port())
    }

    /// `soma dr drill` against `ledger` with the test's scratch database, stream and key.
    fn drill(&self, ledger: &str, extra: &[&str]) -> (i32, String) {
        run(soma()
            .args(["dr", "drill", "--database-url", ledger])
            .args([
                "--scratch-url",
                &self.scratch,
                "--nats-url",
                &self.nats.url(),
            ])
            .args([
                "--seal-public-key",
                &self.public,
                "--stream-grace-seconds",
                "1",
            ])
            .arg("--pg-bin")
            .arg(&self.pg_bin)
            .args(extra))
    }

    fn restore(&self, ledger: &str, backup: &Path) -> (i32, String) {
        run(soma()
            .args(["dr", "restore", "--database-url", ledger, "--backup"])
            .arg(backup)
            .args([
                "--scratch-url",
                &self.scratch,
                "--nats-url",
                &self.nats.url(),
            ])
            .args([
                "--seal-public-key",
                &self.public,
                "--stream-grace-seconds",
                "1",
            ])
            .arg("--pg-bin")
            .arg(&self.pg_bin))
    }

    fn backup(&self, ledger: &str, out: &Path) -> (i32, String) {
        run(soma()
            .args(["dr", "backup", "--database-url", ledger, "--out"])
            .arg(out)
            .arg("--pg-bin")
            .arg(&self.pg_bin))
    }

    /// A copy of the ledger, as database `name`.
    async fn copy(&self, name: &str) -> String {
        let pool = self.pg.pool().await;
        for attempt in 0.. {
            let created = sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE DATABASE \"{name}\" TEMPLATE ledger"
            )))
            .execute(&pool)
            .await;
            match created {
                Ok(_) => break,
                Err(e)
                    if attempt < 100 && e.to_string().contains("being accessed by other users") =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("copying the ledger: {e}"),
            }
        }
        pool.close().await;
        self.url(name)
    }
}

async fn exec(url: &str, sql: &str) {
    let pool = soma_ledger::pool(url, 1, Duration::from_secs(5)).unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
}

async fn scalar(url: &str, sql: &str) -> String {
    let pool = soma_ledger::pool(url, 1, Duration::from_secs(5)).unwrap();
    let v: String = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    v
}

/// The ledger every case starts from: 2 sidecars, 30 records, 2 seals, each record in the
/// stream.
async fn world() -> World {
    let pg = Pg::start();
    let nats = Nats::start();
    let ledger = pg.database("ledger").await;
    let scratch = pg.database("scratch").await;
    let upstream = FakeUpstream::start(KEY).await.unwrap();
    let key = SealKey::generate().unwrap();
    let budget = BudgetRef {
        key: BudgetKey::new("research", "team"),
        uid: "uid-1".into(),
    };
    let (start, end) = month_window();
    let pool = soma_ledger::pool(&ledger, 2, Duration::from_secs(5)).unwrap();
    let mut records = 0;
    for (agent, n) in [("assistant", 18), ("summariser", 12)] {
        let s = sidecar(&upstream, &ledger, &nats.url(), agent).await;
        for i in 0..n {
            call(s.proxy.proxy_addr, i).await;
        }
        records += n as i64;
        settled(&ledger, &nats, records).await;
        s.proxy.stop().await;
        let now = jiff::Timestamp::now().as_millisecond();
        soma_ledger::audit::seal_window(&pool, &key, &budget, start, end, now)
            .await
            .unwrap()
            .expect("a seal");
    }
    pool.close().await;
    // Past the grace the drills are given (1 s): every record is settled in both copies.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    World {
        pg,
        nats,
        upstream,
        ledger,
        scratch,
        public: key.public(),
        records,
        pg_bin: pg_client_bin(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drills_pass_on_a_clean_ledger_and_catch_every_fault_exactly() {
    let w = world().await;
    bad_input(&w).await;
    clean(&w).await;
    tampered_backup(&w).await;
    corrupt_backup(&w).await;
    deleted_row(&w).await;
    under_load(&w).await;
    missing_stream_message(&w).await;
}

async fn bad_input(w: &World) {
    let (code, out) = run(soma()
        .args(["dr", "drill", "--database-url", &w.ledger])
        .env_remove("SOMA_SCRATCH_URL"));
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("no scratch database: pass --scratch-url"),
        "{out}"
    );
    let (code, out) = run(soma()
        .args([
            "dr",
            "drill",
            "--database-url",
            &w.ledger,
            "--scratch-url",
            &w.scratch,
        ])
        .env_remove("SOMA_NATS_URL"));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no NATS URL"), "{out}");
    // The ledger itself as scratch, spelt differently: refused before anything is touched.
    let same = w.ledger.replace("127.0.0.1", "localhost");
    let (code, out) = run(soma()
        .args([
            "dr",
            "drill",
            "--database-url",
            &w.ledger,
            "--scratch-url",
            &same,
        ])
        .args(["--nats-url", &w.nats.url()]));
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("the scratch database is the ledger itself"),
        "{out}"
    );
    // A scratch database holding someone's tables is not wiped.
    let foreign = w.pg.database("foreign").await;
    exec(
        &foreign,
        "CREATE TABLE invoices (id INT); INSERT INTO invoices VALUES (1);",
    )
    .await;
    let (code, out) = run(soma()
        .args([
            "dr",
            "drill",
            "--database-url",
            &w.ledger,
            "--scratch-url",
            &foreign,
        ])
        .args(["--nats-url", &w.nats.url()])
        .arg("--pg-bin")
        .arg(&w.pg_bin));
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("holds tables no drill wrote (invoices)"),
        "{out}"
    );
    assert_eq!(
        scalar(&foreign, "SELECT COUNT(*)::text FROM invoices").await,
        "1"
    );
    let (code, out) = run(soma()
        .args([
            "dr",
            "drill",
            "--database-url",
            &w.ledger,
            "--scratch-url",
            &w.scratch,
        ])
        .args([
            "--nats-url",
            &w.nats.url(),
            "--seal-public-key",
            "not-a-key",
        ]));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--seal-public-key is neither"), "{out}");
}

fn report(out: &str) -> Value {
    let start = out.find('{').unwrap_or_else(|| panic!("no JSON in {out}"));
    serde_json::from_str(&out[start..]).unwrap_or_else(|e| panic!("{e}: {out}"))
}

async fn clean(w: &World) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("termination-log");
    let (code, out) = w.drill(
        &w.ledger,
        &["-o", "json", "--report-file", file.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}");
    let r = report(&out);
    assert_eq!(r["passed"], true, "{out}");
    assert_eq!(r["recordsRestored"], w.records, "{out}");
    assert_eq!(r["streamMessages"], w.records, "{out}");
    assert_eq!(
        (r["chainVerified"].clone(), r["streamReconciled"].clone()),
        (json!(true), json!(true))
    );
    assert_eq!(
        r["recordsMissed"], 0,
        "nothing was committed during the backup: {out}"
    );
    assert_eq!(r["rpoSeconds"], 0.0, "{out}");
    let rto = r["rtoSeconds"].as_f64().unwrap();
    let parts = r["restoreSeconds"].as_f64().unwrap() + r["verifySeconds"].as_f64().unwrap();
    assert!(
        rto > 0.0 && rto >= parts * 0.99,
        "RTO {rto} covers restore and verification ({parts})"
    );
    assert!(r.get("discrepancies").is_none(), "{out}");
    // The termination message the operator reads: the same report, bounded.
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(written.len() <= soma_contract::drill::REPORT_LIMIT);
    let back: soma_contract::drill::DrillReport = serde_json::from_str(&written).unwrap();
    assert!(back.passed && back.records_restored == w.records);
    // The scratch database is left empty (marked for the next drill); the table output reads.
    assert_eq!(
        scalar(&w.scratch, "SELECT string_agg(table_name::text, ',') FROM information_schema.tables WHERE table_schema = 'public'").await,
        "soma_drill_scratch"
    );
    let (code, out) = w.drill(&w.ledger, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("drill PASSED"), "{out}");
    assert!(out.contains(&format!("{} records", w.records)), "{out}");
}

/// The first `usage_records` data line of a plain dump, and the dump with its cost changed.
fn tamper(sql: &str) -> (String, String) {
    let copy = sql
        .lines()
        .position(|l| l.starts_with("COPY \"public\".\"usage_records\""))
        .expect("the dump copies usage_records");
    let header = sql.lines().nth(copy).unwrap();
    let columns: Vec<&str> = header[header.find('(').unwrap() + 1..header.find(')').unwrap()]
        .split(", ")
        .map(|c| c.trim_matches('"'))
        .collect();
    let cost = columns.iter().position(|c| *c == "cost_micros").unwrap();
    let id_col = columns.iter().position(|c| *c == "id").unwrap();
    let line = sql.lines().nth(copy + 1).unwrap();
    let mut fields: Vec<String> = line.split('\t').map(str::to_owned).collect();
    let id = fields[id_col].clone();
    fields[cost] = (fields[cost].parse::<i64>().unwrap() + 1).to_string();
    (id, sql.replacen(line, &fields.join("\t"), 1))
}

fn reseal(dir: &Path) {
    use sha2::Digest;
    let bytes = std::fs::read(dir.join("ledger.sql")).unwrap();
    let mut m: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    m["sha256"] = json!(hex::encode(sha2::Sha256::digest(&bytes)));
    m["bytes"] = json!(bytes.len());
    std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
}

async fn tampered_backup(w: &World) {
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("b");
    let (code, out) = w.backup(&w.ledger, &backup);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("backup of {} records", w.records)),
        "{out}"
    );
    // A second backup into the same folder is refused.
    let (code, out) = w.backup(&w.ledger, &backup);
    assert_eq!(code, 2, "{out}");
    // Untouched, it restores and verifies.
    let (code, out) = w.restore(&w.ledger, &backup);
    assert_eq!(code, 0, "{out}");
    // One cost edited in the backup: its digest no longer matches the manifest.
    let sql = std::fs::read_to_string(backup.join("ledger.sql")).unwrap();
    let (id, edited) = tamper(&sql);
    std::fs::write(backup.join("ledger.sql"), &edited).unwrap();
    let (code, out) = w.restore(&w.ledger, &backup);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAILED   the backup file does not match its manifest")
            && out.contains("not restored"),
        "{out}"
    );
    // Someone who also rewrites the manifest: the restore's chain and the stream say which
    // record and which field.
    reseal(&backup);
    let (code, out) = w.restore(&w.ledger, &backup);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("FAILED   audit chain: edited: record {id} (seq ")),
        "{out}"
    );
    assert!(
        out.contains(&format!("record {id} (research/"))
            && out
                .contains("differs between the restore and the stream SOMA_USAGE: cost_micros is"),
        "{out}"
    );
}

async fn corrupt_backup(w: &World) {
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("b");
    assert_eq!(w.backup(&w.ledger, &backup).0, 0);
    // Cut in the middle of the usage records, digest rewritten: psql refuses it.
    let sql = std::fs::read_to_string(backup.join("ledger.sql")).unwrap();
    let at = sql.find("COPY \"public\".\"usage_records\"").unwrap() + 400;
    std::fs::write(backup.join("ledger.sql"), &sql[..at]).unwrap();
    reseal(&backup);
    let (code, out) = w.restore(&w.ledger, &backup);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAILED   restoring the backup failed: "),
        "{out}"
    );
    assert!(out.contains("the backup is corrupt"), "{out}");
}

async fn deleted_row(w: &World) {
    let copy = w.copy("deleted").await;
    let holder = scalar(
        &copy,
        "SELECT holder FROM usage_records WHERE agent = 'assistant' LIMIT 1",
    )
    .await;
    let id = scalar(
        &copy,
        &format!("SELECT id FROM usage_records WHERE holder = '{holder}' AND seq = 5"),
    )
    .await;
    exec(
        &copy,
        &format!("DELETE FROM usage_records WHERE holder = '{holder}' AND seq = 5"),
    )
    .await;
    let (code, out) = w.drill(&copy, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "FAILED   audit chain: missing: records 5..5 of holder {holder} are missing (deleted)"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("FAILED   record {id} (research/assistant, seq 5 of holder {holder}) is in the stream SOMA_USAGE (published ")),
        "{out}"
    );
    assert!(
        out.contains("but in neither the ledger nor the backup: it was deleted from the ledger"),
        "{out}"
    );
}

async fn under_load(w: &World) {
    // Usage keeps being committed while the drill takes its backup; pg_dump is slowed (a
    // wrapper that waits a second before the real one) so the snapshot is well before the
    // backup is complete, as with a large ledger.
    let slow = tempfile::tempdir().unwrap();
    let wrapper = slow.path().join("pg_dump");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nsleep 1.5\nexec {} \"$@\"\n",
            w.pg_bin.join("pg_dump").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink(w.pg_bin.join("psql"), slow.path().join("psql")).unwrap();
    let s = sidecar(&w.upstream, &w.ledger, &w.nats.url(), "loader").await;
    let addr = s.proxy.proxy_addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                call(addr, i).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            i
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let slow_bin = slow.path().to_str().unwrap().to_owned();
    let (code, out) = tokio::task::spawn_blocking({
        let (ledger, scratch, nats, public) = (
            w.ledger.clone(),
            w.scratch.clone(),
            w.nats.url(),
            w.public.clone(),
        );
        move || {
            run(soma()
                .args([
                    "dr",
                    "drill",
                    "--database-url",
                    &ledger,
                    "--scratch-url",
                    &scratch,
                ])
                .args(["--nats-url", &nats, "--seal-public-key", &public])
                .args([
                    "-o",
                    "json",
                    "--stream-grace-seconds",
                    "30",
                    "--pg-bin",
                    &slow_bin,
                ]))
        }
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = traffic.await.unwrap();
    s.proxy.stop().await;
    assert_eq!(code, 0, "{out}");
    let r = report(&out);
    let missed = r["recordsMissed"].as_i64().unwrap();
    let rpo = r["rpoSeconds"].as_f64().unwrap();
    assert!(
        missed > 0,
        "calls every 20 ms through a 1.5 s backup: some are after its snapshot: {out}"
    );
    assert!(rpo > 0.5 && rpo < 10.0, "RPO {rpo}: {out}");
    assert!(r["recordsRestored"].as_i64().unwrap() > w.records, "{out}");
    assert!(sent > 20, "{sent} calls");
}

async fn missing_stream_message(w: &World) {
    // A message deleted from the stream: the record is in the ledger and the backup only.
    // One of the second sidecar's: its ledger delivery came after the stream's first message
    // (the world waited for the first sidecar's messages), so the drill cannot take it for a
    // record older than the stream's retention. The first sidecar's ledger delivery and its
    // first publish race, and a record it delivered before that publish is rightly called
    // aged out.
    let seq = 25;
    let client = async_nats::connect(w.nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("SOMA_USAGE").await.unwrap();
    let msg = stream.get_raw_message(seq).await.unwrap();
    let record: soma_ledger::UsageRecord = serde_json::from_slice(&msg.payload).unwrap();
    assert!(stream.delete_message(seq).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (code, out) = w.drill(&w.ledger, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "FAILED   record {} ({}/{}, seq {} of holder {}) is in the ledger (delivered ",
            record.id, record.namespace, record.agent, record.seq, record.holder
        )),
        "{out}"
    );
    assert!(
        out.contains("but not in the stream SOMA_USAGE: the stream lost it"),
        "{out}"
    );
    assert_eq!(
        out.matches("FAILED   ").count(),
        1,
        "one discrepancy: {out}"
    );
}

mod reqwest_like {
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::client::legacy::Client as Inner;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    pub struct Client(Inner<HttpConnector, Full<Bytes>>);

    impl Client {
        pub fn new() -> Client {
            Client(Inner::builder(TokioExecutor::new()).build_http())
        }

        pub async fn post(&self, url: &str, token: &str, body: &serde_json::Value) -> u16 {
            let req = hyper::Request::post(url)
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap();
            let resp = self.0.request(req).await.unwrap();
            let status = resp.status().as_u16();
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            status
        }
    }
}
