//! Child processes for a benchmark: started with their output read for a readiness line (or
//! polled over HTTP), and killed by PID when dropped, so a panicking run leaves nothing behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A child process, stopped by its PID and reaped when dropped: SIGTERM first (so a server
/// with worker processes stops them), SIGKILL if it is still running after five seconds.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let pid = self.0.id().to_string();
        let termed = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .is_ok_and(|s| s.success());
        if termed {
            for _ in 0..50 {
                if matches!(self.0.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The directory holding the release binaries: examples live in `<target>/release/examples`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("examples are built under <target>/release/examples")
        .to_path_buf()
}

/// Starts `bin` and returns the first stdout line containing `marker`; stdout keeps being
/// drained so the child never blocks on a full pipe.
pub fn start(bin: &Path, args: &[&str], env: &[(&str, &str)], marker: &str) -> (Killed, String) {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    let out = child.stdout.take().expect("piped");
    let child = Killed(child);
    let mut lines = BufReader::new(out).lines();
    let line = loop {
        match lines.next() {
            Some(Ok(l)) if l.contains(marker) => break l,
            Some(Ok(_)) => continue,
            _ => panic!("{} exited before {marker:?}", bin.display()),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, line)
}

/// The command that runs a program on core `cpu` only (`taskset -c`, which runs it in its own
/// process, so the PID is the program's); none when `cpu` is `None`.
pub fn pinned(cpu: Option<usize>) -> Vec<String> {
    cpu.map_or_else(Vec::new, |c| {
        vec!["taskset".into(), "-c".into(), c.to_string()]
    })
}

/// Like [`start`], with `bin` run by the command `prefix` ([`pinned`], `valgrind
/// --tool=callgrind`); the wrapper must run `bin` in its own process, so that the PID is
/// `bin`'s. An empty prefix runs `bin` itself.
pub fn start_under(
    prefix: &[String],
    bin: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    marker: &str,
) -> (Killed, String) {
    let Some((wrapper, wrapper_args)) = prefix.split_first() else {
        return start(bin, args, env, marker);
    };
    let mut all: Vec<&str> = wrapper_args.iter().map(String::as_str).collect();
    all.push(bin.to_str().expect("utf-8 path"));
    all.extend_from_slice(args);
    start(Path::new(wrapper), &all, env, marker)
}

/// A port that was free a moment ago on 127.0.0.1 (for servers that cannot report the port
/// they bound, such as LiteLLM's).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// The machine's 1-, 5- and 15-minute load averages (`/proc/loadavg`), printed with every run
/// because the figures move with whatever else shares the cores.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
