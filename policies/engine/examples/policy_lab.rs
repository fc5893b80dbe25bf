//! Differential lab for one built-in: the reference Rego (tests/reference) against a
//! candidate, in the interpreter, and the candidate in the interpreter against the VM, over
//! the fixtures and their single-point mutations. Also times each fixture.
//! usage: policy_lab <builtin-name> [candidate.rego] [quick|full]
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::expect_used)]

#[path = "../tests/common/mutate.rs"]
mod mutate;

use std::path::Path;
use std::time::Instant;

use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::RegoVM;
use serde_json::Value;
use soma_policy::builtin::BUILTINS;
use soma_policy::{PolicyStore, Review, Sources, gatekeeper, inventory};

struct Eng {
    engine: regorus::Engine,
    cp: regorus::CompiledPolicy,
    prog: std::sync::Arc<regorus::rvm::Program>,
    entry: String,
    typed: Option<String>,
    data: regorus::Value,
}

impl Eng {
    fn new(rego: &str, data: &regorus::Value) -> Self {
        let mut e = regorus::Engine::new();
        e.set_rego_v0(false);
        let pkg = e.add_policy("p.rego".into(), rego.to_owned()).unwrap();
        e.add_data(data.clone()).unwrap();
        let entry = format!("{pkg}.violation");
        let typed = rego.contains("\nvm_violation :=").then(|| format!("{pkg}.vm_violation"));
        let cp = e.compile_with_entrypoint(&entry.clone().into()).unwrap();
        let mut entries = vec![];
        if let Some(t) = &typed { entries.push(t.as_str()); } else { entries.push(entry.as_str()); }
        let prog = Compiler::compile_from_policy(&cp, &entries).unwrap();
        e.set_input(regorus::Value::from(serde_json::json!({"review": {}, "parameters": {}})));
        let _ = e.eval_rule(entry.clone());
        Self { engine: e, cp, prog, entry, typed, data: data.clone() }
    }
    fn interp(&self, input: &regorus::Value) -> Result<regorus::Value, String> {
        let mut e = self.engine.clone();
        e.set_input(input.clone());
        e.eval_rule(self.entry.clone()).map_err(|e| e.to_string())
    }
    /// `params_typed`, as Soma evaluates it once per constraint (interpreter).
    fn params_ok(&self, input: &regorus::Value) -> bool {
        if self.typed.is_none() { return true; }
        let mut e = self.engine.clone();
        let mut m = std::collections::BTreeMap::new();
        m.insert(regorus::Value::from("parameters"), input["parameters"].clone());
        e.set_input(regorus::Value::from(m));
        matches!(e.eval_rule(self.entry.replace(".violation", ".params_typed")), Ok(regorus::Value::Bool(true)))
    }
    fn vm(&self, input: &regorus::Value) -> Result<regorus::Value, String> {
        let mut vm = RegoVM::new_with_policy(self.cp.clone());
        vm.load_program(self.prog.clone());
        vm.set_strict_builtin_errors(true);
        vm.set_data(self.data.clone()).map_err(|e| e.to_string())?;
        vm.set_input(input.clone());
        let v = vm.execute().map_err(|e| e.to_string())?;
        if self.typed.is_some() && v == regorus::Value::Undefined { return Err("untyped".into()); }
        Ok(v)
    }
}

fn norm(r: &Result<regorus::Value, String>) -> String {
    match r {
        Ok(regorus::Value::Undefined) => "[]".into(),
        Ok(v) => v.to_json_str().unwrap().replace(['\n', ' '], ""),
        Err(e) => format!("ERROR {}", e.lines().filter(|l| l.starts_with("error")).collect::<Vec<_>>().join(" ")),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let name = args[1].as_str();
    let b = BUILTINS.iter().find(|b| b.name == name).unwrap();
    let file = b.file;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let reference = std::fs::read_to_string(root.join("tests/reference").join(format!("{file}.rego"))).unwrap();
    let candidate = match args.get(2) {
        Some(p) if p != "-" => std::fs::read_to_string(p).unwrap(),
        _ => b.rego.to_owned(),
    };
    let depth = if args.get(3).map(String::as_str) == Some("full") { mutate::Depth::Full } else { mutate::Depth::Quick };
    let dir = root.join("../builtin");
    let mut sources = Sources::builtins();
    sources.add_text("f", &std::fs::read_to_string(dir.join("fixture-constraints.yaml")).unwrap());
    let (store, _) = PolicyStore::loaded(&sources);
    let objects = gatekeeper::documents(&std::fs::read_to_string(dir.join("fixture-inventory.yaml")).unwrap(), "inv").unwrap();
    let data = regorus::Value::from(serde_json::json!({"inventory": inventory::from_objects(&objects)}));
    let set = store.current();
    let params = set.constraints().iter().find(|c| c.kind == b.kind).unwrap().parameters.clone();
    let default_params = b.default_constraint().unwrap().parameters;
    let r = Eng::new(&reference, &data);
    let c = Eng::new(&candidate, &data);

    let mut fixtures = Vec::new();
    for bb in BUILTINS {
        for sub in ["valid", "invalid"] {
            let mut files: Vec<_> = std::fs::read_dir(dir.join(bb.name).join("fixtures").join(sub)).unwrap().map(|e| e.unwrap().path()).collect();
            files.sort();
            for f in files {
                let doc: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
                fixtures.push((format!("{}/{sub}/{}", bb.name, f.file_name().unwrap().to_string_lossy()), doc["object"].clone()));
            }
        }
    }
    let input = |obj: &Value, p: &Value| {
        let review = Review::of_object(obj.clone()).to_input();
        regorus::Value::from(serde_json::json!({"review": review, "parameters": p}))
    };
    if let Ok(only) = std::env::var("VMLOOP") {
        let (_, obj) = fixtures.iter().find(|(n, _)| n.contains(&only)).unwrap();
        let inp = input(obj, &params);
        let engine = std::env::var("ENGINE").unwrap_or_default();
        for _ in 0..2000 { if engine == "interp" { std::hint::black_box(c.interp(&inp).ok()); } else { std::hint::black_box(c.vm(&inp).ok()); } }
        return;
    }
    // Timing on the fixtures this policy applies to.
    println!("| fixture | reference interp us | candidate interp us | candidate vm us |");
    for (fname, obj) in &fixtures {
        let k = obj["kind"].as_str().unwrap_or("");
        let applies = matches!((b.name, k), ("images" | "sandbox" | "egress" | "budget-ref", "Agent" | "Job") | ("capsules", "Capsule") | ("budget-parent", "Budget"));
        if !applies { continue; }
        let inp = input(obj, &params);
        let n = 300;
        let time = |f: &dyn Fn() -> Result<regorus::Value, String>| { let t = Instant::now(); for _ in 0..n { std::hint::black_box(f()); } t.elapsed().as_secs_f64() * 1e6 / n as f64 };
        let tr = time(&|| r.interp(&inp));
        let tc = time(&|| c.interp(&inp));
        let tv = time(&|| c.vm(&inp));
        println!("| {fname} | {tr:.1} | {tc:.1} | {tv:.1} |");
        if std::env::var("OVERHEAD").is_ok() { vm_overhead(&c, &inp); }
    }
    // Differential.
    let mut cases: Vec<(String, regorus::Value)> = Vec::new();
    for (fname, obj) in &fixtures {
        for (pname, p) in [("fixture", &params), ("default", &default_params)] {
            cases.push((format!("{fname} params={pname}"), input(obj, p)));
        }
        for (i, v) in mutate::variants(obj, depth).into_iter().enumerate() {
            cases.push((format!("{fname} object-variant {i}"), input(&v, &params)));
        }
        for (i, p) in mutate::variants(&params, mutate::Depth::Full).into_iter().chain(mutate::variants(&default_params, mutate::Depth::Full)).enumerate() {
            cases.push((format!("{fname} param-variant {i}"), input(obj, &p)));
        }
    }
    let (mut d_ref, mut d_vm, mut shown, mut typed, mut err_text) = (0, 0, 0, 0, 0);
    let t = Instant::now();
    for (label, inp) in &cases {
        let a = norm(&r.interp(inp));
        let bb = norm(&c.interp(inp));
        let v = if c.params_ok(inp) { c.vm(inp) } else { Err("params untyped".into()) };
        let vv = norm(&v);
        let both_err = a.starts_with("ERROR") && bb.starts_with("ERROR");
        if both_err && a != bb { err_text += 1; }
        let a = if both_err { bb.clone() } else { a };
        if a != bb { d_ref += 1; }
        if v.is_ok() && vv != bb { d_vm += 1; }
        if v.is_ok() { typed += 1; }
        if (a != bb || (v.is_ok() && vv != bb)) && shown < std::env::var("SHOW").map(|s| s.parse().unwrap()).unwrap_or(6) && (std::env::var("NOERR").is_err() || !bb.starts_with("ERROR")) && (std::env::var("REFONLY").is_err() || a != bb) {
            shown += 1;
            println!("DIVERGENCE {label}\n  input     {}\n  reference {a}\n  candidate {bb}\n  vm        {vv}", inp.to_json_str().unwrap().replace(['\n', ' '], "").chars().take(900).collect::<String>());
        }
    }
    println!("{} cases in {:.1} s: reference/candidate divergences {d_ref}, candidate interp/vm divergences {d_vm} (vm answered {typed}); both failed with different errors: {err_text}", cases.len(), t.elapsed().as_secs_f64());
}

#[allow(dead_code)]
fn vm_overhead(c: &Eng, inp: &regorus::Value) {
    let n = 2000;
    let t = Instant::now();
    for _ in 0..n { let mut vm = RegoVM::new_with_policy(c.cp.clone()); vm.load_program(c.prog.clone()); std::hint::black_box(&vm); }
    let a = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let mut vm = RegoVM::new_with_policy(c.cp.clone()); vm.load_program(c.prog.clone());
    let t = Instant::now();
    for _ in 0..n { vm.set_data(c.data.clone()).unwrap(); }
    let b = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    vm.set_input(inp.clone());
    let t = Instant::now();
    for _ in 0..n { std::hint::black_box(vm.execute().unwrap()); }
    let d = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("vm new+load {a:.2} us, set_data {b:.2} us, execute (reused vm) {d:.2} us");
}
