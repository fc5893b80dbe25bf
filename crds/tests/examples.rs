//! Every manifest in `examples/` is valid against the generated CRD schemas: the OpenAPI
//! schema (checked by a JSON Schema validator), the CEL rules (evaluated by kube-cel, with
//! schema defaults applied first as the API server does), and the Rust types.

mod common;

use serde_json::Value;

fn schema_errors(kind: &str, object: &Value) -> Vec<String> {
    let schema = common::schema_for(kind);
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft4)
        .build(&schema)
        .expect("the generated schema is a valid JSON Schema");
    validator
        .iter_errors(object)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

fn cel_errors(kind: &str, object: &Value) -> Vec<String> {
    match kube_cel::Validator::new().validate(&common::schema_for(kind), object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn there_is_an_example_of_every_kind() {
    let kinds: Vec<String> = common::example_documents()
        .into_iter()
        .map(|(_, v)| v["kind"].as_str().unwrap_or_default().to_owned())
        .collect();
    for kind in ["Agent", "Capsule", "Budget", "Job"] {
        assert!(kinds.iter().any(|k| k == kind), "examples/ has no {kind}");
    }
}

#[test]
fn examples_validate_against_schema_cel_and_types() {
    let docs = common::example_documents();
    assert!(docs.len() >= 4);
    for (file, doc) in docs {
        let kind = doc["kind"].as_str().expect("kind").to_owned();
        assert_eq!(doc["apiVersion"], "soma.dev/v1alpha1", "{file}");
        let schema = schema_errors(&kind, &doc);
        assert!(
            schema.is_empty(),
            "{file} ({kind}) violates the schema: {schema:#?}"
        );
        let cel = cel_errors(&kind, &doc);
        assert!(
            cel.is_empty(),
            "{file} ({kind}) violates a CEL rule: {cel:#?}"
        );
        let typed = match kind.as_str() {
            "Agent" => serde_json::from_value::<soma_crds::Agent>(doc.clone()).map(|_| ()),
            "Budget" => serde_json::from_value::<soma_crds::Budget>(doc.clone()).map(|_| ()),
            "Capsule" => serde_json::from_value::<soma_crds::Capsule>(doc.clone()).map(|_| ()),
            "Job" => serde_json::from_value::<soma_crds::Job>(doc.clone()).map(|_| ()),
            other => panic!("{file}: unexpected kind {other}"),
        };
        assert!(
            typed.is_ok(),
            "{file}: does not deserialise into the Rust type: {typed:?}"
        );
    }
}

#[test]
fn the_schema_rejects_malformed_objects() {
    let cases: &[(&str, &'static str, Value)] = &[
        ("Agent", "/spec/image", Value::String(String::new())),
        (
            "Agent",
            "/spec/model/provider",
            Value::String("bedrock".into()),
        ),
        ("Agent", "/spec/port", Value::from(70000)),
        ("Agent", "/spec/scaling/maxReplicas", Value::from(0)),
        (
            "Capsule",
            "/spec/source/oci/digest",
            Value::String("latest".into()),
        ),
        (
            "Capsule",
            "/spec/policyHash",
            Value::String("md5:abc".into()),
        ),
        (
            "Budget",
            "/spec/period/calendar",
            Value::String("fortnight".into()),
        ),
        ("Budget", "/spec/period/rolling", Value::String("1w".into())),
        ("Budget", "/spec/currency", Value::String("usd".into())),
        ("Budget", "/spec/limits/costMicros", Value::from(0)),
        ("Job", "/spec/retries", Value::from(11)),
    ];
    for (kind, pointer, bad) in cases {
        let doc = common::edited(kind, &[(pointer, Some(bad.clone()))]);
        assert!(
            !schema_errors(kind, &doc).is_empty(),
            "{kind} with {pointer}={bad} should violate the schema"
        );
    }
}
