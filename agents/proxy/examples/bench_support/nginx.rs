//! nginx as a bare reverse proxy in front of the fake provider: the floor any proxy hop pays
//! on this machine (two loopback connections, one process waking per request), measured in
//! the same run as the sidecar. It forwards bytes and nothing else: no authentication, no
//! estimate, no Budget, no record. One process (`master_process off`), so its PID is the one
//! that does the work, with keep-alive connections to the provider as the sidecar has.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::load::Target;
use super::procs::{Killed, free_port, pinned};
use super::soma::{KEY, Upstream};

/// A running nginx.
pub struct Nginx {
    _proc: Killed,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

/// The nginx binary: `SOMA_BENCH_NGINX`, else `nginx` on the PATH or in `/usr/sbin`.
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SOMA_BENCH_NGINX") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

/// Its configuration: one worker, logs off, keep-alive to the provider, responses passed on
/// as they arrive (streamed replies are not buffered).
fn config(listen: &str, upstream: &str, dir: &Path) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log stderr warn;\nevents {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n\
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         keepalive_requests 1000000;\n\
         upstream provider {{ server {upstream}; keepalive 1024; keepalive_requests 1000000; }}\n\
         server {{\n    listen {listen} reuseport;\n    location / {{\n\
         proxy_pass http://provider;\n      proxy_http_version 1.1;\n\
         proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n}}\n"
    )
}

impl Nginx {
    /// Starts `bin` in front of `upstream`, on core `cpu` only when given, with its files in
    /// `dir`; returns once it accepts connections.
    pub fn start_on(bin: &Path, cpu: Option<usize>, upstream: &Upstream, dir: &Path) -> Nginx {
        let addr = format!("127.0.0.1:{}", free_port());
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config(&addr, &upstream.addr, dir)).expect("write nginx.conf");
        let prefix = pinned(cpu);
        let mut cmd = match prefix.split_first() {
            Some((wrapper, args)) => {
                let mut c = Command::new(wrapper);
                c.args(args).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let proc = Killed(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("{}: {e}", bin.display())),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {addr} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx { _proc: proc, addr }
    }

    /// Its process id (the one process that serves).
    pub fn pid(&self) -> u32 {
        self._proc.0.id()
    }

    /// Its chat endpoint, called with the provider key (nginx passes the header on).
    pub fn target(&self) -> Target {
        Target::chat(&self.addr, KEY)
    }
}
