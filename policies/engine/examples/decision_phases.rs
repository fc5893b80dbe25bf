//! Where a decision's time goes, per built-in policy and per phase, on the built-in fixtures.
//!
//! Phases: `input` (the review converted to a regorus value, once per review), `prepare`
//! (cloning the prepared engine, timer, `set_input`), `eval` (`eval_rule` of `violation`),
//! `extract` (violations converted back to JSON). Run in release mode:
//! `cargo run --release -p soma-policy --example decision_phases [rounds]`.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::expect_used)]

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::{Duration, Instant};

use regorus::utils::limits::ExecutionTimerConfig;
use serde_json::Value;
use soma_policy::builtin::BUILTINS;
use soma_policy::{PolicyStore, Review, Sources, gatekeeper, inventory};

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(500);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../builtin");
    let mut sources = Sources::builtins();
    sources.add_text(
        "fixture-constraints.yaml",
        &std::fs::read_to_string(dir.join("fixture-constraints.yaml")).unwrap(),
    );
    let (store, _) = PolicyStore::loaded(&sources);
    let objects = gatekeeper::documents(
        &std::fs::read_to_string(dir.join("fixture-inventory.yaml")).unwrap(),
        "inv",
    )
    .unwrap();
    let inv = inventory::from_objects(&objects);
    let set = store.current();

    // One prepared engine per built-in, as soma_policy::set::Compiled does.
    let mut engines = BTreeMap::new();
    for b in BUILTINS {
        let mut e = regorus::Engine::new();
        e.set_rego_v0(false);
        let pkg = e.add_policy(format!("{}.rego", b.name), b.rego.to_owned()).unwrap();
        e.add_data(regorus::Value::from(serde_json::json!({"inventory": inv})))
            .unwrap();
        e.set_input(regorus::Value::from(serde_json::json!({"review": {}, "parameters": {}})));
        let _ = e.eval_rule(format!("{pkg}.violation"));
        engines.insert(b.kind, (e, format!("{pkg}.violation")));
    }
    let params: BTreeMap<&str, regorus::Value> = set
        .constraints()
        .iter()
        .map(|c| (BUILTINS.iter().find(|b| b.kind == c.kind).unwrap().kind, regorus::Value::from(c.parameters.clone())))
        .collect();

    let mut reviews = Vec::new();
    for b in BUILTINS {
        for sub in ["valid", "invalid"] {
            let mut files: Vec<_> = std::fs::read_dir(dir.join(b.name).join("fixtures").join(sub))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            for f in files {
                let doc: Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
                reviews.push(Review::of_object(doc["object"].clone()));
            }
        }
    }

    // (policy, phase) -> total ns
    let mut totals: BTreeMap<(String, &str), u128> = BTreeMap::new();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut input_ns = 0u128;
    let mut whole_ns = 0u128;
    let limit = Duration::from_secs(1);
    for _ in 0..rounds {
        for r in &reviews {
            let w = Instant::now();
            let t = Instant::now();
            let review_value = regorus::Value::from(r.to_input());
            input_ns += t.elapsed().as_nanos();
            for c in set.constraints() {
                let applies = c.matches.kinds.iter().any(|k| k.kinds.iter().any(|x| *x == r.kind));
                if !applies {
                    continue;
                }
                let (engine, entry) = &engines[c.kind.as_str()];
                let t0 = Instant::now();
                let mut map = BTreeMap::new();
                map.insert(regorus::Value::from("review"), review_value.clone());
                map.insert(regorus::Value::from("parameters"), params[c.kind.as_str()].clone());
                let input = regorus::Value::from(map);
                let mut e = engine.clone();
                e.set_execution_timer_config(ExecutionTimerConfig {
                    limit,
                    check_interval: NonZeroU32::MIN.saturating_add(63),
                });
                e.set_input(input);
                let t1 = Instant::now();
                let v = e.eval_rule(entry.clone()).unwrap();
                let t2 = Instant::now();
                let mut out = Vec::new();
                if let regorus::Value::Set(s) = &v {
                    for x in s.iter() {
                        out.push(serde_json::to_value(x).unwrap());
                    }
                }
                std::hint::black_box(out);
                let t3 = Instant::now();
                *totals.entry((c.kind.clone(), "prepare")).or_default() += (t1 - t0).as_nanos();
                *totals.entry((c.kind.clone(), "eval")).or_default() += (t2 - t1).as_nanos();
                *totals.entry((c.kind.clone(), "extract")).or_default() += (t3 - t2).as_nanos();
                *counts.entry(c.kind.clone()).or_default() += 1;
            }
            whole_ns += w.elapsed().as_nanos();
        }
    }
    let n = (rounds * reviews.len()) as f64;
    println!("{} reviews x {rounds} rounds", reviews.len());
    println!("input (once per review): {:.2} us mean", input_ns as f64 / n / 1e3);
    println!("whole decision (this harness): {:.2} us mean", whole_ns as f64 / n / 1e3);
    println!("| policy | evaluations | prepare us | eval us | extract us |");
    for (kind, count) in &counts {
        let f = |p| totals[&(kind.clone(), p)] as f64 / *count as f64 / 1e3;
        println!("| {kind} | {count} | {:.2} | {:.2} | {:.2} |", f("prepare"), f("eval"), f("extract"));
    }
}
