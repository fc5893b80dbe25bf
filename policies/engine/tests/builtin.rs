//! The built-in policies: their Rego unit tests, and their valid and invalid fixtures.

mod common;

use std::time::Duration;

use soma_policy::builtin::BUILTINS;
use soma_policy::{Review, regotest};

#[test]
fn rego_unit_tests_pass() {
    let mut total = 0;
    let mut failed = Vec::new();
    for b in BUILTINS {
        let outcomes = regotest::run(&[(b.name, b.rego)], (&format!("{}_test", b.name), b.tests))
            .unwrap_or_else(|e| panic!("{}: {e}", b.name));
        assert!(
            outcomes.len() >= 5,
            "{} has only {} tests",
            b.name,
            outcomes.len()
        );
        for o in outcomes {
            total += 1;
            if !o.passed {
                failed.push(format!("{} {:?}", o.name, o.error));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {total} Rego tests failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    eprintln!("{total} Rego test_ rules passed");
}

#[test]
fn regotest_reports_a_failing_rule() {
    let policy = "package p\nallow if input.x == 1\n";
    let tests = "package p_test\nimport data.p\ntest_ok if p.allow with input as {\"x\": 1}\ntest_wrong if p.allow with input as {\"x\": 2}\n";
    let out = regotest::run(&[("p", policy)], ("p_test", tests)).unwrap();
    assert_eq!(out.len(), 2);
    assert!(out[0].passed);
    assert!(!out[1].passed);
}

#[test]
fn fixtures_valid_pass_and_invalid_are_denied_with_their_messages() {
    let store = common::fixture_store();
    let set = store.current();
    let mut checked = 0;
    for (policy, valid, file, doc) in common::fixtures() {
        let review = Review::of_object(doc["object"].clone());
        let decision = set.evaluate(&review, Duration::from_secs(5));
        assert!(
            decision.failures.is_empty(),
            "{policy}/{file}: {:?}",
            decision.failures
        );
        if valid {
            assert!(
                decision.allowed(),
                "{policy}/{file} should pass: {:?}",
                decision.deny_messages()
            );
            assert!(
                decision.violations.is_empty(),
                "{policy}/{file}: {:?}",
                decision.violations
            );
        } else {
            assert!(!decision.allowed(), "{policy}/{file} should be denied");
            let messages = decision.deny_messages().join("\n");
            for want in doc["expect"].as_array().unwrap() {
                let want = want.as_str().unwrap();
                assert!(
                    messages.contains(want),
                    "{policy}/{file}: no message contains {want:?}:\n{messages}"
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 30);
}

#[test]
fn the_examples_pass_the_default_policies() {
    let (store, report) = soma_policy::PolicyStore::loaded(&soma_policy::Sources::builtins());
    assert!(report.is_clean(), "{:?}", report.errors);
    assert_eq!(report.constraints.len(), BUILTINS.len());
    let examples = std::path::Path::new(
        &std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()),
    )
    .join("../../examples");
    let mut objects = Vec::new();
    for f in [
        "budget.yaml",
        "agent.yaml",
        "capsule.yaml",
        "job.yaml",
        "vault/agent.yaml",
        "vault/agent-approle.yaml",
    ] {
        let text = std::fs::read_to_string(examples.join(f)).unwrap();
        objects.extend(soma_policy::gatekeeper::documents(&text, f).unwrap());
    }
    store
        .set_inventory(soma_policy::inventory::from_objects(&objects))
        .unwrap();
    let set = store.current();
    for obj in objects {
        let d = set.evaluate(&Review::of_object(obj.clone()), Duration::from_secs(5));
        assert!(
            d.allowed() && d.violations.is_empty(),
            "{}: {:?}",
            obj["metadata"]["name"],
            d
        );
    }
}
