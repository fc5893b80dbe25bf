//! `soma-operator render` over every manifest in `examples/`: the objects the operator would
//! apply for the example Jobs are what their comments promise, built by the controllers' own
//! builders, offline.

use serde::Deserialize;
use serde_json::Value;
use soma_operator::config::{LedgerConfig, OperatorConfig, Redacted};

fn examples() -> String {
    let dir = std::path::Path::new(
        &std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()),
    )
    .join("../examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("example"))
        .collect::<Vec<_>>()
        .join("\n---\n")
}

fn rendered(config: &OperatorConfig) -> (String, Vec<Value>) {
    let text = soma_operator::render::render(&examples(), config).expect("the examples render");
    let docs = serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("YAML"))
        .filter(|v| !v.is_null())
        .collect();
    (text, docs)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == name))
        .unwrap_or_else(|| panic!("no {name} in {container}"))
}

fn config() -> OperatorConfig {
    let mut c = OperatorConfig {
        ledger: LedgerConfig {
            url: Some(Redacted::new(
                "postgres://soma:secret@ledger.soma-system:5432/soma",
            )),
            ..LedgerConfig::default()
        },
        ..OperatorConfig::default()
    };
    c.sidecar.nats_url = Some("nats://nats.soma-system:4222".into());
    c
}

#[test]
fn the_example_task_runs_once_on_the_assistants_definition() {
    let (text, docs) = rendered(&config());
    assert!(!text.contains("secret@"), "no password in the output");
    let job = find(&docs, "Job", "summarise-incident-4711");
    assert_eq!(job["apiVersion"], "batch/v1");
    let spec = &job["spec"];
    assert_eq!(
        (
            spec["backoffLimit"].clone(),
            spec["activeDeadlineSeconds"].clone()
        ),
        (2.into(), 900.into())
    );
    assert!(
        spec.get("suspend").is_none(),
        "no queue named: not suspended"
    );
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["runtimeClassName"], "gvisor", "the Agent's sandbox");
    assert_eq!(pod["serviceAccountName"], "sjob-summarise-incident-4711");
    let agent = &pod["containers"][0];
    assert_eq!(
        agent["image"],
        "registry.example.com/agents/research-assistant@sha256:0d7c1f5e2b8a4c3d9e6f7a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d"
    );
    assert!(
        env(agent, "SOMA_TASK_INPUT")["value"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Summarise incident 4711")
    );
    assert_eq!(
        env(agent, "SOMA_RESULT_FILE")["value"],
        "/dev/termination-log"
    );
    let sidecar = &pod["initContainers"][0];
    assert_eq!(
        (sidecar["name"].as_str(), sidecar["restartPolicy"].as_str()),
        (Some("soma-proxy"), Some("Always"))
    );
    let cm = find(&docs, "ConfigMap", "sjob-summarise-incident-4711-sidecar");
    let sidecar_config: Value =
        serde_json::from_str(cm["data"]["config.yaml"].as_str().unwrap_or_default()).expect("JSON");
    assert_eq!(
        sidecar_config["agent"]["name"],
        "job/summarise-incident-4711"
    );
    assert_eq!(sidecar_config["budget"], "research/research-team");
    let chain: Vec<&str> = sidecar_config["budgets"]
        .as_array()
        .expect("budgets")
        .iter()
        .filter_map(|b| b["name"].as_str())
        .collect();
    assert_eq!(chain, ["research-team", "acme-tenant"]);
    let np = find(&docs, "NetworkPolicy", "sjob-summarise-incident-4711");
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"]["soma.dev/job"],
        "summarise-incident-4711"
    );
}

#[test]
fn the_example_drill_runs_soma_dr_drill_against_the_operators_ledger() {
    let (_, docs) = rendered(&config());
    let job = find(&docs, "Job", "ledger-dr-drill");
    let spec = &job["spec"];
    assert_eq!(
        (
            spec["backoffLimit"].clone(),
            spec["activeDeadlineSeconds"].clone()
        ),
        (0.into(), 1800.into())
    );
    let c = &spec["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "ghcr.io/soma-dev/soma:0.1.0");
    assert_eq!(
        c["args"],
        serde_json::json!(["dr", "drill", "--report-file", "/dev/termination-log"])
    );
    assert_eq!(
        env(c, "SOMA_LEDGER_URL")["valueFrom"]["secretKeyRef"]["name"],
        "sjob-ledger-dr-drill-ledger"
    );
    assert_eq!(
        env(c, "SOMA_SCRATCH_URL")["valueFrom"]["secretKeyRef"]["name"],
        "soma-ledger-scratch"
    );
    assert_eq!(
        env(c, "SOMA_NATS_URL")["value"],
        "nats://nats.soma-system:4222"
    );
    assert!(docs.iter().all(|d| d["kind"] != "CronJob"), "it runs once");
    let np = find(&docs, "NetworkPolicy", "sjob-ledger-dr-drill");
    assert_eq!(np["spec"]["ingress"], serde_json::json!([]));
}

#[test]
fn without_a_ledger_or_stream_render_says_the_drill_would_not_start() {
    let (text, _) = rendered(&OperatorConfig::default());
    assert!(text.contains("# NoStream: without --nats-url"), "{text}");
    assert!(text.contains("# NoLedger: without --ledger-url"), "{text}");
}
