//! Policy benchmark: decision latency in process, and full AdmissionReview round trips over
//! HTTPS at a fixed rate against the webhook running in this process (127.0.0.1).
//!
//! Inputs are the built-in policies' fixtures (`policies/builtin/*/fixtures`), evaluated
//! against the built-ins as configured by `fixture-constraints.yaml`. Every in-process
//! decision is about a distinct object (the fixture with its own `metadata.uid`), so nothing
//! one decision computed can serve another; each is made twice, interleaved: as Soma decides
//! (regorus' VM where it answers as the interpreter does) and by the interpreter alone (the
//! same-run peer), and the two decisions must be equal. Ends with one line
//! `RESULT policy key=value ...`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};
use soma_admission::client::Client;
use soma_admission::tls::{self, CertBundle, SwappableCert};
use soma_admission::{Config, State, router};
use soma_policy::{EvalMode, PolicyStore, Review, Sources, gatekeeper, inventory};

/// mimalloc rather than the system allocator: a policy decision allocates a few thousand
/// times (regorus' values, register windows and rule metadata), and glibc's malloc and free
/// were about 15 % of a decision's instructions (docs/benchmarks.md, "Policy").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Soma policy decision and admission latency")]
struct Args {
    /// Repository root (for policies/builtin).
    #[arg(long, default_value = ".")]
    repo: PathBuf,
    /// In-process decisions per fixture.
    #[arg(long, default_value_t = 2000)]
    iterations: usize,
    /// AdmissionReviews per second.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Client connections (the API server keeps several open).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Keep the schedule with Tokio's timer, as this benchmark did before 2026-12-07: it fires
    /// on whole milliseconds, so requests leave up to a millisecond late (reported as
    /// `generator_late_*`), and that is counted as the webhook's latency.
    #[arg(long)]
    tokio_timer: bool,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn load_store(repo: &Path) -> Result<PolicyStore> {
    let dir = repo.join("policies/builtin");
    let mut sources = Sources::builtins();
    let text = std::fs::read_to_string(dir.join("fixture-constraints.yaml")).context(
        "reading fixture-constraints.yaml (run from the repository root or pass --repo)",
    )?;
    sources.add_text("fixture-constraints.yaml", &text);
    let (store, report) = PolicyStore::loaded(&sources);
    if !report.is_clean() {
        bail!("policies did not load: {:?}", report.errors);
    }
    let inv = std::fs::read_to_string(dir.join("fixture-inventory.yaml"))?;
    let objects = gatekeeper::documents(&inv, "inventory")?;
    store.set_inventory(inventory::from_objects(&objects))?;
    Ok(store)
}

fn fixtures(repo: &Path) -> Result<Vec<(String, Value)>> {
    let mut out = Vec::new();
    for b in soma_policy::builtin::BUILTINS {
        for sub in ["valid", "invalid"] {
            let dir = repo
                .join("policies/builtin")
                .join(b.name)
                .join("fixtures")
                .join(sub);
            let mut files: Vec<_> = std::fs::read_dir(&dir)?
                .flatten()
                .map(|e| e.path())
                .collect();
            files.sort();
            for f in files {
                let doc: Value = serde_json::from_str(&std::fs::read_to_string(&f)?)?;
                out.push((format!("{}/{sub}", b.name), doc["object"].clone()));
            }
        }
    }
    Ok(out)
}

fn admission_review(uid: usize, object: &Value) -> Vec<u8> {
    let kind = object["kind"].as_str().unwrap_or_default();
    // Field order as the API server writes it.
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("bench-{uid}"),
            "kind": {"group": "soma.dev", "version": "v1alpha1", "kind": kind},
            "resource": {"group": "soma.dev", "version": "v1alpha1", "resource": format!("{}s", kind.to_lowercase())},
            "name": object["metadata"]["name"],
            "namespace": object["metadata"]["namespace"],
            "operation": "CREATE",
            "userInfo": {"username": "bench"},
            "object": object,
            "dryRun": false
        }
    });
    serde_json::to_vec(&review).unwrap_or_default()
}

fn main() -> Result<()> {
    let args = Args::parse();
    let store = Arc::new(load_store(&args.repo)?);
    let objects = fixtures(&args.repo)?;
    let set = store.current();
    let deadline = Duration::from_secs(1);

    // In process: each decision about a distinct object, Soma's way and the interpreter's,
    // interleaved so that both see the same machine.
    let distinct = |o: &Value, round: usize, i: usize| {
        let mut o = o.clone();
        if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("uid".to_owned(), json!(format!("bench-{round}-{i}")));
        }
        Review::of_object(o)
    };
    for round in 0..50 {
        for (i, (_, o)) in objects.iter().enumerate() {
            for mode in [EvalMode::Auto, EvalMode::InterpreterOnly] {
                std::hint::black_box(set.evaluate_with(&distinct(o, round, i), deadline, mode));
            }
        }
    }
    let mut all = Vec::with_capacity(objects.len() * args.iterations);
    let mut peer = Vec::with_capacity(objects.len() * args.iterations);
    let mut by_kind: std::collections::BTreeMap<String, (Vec<f64>, Vec<f64>)> = Default::default();
    let (mut vm_decided, mut constraint_evaluations) = (0usize, 0usize);
    for round in 0..args.iterations {
        for (i, (name, o)) in objects.iter().enumerate() {
            let r = distinct(o, 2 * round + 100, i);
            let t = Instant::now();
            let d = set.evaluate_with(&r, deadline, EvalMode::Auto);
            let us = t.elapsed().as_secs_f64() * 1e6;
            let r2 = distinct(o, 2 * round + 101, i);
            let t = Instant::now();
            let d2 = set.evaluate_with(&r2, deadline, EvalMode::InterpreterOnly);
            let us2 = t.elapsed().as_secs_f64() * 1e6;
            if (&d.violations, &d.failures) != (&d2.violations, &d2.failures) {
                bail!("{name}: the decision differs from the interpreter's:\n{d:?}\n{d2:?}");
            }
            vm_decided += d.vm_decided;
            constraint_evaluations += d.evaluated;
            all.push(us);
            peer.push(us2);
            let k = by_kind.entry(r.kind.clone()).or_default();
            k.0.push(us);
            k.1.push(us2);
        }
    }
    all.sort_by(f64::total_cmp);
    peer.sort_by(f64::total_cmp);
    println!(
        "in-process decision ({} fixtures x {} iterations, {} constraints, each decision a distinct object): p50 {:.1} us, p99 {:.1} us, max {:.1} us; interpreter alone (same run): p50 {:.1} us, p99 {:.1} us; regorus VM decided {} of {} constraint evaluations, the interpreter the rest; every decision equal to the interpreter's",
        objects.len(),
        args.iterations,
        set.constraints().len(),
        percentile(&all, 50.0),
        percentile(&all, 99.0),
        all.last().copied().unwrap_or(f64::NAN),
        percentile(&peer, 50.0),
        percentile(&peer, 99.0),
        vm_decided,
        constraint_evaluations,
    );
    for (kind, (v, p)) in &mut by_kind {
        v.sort_by(f64::total_cmp);
        p.sort_by(f64::total_cmp);
        println!(
            "  {kind:<8} p50 {:.1} us  p99 {:.1} us   (interpreter p50 {:.1} us  p99 {:.1} us)",
            percentile(v, 50.0),
            percentile(v, 99.0),
            percentile(p, 50.0),
            percentile(p, 99.0)
        );
    }

    // Over HTTPS at a fixed rate.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (lat, errors, sent, elapsed, late) = runtime.block_on(async {
        let bundle = CertBundle::generate(&["soma-webhook.soma-system.svc".to_owned()])?;
        let cert = SwappableCert::new(&bundle)?;
        let state = State::new(store.clone(), Config::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(tls::serve(
            listener,
            router(state),
            tls::server_config(cert),
            std::future::pending(),
        ));
        let client_tls = tls::client_config(&bundle.ca_pem)?;
        let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
            objects
                .iter()
                .enumerate()
                .map(|(i, (_, o))| admission_review(i, o))
                .collect(),
        );

        // Warm up each connection.
        let mut clients = Vec::new();
        for _ in 0..args.connections.max(1) {
            let mut c =
                Client::connect(addr, "soma-webhook.soma-system.svc", client_tls.clone()).await?;
            for b in bodies.iter() {
                c.post("/validate", b.clone()).await?;
            }
            clients.push(c);
        }
        // Open loop: request i is due at start + i/rate; latency counts from when it was due,
        // so a stalled server cannot hide queueing (no coordinated omission). The schedule is
        // kept by a thread of its own sleeping to each due time (the kernel's high-resolution
        // timers): Tokio's timer wheel fires on whole milliseconds, so a schedule kept by
        // `sleep_until` would send each request up to a millisecond after it was due and count
        // that as the webhook's latency. How late the generator itself sent is reported apart.
        let total = (args.rate as usize) * (args.seconds as usize);
        let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Result<f64, String>>();
        let shared_rx = Arc::new(tokio::sync::Mutex::new(rx));
        for mut c in clients {
            let shared_rx = shared_rx.clone();
            let bodies = bodies.clone();
            let done_tx = done_tx.clone();
            tokio::spawn(async move {
                loop {
                    let next = { shared_rx.lock().await.recv().await };
                    let Some((i, due)) = next else { break };
                    let body = bodies[i % bodies.len()].clone();
                    let r = match c.post("/validate", body).await {
                        Ok((200, _)) => Ok(due.elapsed().as_secs_f64() * 1e3),
                        Ok((s, _)) => Err(format!("HTTP {s}")),
                        Err(e) => Err(e.to_string()),
                    };
                    let _ = done_tx.send(r);
                }
            });
        }
        drop(done_tx);
        let wall = Instant::now();
        let start = Instant::now() + Duration::from_millis(20);
        let due = move |i: usize| start + interval * u32::try_from(i).unwrap_or(u32::MAX);
        let late = if args.tokio_timer {
            let mut late = Vec::with_capacity(total);
            for i in 0..total {
                tokio::time::sleep_until(due(i).into()).await;
                late.push(due(i).elapsed().as_secs_f64() * 1e6);
                let _ = tx.send((i, due(i)));
            }
            drop(tx);
            late
        } else {
            // Its own thread (not a runtime worker, which it would keep busy for the run).
            tokio::task::spawn_blocking(move || {
                let mut late = Vec::with_capacity(total);
                for i in 0..total {
                    let now = Instant::now();
                    if due(i) > now {
                        std::thread::sleep(due(i) - now);
                    }
                    late.push(due(i).elapsed().as_secs_f64() * 1e6);
                    let _ = tx.send((i, due(i)));
                }
                late
            })
            .await
            .map_err(|_| anyhow::anyhow!("the load generator panicked"))?
        };
        let mut lat = Vec::with_capacity(total);
        let mut errors = 0usize;
        while let Some(r) = done_rx.recv().await {
            match r {
                Ok(ms) => lat.push(ms),
                Err(e) => {
                    if errors == 0 {
                        eprintln!("first error: {e}");
                    }
                    errors += 1;
                }
            }
        }
        anyhow::Ok((lat, errors, total, wall.elapsed(), late))
    })?;
    let mut lat = lat;
    lat.sort_by(f64::total_cmp);
    let mut late = late;
    late.sort_by(f64::total_cmp);
    let (late_p50, late_p99) = (percentile(&late, 50.0), percentile(&late, 99.0));
    let p50 = percentile(&lat, 50.0);
    let p99 = percentile(&lat, 99.0);
    println!(
        "AdmissionReview over HTTPS, {} req/s for {} s over {} connections: {} sent, {} errors, achieved {:.0} req/s; p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        args.rate,
        args.seconds,
        args.connections,
        sent,
        errors,
        sent as f64 / elapsed.as_secs_f64(),
        p50,
        p99,
        lat.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  the generator sent each request after its due time by p50 {late_p50:.0} us, p99 {late_p99:.0} us (counted in the latencies above)"
    );
    println!(
        "RESULT policy decision_p50_us={:.1} decision_p99_us={:.1} admission_p50_ms={:.3} admission_p99_ms={:.3} rate_rps={} requests={} errors={} constraints={} fixtures={} aim_decision_p99_us=50 aim_admission_p99_ms=2 interpreter_decision_p50_us={:.1} interpreter_decision_p99_us={:.1} vm_share={:.3} generator_late_p50_us={late_p50:.0} generator_late_p99_us={late_p99:.0}",
        percentile(&all, 50.0),
        percentile(&all, 99.0),
        p50,
        p99,
        args.rate,
        sent,
        errors,
        set.constraints().len(),
        objects.len(),
        percentile(&peer, 50.0),
        percentile(&peer, 99.0),
        vm_decided as f64 / constraint_evaluations.max(1) as f64,
    );
    Ok(())
}
