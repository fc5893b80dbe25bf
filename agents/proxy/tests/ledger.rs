//! Delivery from the outbox to a real PostgreSQL 15, started by this harness on a free
//! 127.0.0.1 port in a temporary folder and stopped by PID. Skips, saying so, when PostgreSQL
//! is not installed (`scripts/test-deps/servers.sh` installs it).
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns panic on a failed set-up too

mod support;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use sqlx::Row;
use support::*;

fn pg_bin() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("SOMA_PG_BIN").map(PathBuf::from),
        Some(PathBuf::from("/usr/lib/postgresql/15/bin")),
        Some(PathBuf::from("/usr/local/bin")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|d| d.join("initdb").exists() && d.join("postgres").exists())
}

/// `postgres`'s uid and gid when running as root (PostgreSQL refuses to run as root).
fn run_as() -> Option<(u32, u32)> {
    let me = String::from_utf8(Command::new("id").arg("-u").output().ok()?.stdout).ok()?;
    if me.trim() != "0" {
        return None;
    }
    let id = |flag: &str| -> Option<u32> {
        String::from_utf8(
            Command::new("id")
                .args([flag, "postgres"])
                .output()
                .ok()?
                .stdout,
        )
        .ok()?
        .trim()
        .parse()
        .ok()
    };
    Some((id("-u")?, id("-g")?))
}

struct Pg {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    user: Option<(u32, u32)>,
}

impl Pg {
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.user {
            c.uid(uid).gid(gid);
        }
        c
    }

    fn start() -> Option<Pg> {
        let Some(bin) = pg_bin() else {
            eprintln!("SKIP: PostgreSQL not installed; run scripts/test-deps/servers.sh");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let user = run_as();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut pg = Pg {
            bin,
            dir,
            port,
            child: None,
            user,
        };
        let data = pg.data();
        let out = pg
            .command("initdb")
            .args([
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "soma",
                "--no-sync",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.run();
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&mut self) {
        let child = self
            .command("postgres")
            .args([
                "-D",
                self.data().to_str().unwrap(),
                "-p",
                &self.port.to_string(),
                "-k",
                self.dir.path().to_str().unwrap(),
            ])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Fast shutdown (SIGINT) by PID, and wait for it.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("postgres://soma@127.0.0.1:{}/postgres", self.port)
    }

    async fn pool(&self) -> sqlx::PgPool {
        for _ in 0..300 {
            if let Ok(p) = sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect(&self.url())
                .await
            {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("PostgreSQL did not accept connections");
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.stop();
    }
}

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

#[tokio::test]
async fn usage_reaches_the_ledger_once_through_an_outage_and_a_redelivery() {
    let Some(mut pg) = Pg::start() else { return };
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
}
