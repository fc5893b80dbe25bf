//! A real nats-server with JetStream for tests: on a free 127.0.0.1 port, its store in a
//! temporary folder, stopped by PID and started again on the same store.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The stream the sidecars publish usage to.
pub const USAGE_STREAM: &str = "SOMA_USAGE";

fn nats_bin() -> Option<PathBuf> {
    let from_env = std::env::var_os("SOMA_NATS_SERVER").map(PathBuf::from);
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("nats-server"))
            .find(|f| f.exists())
    });
    from_env
        .into_iter()
        .chain(on_path)
        .chain([PathBuf::from("/usr/sbin/nats-server")])
        .find(|f| f.exists())
}

/// One nats-server with JetStream.
pub struct Nats {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Nats {
    /// Starts a fresh server; panics (failing the test) when nats-server is not installed.
    pub fn start() -> Nats {
        let Some(bin) = nats_bin() else {
            panic!("nats-server is not installed: run scripts/test-deps/servers.sh");
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut n = Nats {
            bin,
            dir: tempfile::tempdir().unwrap(),
            port,
            child: None,
        };
        n.run();
        n
    }

    /// (Re)starts the server on its store.
    pub fn run(&mut self) {
        let child = Command::new(&self.bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Kills it by PID.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Messages in the usage stream (`SOMA_USAGE`), if it exists.
    pub async fn messages(&self) -> Option<u64> {
        let client = async_nats::connect(self.url()).await.ok()?;
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream(USAGE_STREAM).await.ok()?;
        Some(stream.info().await.ok()?.state.messages)
    }

    /// Waits until the stream holds `n` messages.
    pub async fn wait_for(&self, n: u64) {
        let mut last = None;
        for _ in 0..600 {
            last = self.messages().await;
            if last == Some(n) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("stream never reached {n} messages: {last:?}");
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}
