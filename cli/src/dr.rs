//! `soma dr`: disaster-recovery drills of the usage ledger.
//!
//! ```text
//!  soma dr backup   live ledger ─snapshot─▶ pg_dump ─▶ DIR/ledger.sql + DIR/manifest.json
//!  soma dr restore  DIR ─sha256─▶ psql into the scratch database ─▶ verify ─▶ report
//!  soma dr drill    both, timed: RPO (what the backup missed), RTO (restore start → verified)
//! ```
//!
//! A backup is taken with `pg_dump --snapshot` from a REPEATABLE READ transaction whose snapshot
//! the drill exported, so the manifest (records, tokens, cost, seals, the snapshot's time)
//! describes exactly what the backup holds. The restore is verified three ways: its totals
//! against the manifest, its audit chains and seals (`soma audit verify`), and every record
//! against the NATS JetStream copy the sidecars published and against the live ledger
//! ([`soma_ledger::drill::reconcile`]). Exit 0: the drill passed; 1: it failed (each
//! discrepancy is printed); 2: bad input (nothing is written or wiped).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sha2::{Digest, Sha256};
use soma_contract::drill::DrillReport;
use soma_ledger::UsageRecord;
use soma_ledger::audit::{Scope, public_key};
use soma_ledger::drill::{
    COMMIT_MARGIN_MS, Inputs, Manifest, Snapshot, delivered, reconcile, records, totals,
};
use sqlx::PgPool;

use crate::budget::Output;
use crate::ledger::{Failure, LedgerArgs, cause, connect};

/// Where the restore goes and how it is checked.
#[derive(clap::Args, Debug)]
pub struct TargetArgs {
    /// The scratch database the backup is restored into. Its user must own it; the drill
    /// empties its `public` schema before and after, and refuses a database holding tables no
    /// drill wrote.
    #[arg(long, env = "SOMA_SCRATCH_URL", hide_env_values = true)]
    scratch_url: Option<String>,
    /// The NATS server whose JetStream stream holds the copy of every usage record.
    #[arg(long, env = "SOMA_NATS_URL")]
    nats_url: Option<String>,
    /// Do not reconcile with the stream (say so instead of --nats-url): deletions from the
    /// ledger before the backup are then caught only by the audit chain.
    #[arg(long)]
    no_stream: bool,
    /// The stream's name.
    #[arg(long, env = "SOMA_DRILL_STREAM", default_value = "SOMA_USAGE")]
    stream: String,
    /// Seconds a record may take to reach whichever of the ledger and the stream it is not in
    /// yet (the sidecars deliver to both independently).
    #[arg(long, env = "SOMA_DRILL_STREAM_GRACE_SECONDS", default_value_t = 60)]
    stream_grace_seconds: u64,
    /// The operator's seal public key (base64), or a file holding it; without it, seals are
    /// checked against the key the ledger records.
    #[arg(long, env = "SOMA_SEAL_PUBLIC_KEY")]
    seal_public_key: Option<String>,
    /// Do not verify the audit chains and seals of the restore.
    #[arg(long)]
    no_chain: bool,
    /// Leave the restore in the scratch database.
    #[arg(long)]
    keep_scratch: bool,
    /// The folder holding pg_dump and psql (when they are not there: PATH).
    #[arg(long, env = "SOMA_PG_BIN")]
    pg_bin: Option<PathBuf>,
    /// Also write the report as compact JSON (at most 4096 bytes) to this file: a drill pod's
    /// termination message (`/dev/termination-log`), which the operator reads.
    #[arg(long)]
    report_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: Output,
}

/// `soma dr drill`.
#[derive(clap::Args, Debug)]
pub struct DrillArgs {
    #[command(flatten)]
    ledger: LedgerArgs,
    #[command(flatten)]
    target: TargetArgs,
    /// Keep the backup in this folder (default: a temporary folder, removed after).
    #[arg(long)]
    backup_dir: Option<PathBuf>,
}

/// `soma dr backup`.
#[derive(clap::Args, Debug)]
pub struct BackupArgs {
    #[command(flatten)]
    ledger: LedgerArgs,
    /// The folder to write `ledger.sql` and `manifest.json` into (created; must be empty).
    #[arg(long)]
    out: PathBuf,
    /// The folder holding pg_dump (when it is not there: PATH).
    #[arg(long, env = "SOMA_PG_BIN")]
    pg_bin: Option<PathBuf>,
}

/// `soma dr restore`.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The live ledger (the stream's records the backup lacks are looked up there).
    #[command(flatten)]
    ledger: LedgerArgs,
    /// A folder `soma dr backup` wrote.
    #[arg(long)]
    backup: PathBuf,
    #[command(flatten)]
    target: TargetArgs,
}

const BACKUP_FILE: &str = "ledger.sql";
const MANIFEST_FILE: &str = "manifest.json";

/// A checked target.
struct Target {
    scratch_url: String,
    nats_url: Option<String>,
    trusted: Option<ed25519_dalek::VerifyingKey>,
}

/// `name` in `pg_bin` when it is there, else as found on PATH.
fn program(pg_bin: Option<&Path>, name: &str) -> PathBuf {
    pg_bin
        .map(|d| d.join(name))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Host, port and database of a PostgreSQL URL, to tell two databases apart.
fn database_of(url: &str) -> Option<(String, String, String)> {
    let rest = url.split_once("://")?.1;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = host.rsplit_once(':').unwrap_or((host, "5432"));
    let db = path.split(['?', '#']).next().unwrap_or_default();
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    Some((host.to_owned(), port.to_owned(), db.to_owned()))
}

fn check_target(t: &TargetArgs, ledger: &LedgerArgs) -> Result<Target, Failure> {
    let scratch_url = t
        .scratch_url
        .clone()
        .filter(|u| !u.trim().is_empty())
        .ok_or_else(|| {
            Failure::input(
                "no scratch database: pass --scratch-url postgres://... or set SOMA_SCRATCH_URL",
            )
        })?;
    let nats_url = t.nats_url.clone().filter(|u| !u.trim().is_empty());
    if nats_url.is_none() && !t.no_stream {
        return Err(Failure::input(
            "no NATS URL: pass --nats-url (the stream the restore is reconciled with), or --no-stream to drill without it",
        ));
    }
    if let (Some(a), Some(b)) = (
        database_of(&scratch_url),
        ledger.database_url.as_deref().and_then(database_of),
    ) && a == b
    {
        return Err(Failure::input(
            "the scratch database is the ledger itself: refusing to wipe it; point --scratch-url at an empty database of its own",
        ));
    }
    let trusted = match &t.seal_public_key {
        None => None,
        Some(k) => {
            let text = std::fs::read_to_string(k).unwrap_or_else(|_| k.clone());
            Some(public_key(&text).map_err(|_| {
                Failure::input(
                    "--seal-public-key is neither a base64 Ed25519 public key nor a file holding one",
                )
            })?)
        }
    };
    Ok(Target {
        scratch_url,
        nats_url,
        trusted,
    })
}

/// The server's clock, in Unix ms: snapshot, delivery and backup times are all on it.
async fn server_now(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT")
        .fetch_one(pool)
        .await
}

/// Runs a PostgreSQL client program; its last error line on failure.
async fn run_program(mut command: std::process::Command) -> Result<(), String> {
    let name = command.get_program().to_string_lossy().into_owned();
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .map_err(|e| format!("{name} did not finish: {e}"))?
        .map_err(|e| {
            format!("cannot run {name}: {e} (install the PostgreSQL client, or pass --pg-bin)")
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(3)
        .collect::<Vec<_>>()
        .join(" | ");
    Err(format!("{name} failed ({}): {last}", out.status))
}

fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let read = f.read(&mut buf)?;
        if read == 0 {
            break;
        }
        n += read as u64;
        h.update(&buf[..read]);
    }
    Ok((hex::encode(h.finalize()), n))
}

/// Takes a consistent backup of the ledger into `dir`: the manifest describes exactly what
/// the dump holds, because both come from one exported snapshot.
async fn take_backup(
    live: &PgPool,
    url: &str,
    dir: &Path,
    pg_bin: Option<&Path>,
) -> Result<Manifest, String> {
    let file = dir.join(BACKUP_FILE);
    let snapshot = Snapshot::take(live)
        .await
        .map_err(|e| format!("taking the snapshot failed: {}", cause(&e)))?;
    let mut dump = std::process::Command::new(program(pg_bin, "pg_dump"));
    dump.arg(format!("--snapshot={}", snapshot.id))
        .args([
            "--format=plain",
            "--no-owner",
            "--no-privileges",
            "--quote-all-identifiers",
        ])
        .arg("--file")
        .arg(&file)
        .arg("--dbname")
        .arg(url);
    let dumped = run_program(dump).await;
    let (at_ms, totals) = (snapshot.at_ms, snapshot.totals);
    let _ = snapshot.release().await;
    dumped.map_err(|e| format!("taking the backup failed: {e}"))?;
    let done_ms = server_now(live)
        .await
        .map_err(|e| format!("reading the ledger's clock failed: {}", cause(&e)))?;
    let (sha256, bytes) =
        sha256_file(&file).map_err(|e| format!("reading the backup {}: {e}", file.display()))?;
    let manifest = Manifest {
        snapshot_at_ms: at_ms,
        backup_done_at_ms: done_ms,
        records: totals.records,
        tokens: totals.tokens,
        cost_micros: totals.cost_micros,
        seals: totals.seals,
        sha256,
        bytes,
    };
    let text = serde_json::to_string_pretty(&manifest).unwrap_or_default();
    std::fs::write(dir.join(MANIFEST_FILE), text)
        .map_err(|e| format!("writing the manifest: {e}"))?;
    Ok(manifest)
}

/// Empties the scratch database's `public` schema and marks it as a drill's, refusing one that
/// holds tables no drill wrote.
async fn wipe_scratch(scratch: &PgPool) -> Result<(), Failure> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_all(scratch)
    .await
    .map_err(|e| Failure::input(format!("reading the scratch database: {}", cause(&e))))?;
    if !tables.is_empty() && !tables.iter().any(|t| t == "soma_drill_scratch") {
        let mut shown: Vec<&str> = tables.iter().map(String::as_str).take(5).collect();
        shown.sort_unstable();
        return Err(Failure::input(format!(
            "the scratch database holds tables no drill wrote ({}{}): refusing to wipe it; point --scratch-url at an empty database of its own",
            shown.join(", "),
            if tables.len() > 5 { ", ..." } else { "" }
        )));
    }
    sqlx::raw_sql(
        "DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public;
         CREATE TABLE public.soma_drill_scratch (wiped_at TIMESTAMPTZ NOT NULL DEFAULT now());
         INSERT INTO public.soma_drill_scratch DEFAULT VALUES;",
    )
    .execute(scratch)
    .await
    .map_err(|e| {
        Failure::input(format!(
            "emptying the scratch database failed: {} (its user must own the database)",
            cause(&e)
        ))
    })?;
    Ok(())
}

/// The stream's records by id, with when each was published (Unix ms), when its oldest
/// message was published, and the messages that are not usage records; `None`: no such
/// stream.
type StreamCopy = (HashMap<String, (UsageRecord, i64)>, Option<i64>, Vec<u64>);

async fn read_stream(url: &str, name: &str) -> Result<Option<StreamCopy>, String> {
    use async_nats::jetstream;
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(|e| format!("cannot reach NATS: {e}"))?;
    let js = jetstream::new(client);
    let mut stream = match js.get_stream(name).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(format!("reading the stream {name}: {e}")),
    };
    let state = stream
        .info()
        .await
        .map_err(|e| format!("reading the stream {name}: {e}"))?
        .state
        .clone();
    let ms = |t: async_nats::datetime::DateTime| {
        i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
    };
    let mut out = HashMap::new();
    let mut malformed = Vec::new();
    if state.messages == 0 {
        return Ok(Some((out, None, malformed)));
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("reading the stream {name}: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("reading the stream {name}: {e}"))?;
    let mut seen = 0u64;
    while seen < state.last_sequence {
        let next = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .map_err(|_| {
                format!(
                    "the stream {name} stopped delivering after seq {seen} of {}",
                    state.last_sequence
                )
            })?;
        let Some(message) = next else { break };
        let message = message.map_err(|e| format!("reading the stream {name}: {e}"))?;
        let info = message
            .info()
            .map_err(|e| format!("reading the stream {name}: {e}"))?;
        seen = info.stream_sequence;
        let published = ms(info.published);
        match serde_json::from_slice::<UsageRecord>(&message.payload) {
            Ok(r) => {
                out.insert(r.id.clone(), (r, published));
            }
            Err(_) => malformed.push(seen),
        }
    }
    Ok(Some((out, Some(ms(state.first_timestamp)), malformed)))
}

/// Restores `dir`'s backup into the scratch database and verifies it; the report says what
/// the restore holds, what is wrong, and how long it took.
async fn restore_and_verify(
    live: &PgPool,
    dir: &Path,
    manifest: &Manifest,
    target: &Target,
    args: &TargetArgs,
    backup_seconds: f64,
) -> Result<DrillReport, Failure> {
    let mut report = DrillReport {
        snapshot_at: soma_ledger::rfc3339(manifest.snapshot_at_ms),
        backup_seconds,
        ..DrillReport::default()
    };
    let scratch = soma_ledger::pool(&target.scratch_url, 2, Duration::from_secs(5))
        .map_err(|_| Failure::input("--scratch-url is not a valid PostgreSQL URL"))?;
    sqlx::query("SELECT 1")
        .execute(&scratch)
        .await
        .map_err(|e| Failure::input(format!("cannot reach the scratch database: {}", cause(&e))))?;
    // RTO runs from here to a verified restore.
    let started = Instant::now();
    let file = dir.join(BACKUP_FILE);
    let (sha256, bytes) = sha256_file(&file)
        .map_err(|e| Failure::input(format!("reading the backup {}: {e}", file.display())))?;
    if (sha256.as_str(), bytes) != (manifest.sha256.as_str(), manifest.bytes) {
        report.discrepancies.push(format!(
            "the backup file does not match its manifest (sha256 {sha256}, {bytes} bytes; the manifest says {}, {} bytes): it is corrupt or was changed after it was taken; not restored",
            manifest.sha256, manifest.bytes
        ));
        return Ok(report);
    }
    wipe_scratch(&scratch).await?;
    let mut restore = std::process::Command::new(program(args.pg_bin.as_deref(), "psql"));
    restore
        .args([
            "--no-psqlrc",
            "--quiet",
            "-v",
            "ON_ERROR_STOP=1",
            "--single-transaction",
        ])
        .arg("--file")
        .arg(&file)
        .arg("--dbname")
        .arg(&target.scratch_url)
        .stdout(std::process::Stdio::null());
    if let Err(e) = run_program(restore).await {
        report.discrepancies.push(format!(
            "restoring the backup failed: {e}: the backup is corrupt"
        ));
        return Ok(report);
    }
    report.restore_seconds = started.elapsed().as_secs_f64();
    let verify_started = Instant::now();
    let read = |e: sqlx::Error| Failure::input(format!("reading the restore: {}", cause(&e)));
    let restored_totals = totals(&scratch).await.map_err(read)?;
    report.records_restored = restored_totals.records;
    report.tokens_restored = restored_totals.tokens;
    report.cost_micros_restored = restored_totals.cost_micros;
    let expected = (
        manifest.records,
        manifest.tokens,
        manifest.cost_micros,
        manifest.seals,
    );
    let got = (
        restored_totals.records,
        restored_totals.tokens,
        restored_totals.cost_micros,
        restored_totals.seals,
    );
    if got != expected {
        report.discrepancies.push(format!(
            "the restore holds {} records, {} tokens, {} micros and {} seals; the backup's snapshot held {}, {}, {} and {}",
            got.0, got.1, got.2, got.3, expected.0, expected.1, expected.2, expected.3
        ));
    }
    if args.no_chain {
        report
            .notes
            .push("the audit chains and seals were not verified (--no-chain)".to_owned());
    } else {
        let audit = soma_ledger::audit::verify(&scratch, &Scope::All, target.trusted.as_ref())
            .await
            .map_err(read)?;
        report.chain_verified = !audit.tampered();
        for f in &audit.findings {
            let line = format!("audit chain: {}: {}", f.kind, f.message);
            if f.tampering {
                report.discrepancies.push(line);
            } else {
                report.notes.push(line);
            }
        }
        if target.trusted.is_none() {
            report.notes.push(
                "seals were checked against the key the ledger records, not one given from outside (--seal-public-key)".to_owned(),
            );
        }
    }
    let restored = records(&scratch).await.map_err(read)?;
    let stream = match &target.nats_url {
        None => None,
        Some(url) => match read_stream(url, &args.stream).await {
            Ok(Some(copy)) => Some(copy),
            Ok(None) if restored.is_empty() => {
                report.notes.push(format!(
                    "the stream {} does not exist yet, and the ledger holds no records",
                    args.stream
                ));
                Some((HashMap::new(), None, Vec::new()))
            }
            Ok(None) => {
                report.discrepancies.push(format!(
                    "the stream {} does not exist on NATS, but the ledger holds {} records: their copies are gone",
                    args.stream,
                    restored.len()
                ));
                None
            }
            Err(e) => {
                report.discrepancies.push(format!(
                    "the restore could not be reconciled with the stream: {e}"
                ));
                None
            }
        },
    };
    if let Some((_, _, malformed)) = &stream
        && !malformed.is_empty()
    {
        report.discrepancies.push(format!(
            "{} messages of the stream {} are not usage records (first: seq {})",
            malformed.len(),
            args.stream,
            malformed[0]
        ));
    }
    let restored_ids: std::collections::HashSet<&str> =
        restored.iter().map(|(r, _)| r.id.as_str()).collect();
    let stream_only: Vec<String> = stream
        .as_ref()
        .map(|(s, _, _)| {
            s.keys()
                .filter(|id| !restored_ids.contains(id.as_str()))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let live_ids = delivered(
        live,
        manifest.snapshot_at_ms - COMMIT_MARGIN_MS,
        &stream_only,
    )
    .await
    .map_err(|e| Failure::input(format!("reading the live ledger: {}", cause(&e))))?;
    let now_ms = server_now(live)
        .await
        .map_err(|e| Failure::input(format!("reading the live ledger: {}", cause(&e))))?;
    let reconciled = reconcile(&Inputs {
        restored: &restored,
        stream: stream.as_ref().map(|(s, _, _)| s),
        live: &live_ids,
        snapshot_ms: manifest.snapshot_at_ms,
        backup_done_ms: manifest.backup_done_at_ms,
        now_ms,
        grace_ms: i64::try_from(args.stream_grace_seconds.saturating_mul(1000)).unwrap_or(i64::MAX),
        stream_first_ms: stream.as_ref().and_then(|(_, first, _)| *first),
        stream_name: &args.stream,
    });
    report.stream_reconciled = stream.is_some();
    report.stream_messages = reconciled.stream_records;
    report.records_missed = reconciled.missed;
    report.rpo_seconds = reconciled.rpo_ms as f64 / 1000.0;
    report.discrepancies.extend(reconciled.discrepancies);
    report.notes.extend(reconciled.notes);
    report.verify_seconds = verify_started.elapsed().as_secs_f64();
    report.rto_seconds = started.elapsed().as_secs_f64();
    if !args.keep_scratch {
        // Leave it empty (and marked), ready for the next drill.
        if let Err(e) = wipe_scratch(&scratch).await {
            report.notes.push(format!(
                "emptying the scratch database afterwards failed: {}",
                e.message
            ));
        }
    }
    scratch.close().await;
    Ok(report)
}

/// Prints the report, writes the report file, and turns it into the exit code.
fn finish(mut report: DrillReport, args: &TargetArgs) -> Result<ExitCode, Failure> {
    report.passed = report.discrepancies.is_empty();
    if let Some(path) = &args.report_file {
        std::fs::write(path, report.bounded_json())
            .map_err(|e| Failure::input(format!("writing {}: {e}", path.display())))?;
    }
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        ),
        Output::Table => print!("{}", table(&report)),
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn table(r: &DrillReport) -> String {
    let mut out = format!(
        "drill {}\nsnapshot   {}\nbackup     {:.2} s\nrestore    {:.2} s: {} records, {} tokens, {} micros\nverify     {:.2} s: audit chain {}; stream {}\nRTO        {:.2} s (from the start of the restore to a verified restore)\nRPO        {:.2} s ({} records committed while the backup was taken are not in it)\n",
        if r.passed { "PASSED" } else { "FAILED" },
        r.snapshot_at,
        r.backup_seconds,
        r.restore_seconds,
        r.records_restored,
        r.tokens_restored,
        r.cost_micros_restored,
        r.verify_seconds,
        if r.chain_verified {
            "intact"
        } else {
            "not verified"
        },
        if r.stream_reconciled {
            format!("{} records reconciled", r.stream_messages)
        } else {
            "not reconciled".to_owned()
        },
        r.rto_seconds,
        r.rpo_seconds,
        r.records_missed,
    );
    for d in &r.discrepancies {
        out.push_str(&format!("FAILED   {d}\n"));
    }
    for n in &r.notes {
        out.push_str(&format!("note     {n}\n"));
    }
    out
}

/// Writes a failed report for a drill that could not run to the end, then fails as `f` says.
fn failed(f: Failure, args: &TargetArgs) -> Failure {
    if let Some(path) = &args.report_file {
        let report = DrillReport {
            discrepancies: vec![f.message.clone()],
            ..DrillReport::default()
        };
        let _ = std::fs::write(path, report.bounded_json());
    }
    f
}

/// `soma dr drill`: a backup, a restore into scratch, the verification, and the figures.
pub async fn drill(args: DrillArgs) -> Result<ExitCode, Failure> {
    let target = check_target(&args.target, &args.ledger).map_err(|f| failed(f, &args.target))?;
    let live = connect(&args.ledger)
        .await
        .map_err(|f| failed(f, &args.target))?;
    let url = args.ledger.database_url.clone().unwrap_or_default();
    let temp;
    let dir = match &args.backup_dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| {
                failed(
                    Failure::input(format!("creating {}: {e}", d.display())),
                    &args.target,
                )
            })?;
            d.clone()
        }
        None => {
            temp = tempfile::tempdir().map_err(|e| {
                failed(
                    Failure::input(format!("no temporary folder: {e}")),
                    &args.target,
                )
            })?;
            temp.path().to_path_buf()
        }
    };
    let started = Instant::now();
    let manifest = match take_backup(&live, &url, &dir, args.target.pg_bin.as_deref()).await {
        Ok(m) => m,
        Err(e) => {
            return finish(
                DrillReport {
                    discrepancies: vec![e],
                    ..DrillReport::default()
                },
                &args.target,
            );
        }
    };
    let backup_seconds = started.elapsed().as_secs_f64();
    let report = restore_and_verify(
        &live,
        &dir,
        &manifest,
        &target,
        &args.target,
        backup_seconds,
    )
    .await
    .map_err(|f| failed(f, &args.target))?;
    finish(report, &args.target)
}

/// `soma dr backup`: a consistent backup and its manifest.
pub async fn backup(args: BackupArgs) -> Result<ExitCode, Failure> {
    if args.out.exists() && std::fs::read_dir(&args.out).is_ok_and(|mut d| d.next().is_some()) {
        return Err(Failure::input(format!(
            "{} is not empty: give a new folder for the backup",
            args.out.display()
        )));
    }
    let live = connect(&args.ledger).await?;
    std::fs::create_dir_all(&args.out)
        .map_err(|e| Failure::input(format!("creating {}: {e}", args.out.display())))?;
    let url = args.ledger.database_url.clone().unwrap_or_default();
    let manifest = take_backup(&live, &url, &args.out, args.pg_bin.as_deref())
        .await
        .map_err(|e| Failure {
            message: e,
            code: 1,
        })?;
    println!(
        "backup of {} records ({} tokens, {} micros, {} seals) at snapshot {}: {} ({} bytes, sha256 {})",
        manifest.records,
        manifest.tokens,
        manifest.cost_micros,
        manifest.seals,
        soma_ledger::rfc3339(manifest.snapshot_at_ms),
        args.out.join(BACKUP_FILE).display(),
        manifest.bytes,
        manifest.sha256
    );
    Ok(ExitCode::SUCCESS)
}

/// `soma dr restore`: restores a backup `soma dr backup` wrote and verifies it.
pub async fn restore(args: RestoreArgs) -> Result<ExitCode, Failure> {
    let target = check_target(&args.target, &args.ledger).map_err(|f| failed(f, &args.target))?;
    let text = std::fs::read_to_string(args.backup.join(MANIFEST_FILE)).map_err(|e| {
        failed(
            Failure::input(format!(
                "reading {}: {e}: is this a folder `soma dr backup` wrote?",
                args.backup.join(MANIFEST_FILE).display()
            )),
            &args.target,
        )
    })?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| {
        failed(
            Failure::input(format!("{} is not a drill manifest: {e}", MANIFEST_FILE)),
            &args.target,
        )
    })?;
    let live = connect(&args.ledger)
        .await
        .map_err(|f| failed(f, &args.target))?;
    let report = restore_and_verify(&live, &args.backup, &manifest, &target, &args.target, 0.0)
        .await
        .map_err(|f| failed(f, &args.target))?;
    finish(report, &args.target)
}

#[cfg(test)]
mod tests {
    use super::database_of;

    #[test]
    fn the_same_database_is_recognised_in_any_spelling() {
        let a = database_of("postgres://soma:pw@localhost:5432/ledger?sslmode=disable");
        let b = database_of("postgresql://other@127.0.0.1/ledger");
        assert_eq!(a, b);
        assert_ne!(a, database_of("postgres://soma@127.0.0.1:5432/scratch"));
        assert_ne!(a, database_of("postgres://soma@127.0.0.1:5433/ledger"));
    }
}
