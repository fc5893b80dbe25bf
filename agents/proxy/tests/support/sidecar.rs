//! The real `soma-proxy` binary as a child process: started on a config file, its ports read
//! from its "serving" log line, killed with SIGKILL by PID.
#![allow(dead_code, clippy::unwrap_used)] // test support: a failed set-up should panic

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use serde_json::Value;

use super::{KEY, TOKEN, config_json};

pub struct Proc {
    pub child: Child,
    pub addr: String,
    pub admin: String,
    pub lines: mpsc::Receiver<String>,
    /// What it printed before its "serving" line.
    pub startup: Vec<String>,
}

/// Starts the binary and waits for its "serving" log line, which names its ports. A panic
/// before `Proc` exists leaves the child to the test process's exit (clippy's zombie lint).
#[allow(clippy::zombie_processes)]
pub fn spawn(config: &std::path::Path, rust_log: &str) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_soma-proxy"))
        .arg("--config")
        .arg(config)
        .env("SOMA_POD_UID", TOKEN)
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let mut seen: Vec<String> = Vec::new();
    loop {
        let line = lines
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no serving line; output: {seen:#?}"));
        if line.contains("soma-proxy serving") {
            let v: Value = serde_json::from_str(&line).unwrap();
            let f = &v["fields"];
            // Keep what came before: it is checked for the key too.
            for l in &seen {
                assert!(!l.contains(KEY), "key in start-up log: {l}");
            }
            seen.push(line.clone());
            return Proc {
                child,
                addr: f["proxy_addr"].as_str().unwrap().to_owned(),
                admin: f["admin_addr"].as_str().unwrap().to_owned(),
                lines,
                startup: seen,
            };
        }
        seen.push(line);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A failed assertion must not leave the sidecar running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// SIGKILL, then everything it printed.
    pub fn kill(mut self) -> Vec<String> {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let mut out = Vec::new();
        while let Ok(l) = self.lines.recv_timeout(std::time::Duration::from_secs(2)) {
            out.push(l);
        }
        out
    }
}

pub fn write_config(
    dir: &std::path::Path,
    upstream: &str,
    kind: &str,
    extra: Value,
) -> std::path::PathBuf {
    let c = config_json(upstream, kind, dir, extra);
    let path = dir.join("config.yaml");
    std::fs::write(&path, serde_json::to_string_pretty(&c).unwrap()).unwrap();
    path
}
