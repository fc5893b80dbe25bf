//! A real PostgreSQL 15 for tests: initdb in a temporary folder, started on a free 127.0.0.1
//! port, stopped (fast shutdown) by PID and started again on the same data.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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

/// One PostgreSQL server.
pub struct Pg {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    user: Option<(u32, u32)>,
}

impl Pg {
    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates database `name` and returns its URL.
    pub async fn database(&self, name: &str) -> String {
        let pool = self.pool().await;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&pool)
            .await
            .unwrap();
        format!("postgres://soma@127.0.0.1:{}/{name}", self.port)
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.user {
            c.uid(uid).gid(gid);
        }
        c
    }

    /// Starts a fresh server; panics (failing the test) when PostgreSQL is not installed.
    pub fn start() -> Pg {
        let Some(bin) = pg_bin() else {
            panic!(
                "PostgreSQL is not installed (looked in $SOMA_PG_BIN, /usr/lib/postgresql/15/bin, /usr/local/bin): run scripts/test-deps/servers.sh"
            );
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
        pg
    }

    /// The data directory.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// (Re)starts the server on its data directory.
    pub fn run(&mut self) {
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
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// The URL of the `postgres` database (user `soma`, trust authentication).
    pub fn url(&self) -> String {
        format!("postgres://soma@127.0.0.1:{}/postgres", self.port)
    }

    /// A pool to `postgres`, once the server accepts connections.
    pub async fn pool(&self) -> sqlx::PgPool {
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
