//! Loading brought policies, reloading without ever serving a broken set, actions, deadlines.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use soma_policy::{Action, PolicyError, PolicyStore, Review, Sources};

const TEMPLATE_V0: &str = r#"
apiVersion: templates.gatekeeper.sh/v1
kind: ConstraintTemplate
metadata: {name: somamodelallowlist}
spec:
  crd: {spec: {names: {kind: SomaModelAllowList}}}
  targets:
  - target: admission.k8s.gatekeeper.sh
    rego: |
      package somamodelallowlist
      violation[{"msg": msg}] {
        model := input.review.object.spec.model.name
        not allowed(model)
        msg := sprintf("model %v is not on the allow-list %v", [model, input.parameters.models])
      }
      allowed(m) { input.parameters.models[_] == m }
"#;

fn constraint(name: &str, action: &str, models: &[&str]) -> String {
    format!(
        "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: SomaModelAllowList\nmetadata: {{name: {name}}}\nspec:\n  enforcementAction: {action}\n  match: {{kinds: [{{apiGroups: [soma.dev], kinds: [Agent]}}]}}\n  parameters: {{models: {models:?}}}\n"
    )
}

fn agent(model: &str) -> Review {
    Review::of_object(json!({
        "apiVersion": "soma.dev/v1alpha1", "kind": "Agent",
        "metadata": {"name": "a", "namespace": "research"},
        "spec": {"image": "registry.example.com/a@sha256:0d7c1f5e2b8a4c3d9e6f7a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d",
                 "model": {"provider": "openai", "name": model}, "budgetRef": {"name": "team"}}
    }))
}

fn config_map(docs: &[&str]) -> Sources {
    let mut data = BTreeMap::new();
    for (i, d) in docs.iter().enumerate() {
        data.insert(format!("policy-{i}.yaml"), (*d).to_owned());
    }
    let mut s = Sources::builtins();
    s.add_config_map("soma-system", "platform-policies", &data);
    s
}

const DEADLINE: Duration = Duration::from_secs(5);

#[test]
fn brought_template_with_parameters_and_actions() {
    let deny = constraint("models", "deny", &["gpt-4o"]);
    let warn = constraint("models-warn", "warn", &["gpt-4o-mini"]);
    let dry = constraint("models-dry", "dryrun", &["claude-sonnet-4-5"]);
    let (store, report) = PolicyStore::loaded(&config_map(&[TEMPLATE_V0, &deny, &warn, &dry]));
    assert!(report.is_clean(), "{:?}", report.errors);
    let set = store.current();

    let d = set.evaluate(&agent("gpt-4o"), DEADLINE);
    assert!(d.allowed(), "{d:?}");
    assert_eq!(
        d.warnings(),
        vec![
            "[SomaModelAllowList/models-warn] model gpt-4o is not on the allow-list [\"gpt-4o-mini\"]"
        ]
    );
    assert_eq!(d.with_action(Action::Dryrun).count(), 1);

    let d = set.evaluate(&agent("o1"), DEADLINE);
    assert!(!d.allowed());
    assert_eq!(d.deny_messages().len(), 1);
    assert!(d.deny_messages()[0].starts_with("[SomaModelAllowList/models] model o1"));
}

#[test]
fn a_template_that_stops_compiling_keeps_its_last_good_version() {
    let c = constraint("models", "deny", &["gpt-4o"]);
    let (store, report) = PolicyStore::loaded(&config_map(&[TEMPLATE_V0, &c]));
    assert!(report.is_clean());

    let broken = TEMPLATE_V0.replace("not allowed(model)", "not allowed(model");
    let report = store.load(&config_map(&[&broken, &c]));
    assert_eq!(report.errors.len(), 1);
    assert!(
        matches!(report.errors[0], PolicyError::Compile { .. }),
        "{:?}",
        report.errors
    );
    assert_eq!(report.errors[0].label(), "PolicyCompileError");
    assert_eq!(report.kept_previous, vec!["template SomaModelAllowList"]);
    // Still enforced with the last good Rego, and the built-ins are untouched.
    let d = store.current().evaluate(&agent("o1"), DEADLINE);
    assert!(!d.allowed());
    assert!(
        report
            .constraints
            .contains(&"SomaImages/soma-images".to_owned())
    );
}

#[test]
fn a_new_template_that_does_not_compile_is_reported_and_skipped() {
    let broken = TEMPLATE_V0.replace("violation[", "violation[[");
    let c = constraint("models", "deny", &["gpt-4o"]);
    let (store, report) = PolicyStore::loaded(&config_map(&[&broken, &c]));
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert!(store.current().evaluate(&agent("o1"), DEADLINE).allowed());
    assert_eq!(
        report.constraints.len(),
        soma_policy::builtin::BUILTINS.len()
    );
}

#[test]
fn unknown_kinds_bad_actions_and_garbage_are_reported() {
    let unknown = "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: NoSuchTemplate\nmetadata: {name: x}\n";
    let bad_action = constraint("models", "shout", &["gpt-4o"]);
    let (_store, report) = PolicyStore::loaded(&config_map(&[
        TEMPLATE_V0,
        unknown,
        &bad_action,
        "{not yaml: [",
    ]));
    let labels: Vec<_> = report.errors.iter().map(PolicyError::label).collect();
    assert!(labels.contains(&"UnknownConstraintKind"), "{labels:?}");
    assert!(
        labels
            .iter()
            .filter(|l| **l == "InvalidPolicyDocument")
            .count()
            >= 2,
        "{:?}",
        report.errors
    );
}

#[test]
fn a_constraint_replaces_the_builtin_default() {
    let own = "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: SomaImages\nmetadata: {name: only-ghcr}\nspec:\n  enforcementAction: warn\n  parameters: {allowedRegistries: [ghcr.io/acme]}\n";
    let (store, report) = PolicyStore::loaded(&config_map(&[own]));
    assert!(report.is_clean(), "{:?}", report.errors);
    assert!(
        !report
            .constraints
            .contains(&"SomaImages/soma-images".to_owned())
    );
    let d = store.current().evaluate(&agent("gpt-4o"), DEADLINE);
    assert!(d.allowed());
    assert_eq!(d.warnings().len(), 1, "{d:?}");
}

#[test]
fn rego_v1_template_through_code_field() {
    let t = std::fs::read_to_string(format!(
        "{}/../suites/agent-max-replicas/template.yaml",
        std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned())
    ))
    .unwrap();
    let c = std::fs::read_to_string(format!(
        "{}/../suites/agent-max-replicas/constraint.yaml",
        std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned())
    ))
    .unwrap();
    let (store, report) = PolicyStore::loaded(&config_map(&[&t, &c]));
    assert!(report.is_clean(), "{:?}", report.errors);
    let mut big = agent("gpt-4o");
    big.object["spec"]["scaling"] = json!({"maxReplicas": 40});
    let d = store.current().evaluate(&big, DEADLINE);
    assert!(
        d.deny_messages()[0].contains("asks for up to 40 replicas"),
        "{d:?}"
    );
}

#[test]
fn the_deadline_stops_a_runaway_policy_and_fails_closed() {
    let slow = r#"
apiVersion: templates.gatekeeper.sh/v1
kind: ConstraintTemplate
metadata: {name: slow}
spec:
  crd: {spec: {names: {kind: Slow}}}
  targets:
  - target: admission.k8s.gatekeeper.sh
    code:
    - engine: Rego
      source:
        version: v1
        rego: |
          package slow
          violation contains {"msg": "never"} if {
            some i in numbers.range(1, 600)
            some j in numbers.range(1, 600)
            i * j == -1
          }
"#;
    let c = "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: Slow\nmetadata: {name: s}\n";
    let mut sources = Sources::default();
    sources.add_text("slow.yaml", slow);
    sources.add_text("c.yaml", c);
    let (store, report) = PolicyStore::loaded(&sources);
    assert!(report.is_clean(), "{:?}", report.errors);
    let d = store
        .current()
        .evaluate(&agent("x"), Duration::from_millis(20));
    assert_eq!(d.failures.len(), 1, "{d:?}");
    eprintln!("{:?}", d.failures);
    assert!(!d.allowed());
    assert!(d.deny_messages()[0].contains("could not be evaluated"));
    let cond = soma_policy::condition::policy_allowed(&d);
    assert_eq!((cond.status, cond.reason), ("False", "PolicyError"));
}

#[test]
fn policy_allowed_condition() {
    let (store, _) = PolicyStore::loaded(&Sources::builtins());
    let d = store.current().evaluate(&agent("gpt-4o"), DEADLINE);
    let c = soma_policy::condition::policy_allowed(&d);
    assert_eq!((c.status, c.reason), ("True", "Allowed"));
    let mut bad = agent("gpt-4o");
    bad.object["spec"]["image"] = json!("nginx:latest");
    let c = soma_policy::condition::policy_allowed(&store.current().evaluate(&bad, DEADLINE));
    assert_eq!((c.status, c.reason), ("False", "Denied"));
    assert!(c.message.contains("not pinned by digest"));
}

#[test]
fn v0_templates_with_future_keywords_and_rego_v1_imports_load() {
    for import in [
        "import future.keywords.in\nimport future.keywords.if\nimport future.keywords.contains",
        "import future.keywords",
        "import rego.v1",
    ] {
        let t = format!(
            "apiVersion: templates.gatekeeper.sh/v1\nkind: ConstraintTemplate\nmetadata: {{name: fk}}\nspec:\n  crd: {{spec: {{names: {{kind: Fk}}}}}}\n  targets:\n  - target: admission.k8s.gatekeeper.sh\n    rego: |\n      package fk\n      {}\n      violation contains {{\"msg\": msg}} if {{\n        some m in input.parameters.denied\n        input.review.object.spec.model.name == m\n        msg := sprintf(\"model %v is denied\", [m])\n      }}\n",
            import.replace('\n', "\n      ")
        );
        let c = "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: Fk\nmetadata: {name: fk}\nspec:\n  parameters: {denied: [o1]}\n";
        let mut s = Sources::default();
        s.add_text("t.yaml", &t);
        s.add_text("c.yaml", c);
        let (store, report) = PolicyStore::loaded(&s);
        assert!(report.is_clean(), "{import}: {:?}", report.errors);
        let d = store.current().evaluate(&agent("o1"), DEADLINE);
        assert_eq!(
            d.deny_messages(),
            vec!["[Fk/fk] model o1 is denied"],
            "{import}"
        );
    }
}

#[test]
fn a_namespace_selector_reads_the_namespace_labels_from_the_inventory() {
    // The namespace's labels are looked up only when a constraint has a namespaceSelector.
    let selected = "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: SomaModelAllowList\nmetadata: {name: models-in-prod}\nspec:\n  match:\n    kinds: [{apiGroups: [soma.dev], kinds: [Agent]}]\n    namespaceSelector: {matchLabels: {tier: prod}}\n  parameters: {models: [gpt-4o]}\n";
    let (store, report) = PolicyStore::loaded(&config_map(&[TEMPLATE_V0, selected]));
    assert!(report.is_clean(), "{:?}", report.errors);
    let namespace = |tier: &str| {
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "research", "labels": {"tier": tier}}})
    };

    store
        .set_inventory(soma_policy::inventory::from_objects(&[namespace("prod")]))
        .unwrap();
    let fired = |d: &soma_policy::Decision| {
        d.violations
            .iter()
            .any(|v| v.policy == "SomaModelAllowList/models-in-prod")
    };
    let d = store.current().evaluate(&agent("o1"), DEADLINE);
    assert!(fired(&d), "{d:?}");
    assert!(!d.allowed(), "{d:?}");

    store
        .set_inventory(soma_policy::inventory::from_objects(&[namespace("dev")]))
        .unwrap();
    let d = store.current().evaluate(&agent("o1"), DEADLINE);
    assert!(!fired(&d), "{d:?}");
}
