//! Every CEL rule on the CRDs, evaluated with a CEL interpreter (kube-cel) against valid and
//! invalid objects, transition rules (`oldSelf`) included, so that a wrong rule fails here
//! rather than in a user's cluster. Rules are also checked to compile and to stay within the
//! API server's cost budget.

mod common;

use serde_json::{Value, json};

use common::{Edit, edited};

fn cel(kind: &str, object: &Value, old: Option<&Value>) -> Vec<String> {
    match kube_cel::Validator::new().validate(&common::schema_for(kind), object, old) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

/// One row: the kind, edits making the new object, edits making the old object (for
/// transition rules), and the message expected, or `None` when the object must be accepted.
struct Case {
    name: &'static str,
    kind: &'static str,
    new: Vec<Edit>,
    old: Option<Vec<Edit>>,
    expect: Option<&'static str>,
}

fn cases() -> Vec<Case> {
    let c = |name, kind, new, old, expect| Case {
        name,
        kind,
        new,
        old,
        expect,
    };
    vec![
        // Agent
        c(
            "replicas in order",
            "Agent",
            vec![
                ("/spec/scaling/minReplicas", Some(json!(2))),
                ("/spec/scaling/maxReplicas", Some(json!(4))),
            ],
            None,
            None,
        ),
        c(
            "min above max",
            "Agent",
            vec![
                ("/spec/scaling/minReplicas", Some(json!(5))),
                ("/spec/scaling/maxReplicas", Some(json!(2))),
            ],
            None,
            Some("minReplicas must not exceed"),
        ),
        c(
            "min above the defaulted max",
            "Agent",
            vec![("/spec/scaling", Some(json!({"minReplicas": 3})))],
            None,
            Some("minReplicas must not exceed"),
        ),
        // Scale to zero: only an Agent without a port (a worker woken by Jobs).
        c(
            "scale to zero with a port",
            "Agent",
            vec![
                ("/spec/scaling/minReplicas", Some(json!(0))),
                ("/spec/scaling/maxReplicas", Some(json!(3))),
            ],
            None,
            Some("minReplicas 0 is only for an Agent without a port"),
        ),
        c(
            "scale to zero for a worker",
            "Agent",
            vec![
                ("/spec/port", None),
                (
                    "/spec/scaling",
                    Some(json!({"minReplicas": 0, "maxReplicas": 1,
                                "idleToZeroSeconds": 120, "coldStartHoldSeconds": 30})),
                ),
            ],
            None,
            None,
        ),
        c(
            "idle period without scale to zero",
            "Agent",
            vec![(
                "/spec/scaling",
                Some(json!({"minReplicas": 1, "maxReplicas": 3, "idleToZeroSeconds": 120})),
            )],
            None,
            Some("idleToZeroSeconds applies only to an Agent that may scale to zero"),
        ),
        c(
            "cold-start hold without scale to zero",
            "Agent",
            vec![(
                "/spec/scaling",
                Some(json!({"minReplicas": 2, "maxReplicas": 3, "coldStartHoldSeconds": 10})),
            )],
            None,
            Some("coldStartHoldSeconds applies only to an Agent that may scale to zero"),
        ),
        c(
            "downgrade without a model",
            "Agent",
            vec![(
                "/spec/scaling",
                Some(json!({"minReplicas": 1, "maxReplicas": 3, "brownOutAction": "downgrade"})),
            )],
            None,
            Some("brownOutAction downgrade needs scaling.brownOutModel"),
        ),
        c(
            "a brown-out model without downgrade",
            "Agent",
            vec![(
                "/spec/scaling",
                Some(json!({"minReplicas": 1, "maxReplicas": 3, "brownOutModel": "gpt-4o-mini"})),
            )],
            None,
            Some("brownOutModel is used only with scaling.brownOutAction downgrade"),
        ),
        c(
            "downgrade to a named model",
            "Agent",
            vec![(
                "/spec/scaling",
                Some(
                    json!({"minReplicas": 1, "maxReplicas": 3, "brownOutAction": "downgrade",
                            "brownOutModel": "gpt-4o-mini"}),
                ),
            )],
            None,
            None,
        ),
        c(
            "negative idle period",
            "Agent",
            vec![
                ("/spec/port", None),
                (
                    "/spec/scaling",
                    Some(json!({"minReplicas": 0, "maxReplicas": 3, "idleToZeroSeconds": -1})),
                ),
            ],
            None,
            Some("idleToZeroSeconds must be between 0 and 86400"),
        ),
        // Every autoscaler knob: the edges that are allowed, and one value past each.
        c(
            "every knob at a valid value",
            "Agent",
            vec![(
                "/spec/scaling",
                Some(json!({
                    "minReplicas": 1, "maxReplicas": 8, "targetP95WaitMs": 800,
                    "maxUtilisation": 0.85, "waitHeadroom": 1.0, "slotsPerReplica": 4,
                    "conductance": {"alpha": 0.0, "beta": 0.01, "tauSeconds": 30},
                    "estimator": {"arrivalTauSeconds": 60, "serviceRequests": 1, "priorServiceTimeMs": 1500},
                    "backlogDrainSeconds": 15, "floorHoldSeconds": 0, "reversalHoldSeconds": 0,
                    "brownOutAction": "downgrade", "brownOutModel": "gpt-4o-mini"})),
            )],
            None,
            None,
        ),
        c(
            "utilisation of 1",
            "Agent",
            vec![("/spec/scaling/maxUtilisation", Some(json!(1.0)))],
            None,
            Some("maxUtilisation must be greater than 0 and less than 1"),
        ),
        c(
            "utilisation of 0",
            "Agent",
            vec![("/spec/scaling/maxUtilisation", Some(json!(0.0)))],
            None,
            Some("maxUtilisation must be greater than 0 and less than 1"),
        ),
        c(
            "headroom above 1",
            "Agent",
            vec![("/spec/scaling/waitHeadroom", Some(json!(1.5)))],
            None,
            Some("waitHeadroom must be greater than 0 and at most 1"),
        ),
        c(
            "headroom of 0",
            "Agent",
            vec![("/spec/scaling/waitHeadroom", Some(json!(0.0)))],
            None,
            Some("waitHeadroom must be greater than 0 and at most 1"),
        ),
        c(
            "no slots",
            "Agent",
            vec![("/spec/scaling/slotsPerReplica", Some(json!(0)))],
            None,
            Some("slotsPerReplica must be between 1 and 1024"),
        ),
        c(
            "negative alpha",
            "Agent",
            vec![("/spec/scaling/conductance", Some(json!({"alpha": -0.1})))],
            None,
            Some("conductance.alpha must be between 0 and 10"),
        ),
        c(
            "zero beta",
            "Agent",
            vec![("/spec/scaling/conductance", Some(json!({"beta": 0.0})))],
            None,
            Some("conductance.beta must be greater than 0"),
        ),
        c(
            "zero tau",
            "Agent",
            vec![("/spec/scaling/conductance", Some(json!({"tauSeconds": 0})))],
            None,
            Some("conductance.tauSeconds must be between 1 and 86400"),
        ),
        c(
            "zero arrival memory",
            "Agent",
            vec![(
                "/spec/scaling/estimator",
                Some(json!({"arrivalTauSeconds": 0})),
            )],
            None,
            Some("estimator.arrivalTauSeconds must be between 1 and 86400"),
        ),
        c(
            "zero service memory",
            "Agent",
            vec![(
                "/spec/scaling/estimator",
                Some(json!({"serviceRequests": 0})),
            )],
            None,
            Some("estimator.serviceRequests must be between 1 and 1000000"),
        ),
        c(
            "zero prior service time",
            "Agent",
            vec![(
                "/spec/scaling/estimator",
                Some(json!({"priorServiceTimeMs": 0})),
            )],
            None,
            Some("estimator.priorServiceTimeMs must be between 1 and 3600000"),
        ),
        c(
            "zero backlog drain",
            "Agent",
            vec![("/spec/scaling/backlogDrainSeconds", Some(json!(0)))],
            None,
            Some("backlogDrainSeconds must be between 1 and 3600"),
        ),
        c(
            "negative cold-start hold",
            "Agent",
            vec![
                ("/spec/port", None),
                (
                    "/spec/scaling",
                    Some(json!({"minReplicas": 0, "maxReplicas": 2, "coldStartHoldSeconds": -5})),
                ),
            ],
            None,
            Some("coldStartHoldSeconds must be between 0 and 86400"),
        ),
        c(
            "provider key in env",
            "Agent",
            vec![(
                "/spec/env",
                Some(json!([{"name": "OPENAI_API_KEY", "value": "sk-x"}])),
            )],
            None,
            Some("provider API keys must not be set"),
        ),
        c(
            "ordinary env",
            "Agent",
            vec![(
                "/spec/env",
                Some(json!([{"name": "OPENAI_MODEL", "value": "x"}])),
            )],
            None,
            None,
        ),
        c(
            "compatible without endpoint",
            "Agent",
            vec![(
                "/spec/model",
                Some(json!({"provider": "openaiCompatible", "name": "llama"})),
            )],
            None,
            Some("endpoint is required"),
        ),
        c(
            "compatible with endpoint",
            "Agent",
            vec![(
                "/spec/model",
                Some(
                    json!({"provider": "openaiCompatible", "name": "llama", "endpoint": "http://vllm.models:8000/v1"}),
                ),
            )],
            None,
            None,
        ),
        c(
            "endpoint not http",
            "Agent",
            vec![("/spec/model/endpoint", Some(json!("ftp://models")))],
            None,
            Some("must be an http(s) URL"),
        ),
        c(
            "endpoint with a query",
            "Agent",
            vec![(
                "/spec/model/endpoint",
                Some(json!(
                    "https://res.openai.azure.com/openai?api-version=2024-02-01"
                )),
            )],
            None,
            Some("must not carry a query"),
        ),
        c(
            "two credential sources",
            "Agent",
            vec![(
                "/spec/credentials/vault",
                Some(json!({"path": "secret/data/openai", "key": "api-key"})),
            )],
            None,
            Some("exactly one of secretRef or vault"),
        ),
        c(
            "no credential source",
            "Agent",
            vec![("/spec/credentials", Some(json!({})))],
            None,
            Some("exactly one of secretRef or vault"),
        ),
        c(
            "vault with AppRole from a Secret",
            "Agent",
            vec![(
                "/spec/credentials",
                Some(json!({"vault": {"path": "x", "key": "k", "auth": "appRole",
                    "appRole": {"secretName": "bot-approle"}}})),
            )],
            None,
            None,
        ),
        c(
            "AppRole without its Secret",
            "Agent",
            vec![(
                "/spec/credentials",
                Some(json!({"vault": {"path": "x", "key": "k", "auth": "appRole"}})),
            )],
            None,
            Some(
                "credentials.vault.appRole (the Secret holding the AppRole role id and secret id) is required with auth: appRole",
            ),
        ),
        c(
            "an AppRole Secret with Kubernetes auth",
            "Agent",
            vec![(
                "/spec/credentials",
                Some(
                    json!({"vault": {"path": "x", "key": "k", "auth": "kubernetes",
                    "appRole": {"secretName": "bot-approle"}}}),
                ),
            )],
            None,
            Some("is required with auth: appRole, and only then"),
        ),
        c(
            "ledger credentials from Vault",
            "Agent",
            vec![
                (
                    "/spec/credentials",
                    Some(json!({"vault": {"path": "x", "key": "k"}})),
                ),
                (
                    "/spec/ledgerCredentials",
                    Some(json!({"vault": {"role": "soma-ledger"}})),
                ),
            ],
            None,
            None,
        ),
        c(
            "ledger credentials without a Vault login",
            "Agent",
            vec![("/spec/ledgerCredentials", Some(json!({"vault": {}})))],
            None,
            Some("ledgerCredentials.vault logs in to Vault as credentials.vault does"),
        ),
        c(
            "egress host and cidr",
            "Agent",
            vec![(
                "/spec/sandbox/egress",
                Some(json!([{"host": "api.github.com", "cidr": "10.0.0.0/8"}])),
            )],
            None,
            Some("exactly one of cidr or host"),
        ),
        c(
            "egress bad cidr",
            "Agent",
            vec![(
                "/spec/sandbox/egress",
                Some(json!([{"cidr": "10.0.0.0/33"}])),
            )],
            None,
            Some("valid CIDR"),
        ),
        // Capsule
        c("capsule unchanged", "Capsule", vec![], Some(vec![]), None),
        c(
            "capsule revoked later",
            "Capsule",
            vec![("/spec/revoked", Some(json!(true)))],
            Some(vec![]),
            None,
        ),
        c(
            "capsule version changed",
            "Capsule",
            vec![("/spec/version", Some(json!("2026.12.0")))],
            Some(vec![]),
            Some("spec.version is immutable"),
        ),
        c(
            "capsule digest changed",
            "Capsule",
            vec![(
                "/spec/source/oci/digest",
                Some(json!(format!("sha256:{}", "a".repeat(64)))),
            )],
            Some(vec![]),
            Some("spec.source is immutable"),
        ),
        c(
            "capsule two sources",
            "Capsule",
            vec![(
                "/spec/source/inline",
                Some(json!({"blocks": [{"id": "a", "text": "t"}]})),
            )],
            None,
            Some("exactly one of oci, inline or configMapRef"),
        ),
        c(
            "capsule no source",
            "Capsule",
            vec![("/spec/source", Some(json!({})))],
            None,
            Some("exactly one of oci, inline or configMapRef"),
        ),
        c(
            "capsule no signer",
            "Capsule",
            vec![("/spec/signature", Some(json!({})))],
            None,
            Some("publicKeyRef or keyless"),
        ),
        c(
            "capsule keyless signer",
            "Capsule",
            vec![(
                "/spec/signature",
                Some(
                    json!({"keyless": {"issuer": "https://accounts.example.com", "subject": "ci@example.com"}}),
                ),
            )],
            None,
            None,
        ),
        c(
            "capsule kept in qdrant (an OCI bundle)",
            "Capsule",
            vec![("/spec/index", Some(json!("qdrant")))],
            None,
            None,
        ),
        c(
            "capsule embedded, whatever its source",
            "Capsule",
            vec![
                ("/spec/index", Some(json!("embedded"))),
                ("/spec/source/oci", None),
                (
                    "/spec/source/inline",
                    Some(json!({"blocks": [{"id": "a", "text": "t"}]})),
                ),
            ],
            None,
            None,
        ),
        c(
            "capsule kept in qdrant without a bundle",
            "Capsule",
            vec![
                ("/spec/index", Some(json!("qdrant"))),
                ("/spec/source/oci", None),
                (
                    "/spec/source/inline",
                    Some(json!({"blocks": [{"id": "a", "text": "t"}]})),
                ),
            ],
            None,
            Some("spec.index qdrant needs an OCI source"),
        ),
        // Budget
        c(
            "budget without limits",
            "Budget",
            vec![("/spec/limits", Some(json!({})))],
            None,
            Some("at least one limit"),
        ),
        c(
            "budget with rate limit only",
            "Budget",
            vec![("/spec/limits", Some(json!({"requestsPerMinute": 60})))],
            None,
            None,
        ),
        c(
            "budget both periods",
            "Budget",
            vec![("/spec/period/rolling", Some(json!("24h")))],
            None,
            Some("exactly one of calendar or rolling"),
        ),
        c(
            "budget rolling with zone",
            "Budget",
            vec![(
                "/spec/period",
                Some(json!({"rolling": "24h", "timeZone": "UTC"})),
            )],
            None,
            Some("timeZone applies to calendar"),
        ),
        c(
            "budget rolling",
            "Budget",
            vec![("/spec/period", Some(json!({"rolling": "7d"})))],
            None,
            None,
        ),
        c(
            "budget brown-out without model",
            "Budget",
            vec![("/spec/onExhausted", Some(json!({"action": "BrownOut"})))],
            None,
            Some("brownOutModel is required"),
        ),
        c(
            "budget deny",
            "Budget",
            vec![("/spec/onExhausted", Some(json!({"action": "Deny"})))],
            None,
            None,
        ),
        c(
            "budget threshold zero",
            "Budget",
            vec![("/spec/thresholds", Some(json!([0, 80])))],
            None,
            Some("percentages between 1 and 100"),
        ),
        c(
            "budget threshold above 100",
            "Budget",
            vec![("/spec/thresholds", Some(json!([150])))],
            None,
            Some("percentages between 1 and 100"),
        ),
        c(
            "budget grants namespaces and any",
            "Budget",
            vec![("/spec/allowedChildNamespaces", Some(json!(["team-a", "*"])))],
            None,
            None,
        ),
        c(
            "budget grant that is not a namespace",
            "Budget",
            vec![("/spec/allowedChildNamespaces", Some(json!(["Team_A"])))],
            None,
            Some("allowedChildNamespaces entries are namespace names or '*'"),
        ),
        c(
            "budget parent in another namespace",
            "Budget",
            vec![(
                "/spec/parentRef",
                Some(json!({"namespace": "platform", "name": "acme"})),
            )],
            None,
            None,
        ),
        // Job
        c(
            "job zero deadline",
            "Job",
            vec![("/spec/deadlineSeconds", Some(json!(0)))],
            None,
            Some("deadlineSeconds must be positive"),
        ),
        c(
            "job negative deadline",
            "Job",
            vec![("/spec/deadlineSeconds", Some(json!(-5)))],
            None,
            Some("deadlineSeconds must be positive"),
        ),
        c(
            "job two targets",
            "Job",
            vec![(
                "/spec/template",
                Some(
                    json!({"image": "x@sha256:00", "model": {"provider": "openai", "name": "gpt-4o-mini"}}),
                ),
            )],
            None,
            Some("exactly one of agentRef, template or drDrill"),
        ),
        c(
            "job no target",
            "Job",
            vec![("/spec/agentRef", None)],
            None,
            Some("exactly one of agentRef, template or drDrill"),
        ),
        c(
            "job inline template",
            "Job",
            vec![
                ("/spec/agentRef", None),
                (
                    "/spec/template",
                    Some(
                        json!({"image": "x@sha256:00", "model": {"provider": "openai", "name": "gpt-4o-mini"}}),
                    ),
                ),
            ],
            None,
            None,
        ),
        c(
            "job template's own rules apply",
            "Job",
            vec![
                ("/spec/agentRef", None),
                (
                    "/spec/template",
                    Some(
                        json!({"image": "x", "model": {"provider": "openai", "name": "m"}, "scaling": {"minReplicas": 2}}),
                    ),
                ),
            ],
            None,
            Some("minReplicas must not exceed"),
        ),
        c(
            "job spec changed",
            "Job",
            vec![("/spec/input", Some(json!("something else")))],
            Some(vec![]),
            Some("spec is immutable"),
        ),
        c("job unchanged", "Job", vec![], Some(vec![]), None),
        c(
            "job with a Kueue queue",
            "Job",
            vec![("/spec/queueName", Some(json!("team-a")))],
            None,
            None,
        ),
        c(
            "job queue that is not a name",
            "Job",
            vec![("/spec/queueName", Some(json!("Team A")))],
            None,
            Some("queueName must be the name of a Kueue LocalQueue"),
        ),
        c(
            "job task with a schedule",
            "Job",
            vec![("/spec/schedule", Some(json!("0 3 * * *")))],
            None,
            Some("schedule is for DR drills only"),
        ),
        c(
            "scheduled drill",
            "Job",
            drill(vec![("/spec/schedule", Some(json!("0 3 * * *")))]),
            None,
            None,
        ),
        c(
            "drill on a macro schedule",
            "Job",
            drill(vec![("/spec/schedule", Some(json!("@daily")))]),
            None,
            None,
        ),
        c(
            "drill on a schedule of four fields",
            "Job",
            drill(vec![("/spec/schedule", Some(json!("0 3 * *")))]),
            None,
            Some("schedule must be a cron schedule"),
        ),
        c(
            "drill with an input",
            "Job",
            drill(vec![("/spec/input", Some(json!("restore it")))]),
            None,
            Some("a DR drill calls no model"),
        ),
        c(
            "drill with a Budget",
            "Job",
            drill(vec![("/spec/budgetRef", Some(json!({"name": "team"})))]),
            None,
            Some("a DR drill calls no model"),
        ),
        c(
            "job name too long for its batch Job",
            "Job",
            vec![("/metadata/name", Some(json!("x".repeat(53))))],
            None,
            Some("at most 52 characters"),
        ),
        c(
            "job name of 52 characters",
            "Job",
            vec![("/metadata/name", Some(json!("x".repeat(52))))],
            None,
            None,
        ),
    ]
}

/// Edits turning the example task Job into a drill, then `more`.
fn drill(more: Vec<Edit>) -> Vec<Edit> {
    let mut edits = vec![
        ("/spec/agentRef", None),
        ("/spec/input", None),
        ("/spec/budgetRef", None),
        (
            "/spec/drDrill",
            Some(json!({"scratchSecretRef": {"name": "scratch", "key": "url"}})),
        ),
    ];
    edits.extend(more);
    edits
}

#[test]
fn cel_rules_accept_and_reject_as_intended() {
    let mut failures = Vec::new();
    for case in cases() {
        let new = edited(case.kind, &case.new);
        let old = case.old.as_ref().map(|edits| edited(case.kind, edits));
        let errors = cel(case.kind, &new, old.as_ref());
        let ok = match case.expect {
            None => errors.is_empty(),
            Some(msg) => errors.len() == 1 && errors[0].contains(msg),
        };
        if !ok {
            failures.push(format!(
                "{} ({}): expected {:?}, got {errors:?}",
                case.name, case.kind, case.expect
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "CEL rules misbehave:\n{}",
        failures.join("\n")
    );
}

/// Every rule in every CRD: collected with the schema node it sits on.
fn rules_with_nodes(node: &Value, out: &mut Vec<(String, Value)>) {
    if let Some(rules) = node
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for rule in rules {
            out.push((
                rule["rule"].as_str().unwrap_or_default().to_owned(),
                node.clone(),
            ));
        }
    }
    match node {
        Value::Object(map) => map.values().for_each(|v| rules_with_nodes(v, out)),
        Value::Array(items) => items.iter().for_each(|v| rules_with_nodes(v, out)),
        _ => {}
    }
}

#[test]
fn every_rule_compiles_and_stays_within_the_cost_budget() {
    let mut checked = 0;
    for kind in ["Agent", "Budget", "Capsule", "Job"] {
        let mut rules = Vec::new();
        rules_with_nodes(&common::schema_for(kind), &mut rules);
        for (rule, node) in rules {
            let compiled = kube_cel::compile_schema(&node);
            assert!(
                !compiled.has_errors(),
                "{kind}: rule `{rule}` does not compile: {:?}",
                compiled.compilation_errors()
            );
            // Cost and bounds only: kube-cel's scope check flags macro variables (`e` in
            // `self.all(e, ...)`) as out of scope, a false positive.
            let warnings = kube_cel::estimate_rule_cost(&rule, &compiled);
            assert!(warnings.is_empty(), "{kind}: rule `{rule}`: {warnings:?}");
            checked += 1;
        }
    }
    // Every rule in cases() is tied to a real rule: guard against rules silently vanishing.
    assert!(checked >= 17, "only {checked} CEL rules found");
}
