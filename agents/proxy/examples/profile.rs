//! Instructions per proxied request: the sidecar and the fake provider each run under
//! `valgrind --tool=callgrind`, and one client sends `--requests` (1,000) non-streaming calls
//! through the sidecar, one after the other. Run by `bench/proxy-profile`.
//!
//! Instruction counts do not depend on what else the machine runs, so unlike the latency
//! benchmarks this one can compare two builds on a busy machine. Both counters are zeroed after
//! `--warmup` calls (connections, tokenizer tables, SQLite pages, metric series made) and dumped
//! after the measured ones (`callgrind_control`), so the dumps hold the steady state only.
//!
//! The peer, measured in the same run: the fake provider's instructions per request. It is a
//! small hyper server that parses each request's JSON and writes a JSON reply, about the least
//! an HTTP hop costs; the sidecar makes two such hops (client side and provider side) plus
//! its metering. The sidecar's count includes its background work (folding the journal into
//! SQLite every `foldIntervalMs`); under callgrind a request takes ~50 times longer, so each
//! fold carries fewer requests than at full speed and the fold's share is an upper bound.
//!
//! `--prompt-bytes N` adds about N bytes of prose, new in every request, to each prompt (the
//! default, 0, sends a 30-byte prompt): what a tool's output or a user's turn costs to meter.
//!
//! Ends with `RESULT proxy-profile requests=.. prompt_bytes=.. sidecar_instructions_per_request=..
//! upstream_instructions_per_request=.. ratio=.. sidecar_dump=.. upstream_dump=..`; read a dump
//! with `callgrind_annotate --inclusive=yes <dump>`.

#[path = "bench_support/mod.rs"]
mod bench_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bench_support::load::{self, chat_body_with};
use bench_support::soma::{Sidecar, Upstream, sidecar_config};
use serde_json::json;

struct Args {
    requests: u64,
    warmup: u64,
    /// Prose added to each prompt.
    prompt_bytes: usize,
    /// Where the callgrind dumps go (kept after the run).
    out: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        requests: 1000,
        warmup: 200,
        prompt_bytes: 0,
        out: std::env::temp_dir().join("soma-proxy-profile"),
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    for pair in v.chunks(2) {
        let value = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--requests" => a.requests = value.parse().expect("--requests N"),
            "--warmup" => a.warmup = value.parse().expect("--warmup N"),
            "--prompt-bytes" => a.prompt_bytes = value.parse().expect("--prompt-bytes N"),
            "--out" => a.out = PathBuf::from(value),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// `valgrind --tool=callgrind` writing its dumps to `out/<name>.out[.N]` and its messages to
/// `out/<name>.log`.
fn callgrind(out: &Path, name: &str) -> Vec<String> {
    let file = |ext: &str| out.join(format!("{name}.{ext}")).display().to_string();
    vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        format!("--callgrind-out-file={}", file("out")),
        format!("--log-file={}", file("log")),
    ]
}

/// Runs `callgrind_control <flag> <pid>` (`-z` zeroes the counters, `-d` dumps them).
fn control(flag: &str, pid: u32) {
    let status = Command::new("callgrind_control")
        .args([flag, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("callgrind_control");
    assert!(status.success(), "callgrind_control {flag} {pid} failed");
}

/// Dumps `pid`'s counters and returns the dump's file and its instruction total.
fn dump(out: &Path, name: &str, pid: u32) -> (PathBuf, u64) {
    let before = dumps(out, name);
    control("-d", pid);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = dumps(out, name);
        if let Some(new) = now.iter().find(|p| !before.contains(p)) {
            // The file is written in one go, its totals line last: wait until it is there.
            if let Some(total) = total_instructions(new) {
                return (new.clone(), total);
            }
        }
        assert!(Instant::now() < deadline, "no callgrind dump for {name}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The dump files of `name` in `out` (`<name>.out.N`, one per `callgrind_control -d`).
fn dumps(out: &Path, name: &str) -> Vec<PathBuf> {
    let prefix = format!("{name}.out.");
    std::fs::read_dir(out)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// The `totals:` (or `summary:`) line of a callgrind dump: instructions executed.
fn total_instructions(dump: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dump).ok()?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// `n` calls through the sidecar, one after the other; every one must succeed.
async fn sequential(client: &load::Http, target: &load::Target, first: u64, n: u64, prose: usize) {
    for i in first..first + n {
        let reply = load::call(client, target, chat_body_with(i, false, 16, prose))
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
        assert_eq!(reply.status, 200, "call {i}: {:?}", reply.body);
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = args();
    let _ = std::fs::remove_dir_all(&a.out);
    std::fs::create_dir_all(&a.out).expect("create --out");
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = Upstream::start_under(&callgrind(&a.out, "upstream"));
    let budget = json!({"name": "bench", "limits": {"costMicros": 1_000_000_000_000u64},
        "period": {"calendar": "month"}});
    // As deployed, as in bench/proxy-overhead: a cost Budget, prices, journal and outbox.
    let sidecar = Sidecar::start_under(
        &callgrind(&a.out, "sidecar"),
        &sidecar_config(&upstream, dir.path(), &[budget]),
        dir.path(),
    );
    let client = load::client();
    let target = sidecar.target();
    sequential(&client, &target, 0, a.warmup, a.prompt_bytes).await;
    control("-z", sidecar.pid());
    control("-z", upstream.pid());
    let started = Instant::now();
    sequential(&client, &target, a.warmup, a.requests, a.prompt_bytes).await;
    let took = started.elapsed();
    let (sidecar_dump, sidecar_total) = dump(&a.out, "sidecar", sidecar.pid());
    let (upstream_dump, upstream_total) = dump(&a.out, "upstream", upstream.pid());
    let per = |total: u64| total / a.requests.max(1);
    let (s, u) = (per(sidecar_total), per(upstream_total));
    println!(
        "{} sequential requests under callgrind in {:.1} s",
        a.requests,
        took.as_secs_f64()
    );
    println!(
        "sidecar:  {s} instructions per request ({})",
        sidecar_dump.display()
    );
    println!(
        "provider: {u} instructions per request ({})",
        upstream_dump.display()
    );
    println!(
        "RESULT proxy-profile requests={} prompt_bytes={} sidecar_instructions_per_request={s} upstream_instructions_per_request={u} ratio={:.2} sidecar_dump={} upstream_dump={}",
        a.requests,
        a.prompt_bytes,
        s as f64 / u.max(1) as f64,
        sidecar_dump.display(),
        upstream_dump.display()
    );
}
