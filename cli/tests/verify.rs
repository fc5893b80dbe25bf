//! `soma policy verify` and `soma policy test` as a user runs them.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::path::{Path, PathBuf};
use std::process::Command;

fn soma() -> Command {
    Command::new(env!("CARGO_BIN_EXE_soma"))
}

fn repo() -> PathBuf {
    Path::new(
        &std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()),
    )
    .join("..")
}

fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn the_shipped_suites_pass() {
    let (code, out) = run(soma()
        .args(["policy", "verify", "-v"])
        .arg(repo().join("policies/suites")));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("3 suite(s): 12 passed, 0 failed, 0 skipped"),
        "{out}"
    );
    assert!(out.contains("ok    "), "{out}");
}

#[test]
fn dot_dot_dot_and_single_file_and_run_filter() {
    let dir = repo().join("policies/suites");
    let (code, out) = run(soma()
        .args(["policy", "verify"])
        .arg(format!("{}/...", dir.display())));
    assert_eq!(code, 0, "{out}");
    let (code, out) = run(soma()
        .args(["policy", "verify", "--run", "big$"])
        .arg(dir.join("agent-max-replicas/suite.yaml")));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 suite(s): 1 passed"), "{out}");
}

fn write(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("soma-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_wrong_expectation_fails_with_the_messages() {
    let dir = scratch("wrong");
    let suites = repo().join("policies/suites/required-labels");
    for f in [
        "template.yaml",
        "constraint.yaml",
        "samples/unlabelled.yaml",
    ] {
        write(&dir, f, &std::fs::read_to_string(suites.join(f)).unwrap());
    }
    write(
        &dir,
        "suite.yaml",
        "kind: Suite\napiVersion: test.gatekeeper.sh/v1alpha1\ntests:\n- name: t\n  template: template.yaml\n  constraint: constraint.yaml\n  cases:\n  - name: expects-none\n    object: samples/unlabelled.yaml\n    assertions: [{violations: no}]\n  - name: default-is-yes\n    object: samples/unlabelled.yaml\n",
    );
    let (code, out) = run(soma().args(["policy", "verify"]).arg(&dir));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL") && out.contains("t/expects-none"),
        "{out}"
    );
    assert!(out.contains("you must provide labels"), "{out}");
    assert!(out.contains("1 passed, 1 failed"), "{out}");
}

#[test]
fn a_template_that_does_not_compile_fails_its_test() {
    let dir = scratch("broken");
    write(
        &dir,
        "template.yaml",
        "apiVersion: templates.gatekeeper.sh/v1\nkind: ConstraintTemplate\nmetadata: {name: broken}\nspec:\n  crd: {spec: {names: {kind: Broken}}}\n  targets:\n  - target: admission.k8s.gatekeeper.sh\n    rego: |\n      package broken\n      violation[{\"msg\": msg}] {\n        msg := \n      }\n",
    );
    write(
        &dir,
        "constraint.yaml",
        "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: Broken\nmetadata: {name: b}\n",
    );
    write(
        &dir,
        "obj.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    );
    write(
        &dir,
        "suite.yaml",
        "kind: Suite\napiVersion: test.gatekeeper.sh/v1alpha1\ntests:\n- name: t\n  template: template.yaml\n  constraint: constraint.yaml\n  cases:\n  - name: c\n    object: obj.yaml\n",
    );
    let (code, out) = run(soma().args(["policy", "verify"]).arg(&dir));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("does not compile"), "{out}");
}

#[test]
fn bad_paths_exit_2() {
    let (code, out) = run(soma().args(["policy", "verify", "/nonexistent/soma"]));
    assert_eq!(code, 2, "{out}");
    let empty = scratch("empty");
    let (code, out) = run(soma().args(["policy", "verify"]).arg(&empty));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no Suite files"), "{out}");
}

#[test]
fn rego_tests_of_a_builtin_run() {
    let (code, out) = run(soma()
        .args(["policy", "test"])
        .arg(repo().join("policies/builtin/egress")));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("PASS  data.soma.egress_test.test_good_rules_pass"),
        "{out}"
    );
}
