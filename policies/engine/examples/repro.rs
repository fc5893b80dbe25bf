#![allow(clippy::unwrap_used, clippy::print_stdout)]
//! usage: repro <policy.rego> <input.json> [data.json] — prints interpreter vs VM for data.p.x
use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::RegoVM;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let src = std::fs::read_to_string(&args[1]).unwrap();
    let input = regorus::Value::from_json_str(&std::fs::read_to_string(&args[2]).unwrap()).unwrap();
    let data = args
        .get(3)
        .map(|d| regorus::Value::from_json_str(&std::fs::read_to_string(d).unwrap()).unwrap());
    let entry = std::env::var("ENTRY").unwrap_or_else(|_| "data.p.x".into());
    let mut e = regorus::Engine::new();
    e.add_policy("p.rego".into(), src).unwrap();
    if let Some(d) = &data {
        e.add_data(d.clone()).unwrap();
    }
    e.set_input(input.clone());
    let a = e
        .eval_rule(entry.clone())
        .map(|v| v.to_json_str().unwrap().replace(['\n', ' '], ""));
    let cp = e.compile_with_entrypoint(&entry.as_str().into()).unwrap();
    let prog = Compiler::compile_from_policy(&cp, &[entry.as_str()]).unwrap();
    let mut vm = RegoVM::new_with_policy(cp);
    vm.load_program(prog);
    vm.set_strict_builtin_errors(std::env::var("LAX").is_err());
    if let Some(d) = data {
        vm.set_data(d).unwrap();
    }
    vm.set_input(input);
    let b = vm
        .execute()
        .map(|v| v.to_json_str().unwrap().replace(['\n', ' '], ""));
    println!(
        "interpreter {a:?}\nvm          {b:?}\n{}",
        if format!("{a:?}") == format!("{b:?}") {
            "same"
        } else {
            "DIFFERENT"
        }
    );
}
