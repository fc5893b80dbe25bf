//! `soma audit verify`, `soma budget report` and `soma cost --dry-run` as a user runs them,
//! on a ledger filled by real sidecar traffic: two `soma-proxy` sidecars (two audit chains)
//! deliver to a real PostgreSQL started by the harness, the operator's seal code seals the
//! Budget's window with an Ed25519 key, and each test tampers with a copy of that database the
//! way an attacker with write access would. `verify` must report every case.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use soma_ledger::audit::SealKey;
use soma_metering::{BudgetKey, BudgetRef};
use soma_proxy::fake_upstream::FakeUpstream;
use soma_testsupport::Pg;

const KEY: &str = "sk-cli-test-9f2e";
const TOKEN: &str = "pod-uid-cli";

/// The filled ledger every test copies: the server, the template database's name, the seal
/// public key.
struct Filled {
    pg: Pg,
    public: String,
    records: i64,
    cost: i64,
}

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

fn sidecar_config(dir: &Path, upstream: &str, url: &str) -> Value {
    std::fs::write(dir.join("key"), KEY).unwrap();
    json!({
        "listen": "127.0.0.1:0", "adminListen": "127.0.0.1:0",
        "agent": {"namespace": "research", "name": "assistant"},
        "provider": {"kind": "openai", "upstream": upstream, "model": "gpt-4o-mini"},
        "credentials": {"file": dir.join("key")},
        "clientTokenEnv": "SOMA_POD_UID",
        "outboxPath": dir.join("outbox.db"),
        "prices": {"gpt-4o-mini": {"inputPerMTok": 150_000, "outputPerMTok": 600_000}},
        "databaseUrl": url,
        "deliveryIntervalMs": 50,
        "authority": {"postgres": {}},
        "budget": "team",
        "budgets": [{"name": "team", "uid": "uid-1", "limits": {"costMicros": 1_000_000_000},
                     "period": {"calendar": "month"}}],
    })
}

/// Sends `n` chat calls through a fresh sidecar and waits until the ledger has them.
async fn traffic(upstream: &FakeUpstream, url: &str, n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let config =
        soma_proxy::Config::parse(&sidecar_config(dir.path(), &upstream.url(), url).to_string())
            .unwrap();
    let proxy = soma_proxy::start(config, TOKEN.to_owned(), None)
        .await
        .unwrap();
    let client = reqwest_like::Client::new();
    for i in 0..n {
        let body = json!({"model": "gpt-4o-mini", "max_tokens": 20 + i,
            "messages": [{"role": "user", "content": format!("question number {i}")}]});
        let status = client
            .post(
                &format!("http://{}/v1/chat/completions", proxy.proxy_addr),
                TOKEN,
                &body,
            )
            .await;
        assert_eq!(status, 200);
    }
    for _ in 0..400 {
        if proxy
            .state
            .outbox
            .pending_delivery(soma_proxy::outbox::Sink::Ledger)
            .await
            .unwrap()
            == 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    proxy.stop().await;
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

fn budget() -> BudgetRef {
    BudgetRef {
        key: BudgetKey::new("research", "team"),
        uid: "uid-1".into(),
    }
}

/// Fills the template database once per test binary: two sidecars, two seals.
async fn fill() -> Filled {
    let pg = Pg::start();
    let url = pg.database("filled").await;
    let upstream = FakeUpstream::start(KEY).await.unwrap();
    traffic(&upstream, &url, 12).await;
    let key = SealKey::generate().unwrap();
    let (start, end) = month_window();
    let pool = soma_ledger::pool(&url, 2, Duration::from_secs(5)).unwrap();
    let now = || jiff::Timestamp::now().as_millisecond();
    // Seals dated 10 s ahead: every record delivered before them is clear of the margin
    // `verify` gives deliveries racing a seal, so a backdated insertion is unambiguous.
    soma_ledger::audit::seal_window(&pool, &key, &budget(), start, end, now() + 10_000)
        .await
        .unwrap()
        .expect("a first seal");
    traffic(&upstream, &url, 8).await;
    soma_ledger::audit::seal_window(&pool, &key, &budget(), start, end, now() + 10_000)
        .await
        .unwrap()
        .expect("a second seal");
    let (records, cost): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), SUM(cost_micros)::BIGINT FROM usage_records")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(records, 20);
    pool.close().await;
    Filled {
        pg,
        public: key.public(),
        records,
        cost,
    }
}

/// A fresh copy of the filled ledger for one case.
async fn copy<'a>(f: &'a Filled, name: &str) -> (&'a Filled, String) {
    let pool = f.pg.pool().await;
    // The sidecars' connections to the template close asynchronously: retry while they linger.
    for attempt in 0.. {
        let created = sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{name}\" TEMPLATE filled"
        )))
        .execute(&pool)
        .await;
        match created {
            Ok(_) => break,
            Err(e) if attempt < 100 && e.to_string().contains("being accessed by other users") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("copying the ledger: {e}"),
        }
    }
    pool.close().await;
    (
        f,
        format!("postgres://soma@127.0.0.1:{}/{name}", f.pg.port()),
    )
}

async fn exec(url: &str, sql: &str) {
    let pool = soma_ledger::pool(url, 1, Duration::from_secs(5)).unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
}

fn verify(url: &str, public: &str) -> (i32, String) {
    run(soma()
        .args([
            "audit",
            "verify",
            "--budget",
            "research/team",
            "--database-url",
            url,
        ])
        .args(["--seal-public-key", public]))
}

/// The first sidecar's holder id.
const FIRST: &str = "(SELECT holder FROM usage_records WHERE seq = 12 LIMIT 1)";

/// Every form of tampering, each on its own copy of one ledger filled by real sidecar traffic,
/// and the report on the same ledger. One test, so the one PostgreSQL is stopped at its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_is_detected_in_every_form_and_the_report_adds_up() {
    let f = fill().await;
    untouched(&f).await;
    edited(&f).await;
    deleted(&f).await;
    inserted(&f).await;
    reordered(&f).await;
    seals(&f).await;
    json_findings(&f).await;
    report(&f).await;
}

async fn untouched(f: &Filled) {
    let (f, url) = copy(f, "untouched").await;
    let (code, out) = verify(&url, &f.public);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("checked 20 records in 2 sidecar chains and 2 seals: intact"),
        "{out}"
    );
    // Another operator's key: the seals are not theirs.
    let other = SealKey::generate().unwrap().public();
    let (code, out) = verify(&url, &other);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not signed by the trusted key"), "{out}");
    // Without a key given, the check says what it could not prove.
    let (code, out) = run(soma().args(["audit", "verify", "--all", "--database-url", &url]));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("pass --seal-public-key"), "{out}");
}

async fn edited(f: &Filled) {
    let (f, url) = copy(f, "edited").await;
    exec(
        &url,
        &format!("UPDATE usage_records SET cost_micros = cost_micros - 1 WHERE holder = {FIRST} AND seq = 5"),
    )
    .await;
    // A field added in version 2 of the record's form, set on a record hashed in version 1.
    exec(
        &url,
        &format!(
            "UPDATE usage_records SET web_search_requests = 3 WHERE holder = {FIRST} AND seq = 6"
        ),
    )
    .await;
    let (code, out) = verify(&url, &f.public);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("TAMPERED  edited") && out.contains("(seq 5 of holder"),
        "{out}"
    );
    assert!(out.contains("(seq 6 of holder"), "{out}");
    assert!(out.contains("TAMPERING FOUND"), "{out}");
}

async fn deleted(f: &Filled) {
    let (f, url) = copy(f, "deleted").await;
    exec(
        &url,
        &format!("DELETE FROM usage_records WHERE holder = {FIRST} AND seq = 7"),
    )
    .await;
    let (code, out) = verify(&url, &f.public);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("records 7..7 of holder") && out.contains("missing (deleted)"),
        "{out}"
    );

    let (f, url) = copy(f, "deleted_tail").await;
    exec(
        &url,
        &format!("DELETE FROM usage_records WHERE holder = {FIRST} AND seq = 12"),
    )
    .await;
    let (code, out) = verify(&url, &f.public);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("names record seq 12 of holder") && out.contains("which is gone"),
        "{out}"
    );
}

async fn inserted(f: &Filled) {
    // Into a chain: the records after it are renumbered to make room.
    let (f, url) = copy(f, "inserted").await;
    exec(
        &url,
        &format!(
            "UPDATE usage_records SET seq = -seq WHERE holder = {FIRST} AND seq >= 4;
             UPDATE usage_records SET seq = 1 - seq WHERE seq < 0;
             INSERT INTO usage_records (id, namespace, agent, budgets, endpoint, model, started_at,
                 finished_at, input_tokens, cached_input_tokens, cache_write_input_tokens,
                 output_tokens, reasoning_tokens, cost_micros, estimated, outcome, http_status,
                 holder, seq, prev_hash, hash)
             SELECT 'forged-1', namespace, agent, budgets, endpoint, model, started_at, finished_at,
                 input_tokens, 0, 0, output_tokens, 0, 1, estimated, outcome, http_status, holder, 4,
                 prev_hash, hash
               FROM usage_records WHERE holder = {FIRST} AND seq = 3;"
        ),
    )
    .await;
    let (code, out) = verify(&url, &f.public);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("forged-1"), "{out}");
    assert!(
        out.contains("was written as seq 4") && out.contains("now sits at seq 5"),
        "{out}"
    );

    // Into a sealed window, as a sidecar that never existed, dated before the seal.
    let (f, url) = copy(f, "inserted_window").await;
    exec(
        &url,
        "INSERT INTO usage_records (id, namespace, agent, budgets, endpoint, model, started_at,
             finished_at, input_tokens, cached_input_tokens, cache_write_input_tokens,
             output_tokens, reasoning_tokens, cost_micros, estimated, outcome, http_status,
             holder, seq, prev_hash, hash, delivered_at)
         SELECT 'forged-2', namespace, agent, budgets, endpoint, model, started_at, finished_at,
             input_tokens, 0, 0, output_tokens, 0, cost_micros, estimated, outcome, http_status,
             'ghost', 1, 'x', 'y', delivered_at
           FROM usage_records ORDER BY delivered_at LIMIT 1",
    )
    .await;
    let (code, out) = verify(&url, &f.public);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("record forged-2 was delivered before seal")
            && out.contains("it was inserted"),
        "{out}"
    );
}

async fn reordered(f: &Filled) {
    let (f, url) = copy(f, "reordered").await;
    exec(
        &url,
        &format!(
            "UPDATE usage_records SET seq = -1 WHERE holder = {FIRST} AND seq = 2;
             UPDATE usage_records SET seq = 2 WHERE holder = {FIRST} AND seq = 3;
             UPDATE usage_records SET seq = 3 WHERE holder = {FIRST} AND seq = -1;"
        ),
    )
    .await;
    let (code, out) = verify(&url, &f.public);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("TAMPERED  reordered"), "{out}");
    assert!(
        out.contains("was written as seq 2") && out.contains("now sits at seq 3"),
        "{out}"
    );
}

async fn seals(f: &Filled) {
    let (f, url) = copy(f, "seal_changed").await;
    exec(
        &url,
        "UPDATE ledger_seals SET cost_micros = cost_micros - 100 WHERE seq = 2",
    )
    .await;
    let (code, out) = verify(&url, &f.public);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("seal 2 was changed after it was signed"),
        "{out}"
    );

    let (f, url) = copy(f, "seal_removed").await;
    exec(&url, "DELETE FROM ledger_seals WHERE seq = 1").await;
    let (code, out) = verify(&url, &f.public);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("seals 1..1 are missing"), "{out}");
}

async fn json_findings(f: &Filled) {
    let (f, url) = copy(f, "json").await;
    exec(
        &url,
        &format!("UPDATE usage_records SET model = 'gpt-4o' WHERE holder = {FIRST} AND seq = 1"),
    )
    .await;
    let (code, out) = run(soma()
        .args(["audit", "verify", "--namespace", "research", "-o", "json"])
        .args(["--database-url", &url, "--seal-public-key", &f.public]));
    assert_eq!(code, 1, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["records"], 20);
    let kinds: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["tampering"] == true)
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"edited"), "{report}");
}

#[test]
fn bad_input_gets_a_clear_error_and_exit_2() {
    for (args, want) in [
        (
            vec!["audit", "verify", "--all"],
            "no ledger: pass --database-url",
        ),
        (
            vec![
                "audit",
                "verify",
                "--budget",
                "team",
                "--database-url",
                "postgres://x/y",
            ],
            "--budget \"team\" must be namespace/name",
        ),
        (
            vec!["audit", "verify", "--database-url", "postgres://x/y"],
            "say what to verify",
        ),
        (
            vec![
                "audit",
                "verify",
                "--all",
                "--database-url",
                "postgres://soma@127.0.0.1:9/x",
            ],
            "cannot reach the ledger",
        ),
        (
            vec![
                "audit",
                "verify",
                "--all",
                "--seal-public-key",
                "not-a-key",
                "--database-url",
                "postgres://x/y",
            ],
            "--seal-public-key is neither",
        ),
        (
            vec![
                "budget",
                "report",
                "--budget",
                "a/b/c",
                "--database-url",
                "postgres://x/y",
            ],
            "must be namespace/name",
        ),
        (
            vec![
                "budget",
                "report",
                "--since",
                "2026-13-45",
                "--database-url",
                "postgres://x/y",
            ],
            "--since \"2026-13-45\" is neither a day",
        ),
        (
            vec![
                "budget",
                "report",
                "--time-zone",
                "Mars/Olympus",
                "--database-url",
                "postgres://x/y",
            ],
            "is not an IANA time zone",
        ),
        (
            vec![
                "budget",
                "report",
                "--since",
                "2026-02-01",
                "--until",
                "2026-01-01",
                "--database-url",
                "postgres://x/y",
            ],
            "must be before --until",
        ),
        (vec!["budget", "report"], "no ledger: pass --database-url"),
    ] {
        let (code, out) = run(soma().args(&args).env_remove("SOMA_LEDGER_URL"));
        assert_eq!(code, 2, "{args:?}: {out}");
        assert!(out.contains(want), "{args:?}: {out}");
        assert!(
            !out.contains("postgres://soma@"),
            "the URL is never echoed: {out}"
        );
    }
}

async fn report(f: &Filled) {
    let (f, url) = copy(f, "report").await;
    let (code, out) = run(soma()
        .args([
            "budget",
            "report",
            "--budget",
            "research/team",
            "-o",
            "json",
        ])
        .env("SOMA_LEDGER_URL", &url));
    assert_eq!(code, 0, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let total = &report["totals"][0];
    assert_eq!(total["budget"], "research/team");
    assert_eq!(total["requests"], f.records);
    assert_eq!(total["costMicros"], f.cost);
    let rows = report["rows"].as_array().unwrap();
    assert!(
        rows.iter()
            .all(|r| r["agent"] == "assistant" && r["model"] == "gpt-4o-mini")
    );
    let (code, out) = run(soma()
        .args(["budget", "report", "-n", "research"])
        .env("SOMA_LEDGER_URL", &url));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("research/team") && out.contains("TOTAL"),
        "{out}"
    );
    assert!(
        out.contains("research/assistant") && out.contains("gpt-4o-mini"),
        "{out}"
    );
    // Another tenant's namespace sees nothing of it.
    let (code, out) = run(soma()
        .args(["budget", "report", "-n", "other"])
        .env("SOMA_LEDGER_URL", &url));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no usage recorded"), "{out}");
}

#[test]
fn cost_dry_run_estimates_like_the_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let request = dir.path().join("request.json");
    let body = json!({"model": "gpt-4o", "max_tokens": 300,
        "messages": [{"role": "system", "content": "You answer briefly."},
                     {"role": "user", "content": "What is the capital of France?"}]});
    std::fs::write(&request, body.to_string()).unwrap();
    let prices = dir.path().join("prices.yaml");
    std::fs::write(
        &prices,
        "gpt-4o: {inputPerMTok: 2500000, outputPerMTok: 10000000, cachedInputPerMTok: 1250000}\n",
    )
    .unwrap();
    let (code, out) = run(soma()
        .args(["cost", "--dry-run", "-o", "json", "-f"])
        .arg(&request)
        .arg("--prices")
        .arg(&prices));
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let prompt = soma_metering::tokens::estimate_prompt("gpt-4o", &body);
    let table: soma_metering::PriceTable =
        serde_yaml::from_str(&std::fs::read_to_string(&prices).unwrap()).unwrap();
    let bound = soma_metering::Usage {
        input_tokens: prompt,
        output_tokens: 300,
        ..soma_metering::Usage::default()
    };
    let worst = soma_metering::Amount::worst_case(&bound, table.get("gpt-4o"));
    assert_eq!(v["promptTokens"], prompt);
    assert_eq!(v["maxOutputTokens"], 300);
    assert_eq!(v["worstCaseTokens"], worst.tokens);
    assert_eq!(v["worstCaseCostMicros"], worst.micros);
    // From standard input, as a table.
    let mut child = soma()
        .args(["cost", "--dry-run", "--prices"])
        .arg(&prices)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains(&format!("worst case cost     {} micros", worst.micros)),
        "{text}"
    );
    // Bad input.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{not json").unwrap();
    let no_model = dir.path().join("nomodel.json");
    std::fs::write(&no_model, "{\"messages\": []}").unwrap();
    let cases: Vec<(Vec<PathBuf>, Vec<&str>, &str)> = vec![
        (vec![bad.clone()], vec![], "the request is not JSON"),
        (vec![no_model.clone()], vec![], "no model"),
        (
            vec![request.clone()],
            vec!["--model", "gpt-5-secret"],
            "is not in the price table",
        ),
        (vec![dir.path().join("missing.json")], vec![], "cannot read"),
    ];
    for (file, extra, want) in cases {
        let (code, out) = run(soma()
            .args(["cost", "--dry-run", "--prices"])
            .arg(&prices)
            .arg("-f")
            .arg(&file[0])
            .args(&extra));
        assert_eq!(code, 2, "{want}: {out}");
        assert!(out.contains(want), "{want}: {out}");
    }
    let (code, out) = run(soma().args(["cost", "-f"]).arg(&request));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--dry-run"), "{out}");
}

/// A minimal HTTP/1 client (hyper), enough to post JSON with the pod token.
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
