//! Where a decision's time goes: evaluates the built-in fixtures with the built-ins as the
//! benchmark configures them, for a profiler to read.
//!
//! ```sh
//! cargo build --release -p soma-policy --example decision_phases
//! valgrind --tool=callgrind target/release/examples/decision_phases 200 hosts-and-cidr
//! callgrind_annotate --inclusive=yes callgrind.out.<pid>
//! ```
//!
//! Arguments: rounds (default 200), a fixture-name filter (default: every fixture), and
//! `interpreter` to evaluate with the interpreter alone. Each decision is about a distinct
//! object, as in `bench/policy`. Prints the mean wall time per decision.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use soma_policy::builtin::BUILTINS;
use soma_policy::{EvalMode, PolicyStore, Review, Sources, gatekeeper, inventory};

/// mimalloc rather than the system allocator: a policy decision allocates a few thousand
/// times (regorus' values, register windows and rule metadata), and glibc's malloc and free
/// were about 15 % of a decision's instructions (docs/benchmarks.md, "Policy").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args.get(1).map_or(200, |s| s.parse().expect("rounds"));
    let filter = args.get(2).cloned().unwrap_or_default();
    let mode = if args.get(3).map(String::as_str) == Some("interpreter") {
        EvalMode::InterpreterOnly
    } else {
        EvalMode::Auto
    };
    let dir = Path::new(
        &std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()),
    )
    .join("../builtin");
    let mut sources = Sources::builtins();
    sources.add_text(
        "fixture-constraints.yaml",
        &std::fs::read_to_string(dir.join("fixture-constraints.yaml")).unwrap(),
    );
    let (store, report) = PolicyStore::loaded(&sources);
    assert!(report.is_clean(), "{:?}", report.errors);
    let objects = gatekeeper::documents(
        &std::fs::read_to_string(dir.join("fixture-inventory.yaml")).unwrap(),
        "inventory",
    )
    .unwrap();
    store
        .set_inventory(inventory::from_objects(&objects))
        .unwrap();
    let set = store.current();

    let mut fixtures = Vec::new();
    for b in BUILTINS {
        for sub in ["valid", "invalid"] {
            let mut files: Vec<_> = std::fs::read_dir(dir.join(b.name).join("fixtures").join(sub))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            for f in files {
                let name = format!(
                    "{}/{sub}/{}",
                    b.name,
                    f.file_name().unwrap().to_string_lossy()
                );
                if name.contains(&filter) {
                    let doc: Value =
                        serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
                    fixtures.push((name, doc["object"].clone()));
                }
            }
        }
    }
    let mut total = Duration::ZERO;
    let mut n = 0u32;
    let mut each = vec![Vec::new(); fixtures.len()];
    for round in 0..rounds {
        for (i, (_, object)) in fixtures.iter().enumerate() {
            let mut object = object.clone();
            object["metadata"]["uid"] = json!(format!("{round}-{i}"));
            let review = Review::of_object(object);
            let t = Instant::now();
            std::hint::black_box(set.evaluate_with(&review, Duration::from_secs(1), mode));
            let dt = t.elapsed();
            total += dt;
            each[i].push(dt.as_secs_f64() * 1e6);
            n += 1;
        }
    }
    if std::env::var_os("PER_FIXTURE").is_some() {
        for ((name, _), times) in fixtures.iter().zip(&mut each) {
            times.sort_by(f64::total_cmp);
            println!("{:>8.1} us median  {name}", times[times.len() / 2]);
        }
    }
    println!(
        "{n} decisions ({} fixtures), {:?}: {:.1} us each on average",
        fixtures.len(),
        mode,
        total.as_secs_f64() * 1e6 / f64::from(n.max(1))
    );
}
