//! AdmissionReview round trips over HTTPS against the running webhook: every built-in policy's
//! valid and invalid fixtures, warn and dryrun actions, brought Gatekeeper templates, bad
//! input, bad policies, deadlines, certificate rotation.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use soma_admission::client::Client;
use soma_admission::tls::{self, CertBundle, SwappableCert};
use soma_admission::{Config, State, router};
use soma_policy::{PolicyStore, Sources, gatekeeper, inventory};

const SERVER_NAME: &str = "soma-webhook.soma-system.svc";

fn repo() -> PathBuf {
    Path::new(
        &std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()),
    )
    .join("..")
}

struct Webhook {
    addr: SocketAddr,
    bundle: CertBundle,
    cert: Arc<SwappableCert>,
    state: Arc<State>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Webhook {
    async fn client(&self) -> Client {
        self.client_with(&self.bundle.ca_pem).await.unwrap()
    }

    async fn client_with(&self, ca_pem: &str) -> anyhow::Result<Client> {
        Client::connect(self.addr, SERVER_NAME, tls::client_config(ca_pem)?).await
    }
}

/// The built-ins as configured by fixture-constraints.yaml plus `extra` documents, over the
/// fixture inventory.
fn store(extra: &[&str]) -> Arc<PolicyStore> {
    let dir = repo().join("policies/builtin");
    let mut sources = Sources::builtins();
    sources.add_text(
        "fixture-constraints.yaml",
        &std::fs::read_to_string(dir.join("fixture-constraints.yaml")).unwrap(),
    );
    for (i, e) in extra.iter().enumerate() {
        sources.add_text(&format!("extra-{i}.yaml"), e);
    }
    let (store, report) = PolicyStore::loaded(&sources);
    assert!(report.is_clean(), "{:?}", report.errors);
    let inv = std::fs::read_to_string(dir.join("fixture-inventory.yaml")).unwrap();
    let objects = gatekeeper::documents(&inv, "inventory").unwrap();
    store
        .set_inventory(inventory::from_objects(&objects))
        .unwrap();
    Arc::new(store)
}

async fn start(store: Arc<PolicyStore>, config: Config) -> Webhook {
    let bundle = CertBundle::generate(&[SERVER_NAME.to_owned()]).unwrap();
    let cert = SwappableCert::new(&bundle).unwrap();
    let state = State::new(store, config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = router(state.clone());
    tokio::spawn(tls::serve(
        listener,
        app,
        tls::server_config(cert.clone()),
        async {
            let _ = stopped.await;
        },
    ));
    Webhook {
        addr,
        bundle,
        cert,
        state,
        _stop: stop,
    }
}

fn admission_review(uid: &str, operation: &str, object: &Value, old: Option<&Value>) -> Value {
    let api_version = object["apiVersion"].as_str().unwrap_or("soma.dev/v1alpha1");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = object["kind"].as_str().unwrap_or_default();
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": format!("{}s", kind.to_lowercase())},
            "requestKind": {"group": group, "version": version, "kind": kind},
            "name": object["metadata"]["name"],
            "namespace": object["metadata"]["namespace"],
            "operation": operation,
            "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
            "object": object,
            "oldObject": old,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

async fn send(client: &mut Client, review: &Value) -> (u16, Value) {
    let (status, body) = client
        .post("/validate", serde_json::to_vec(review).unwrap())
        .await
        .unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn fixtures() -> Vec<(String, bool, Value)> {
    let mut out = Vec::new();
    for b in soma_policy::builtin::BUILTINS {
        for (sub, valid) in [("valid", true), ("invalid", false)] {
            let dir = repo()
                .join("policies/builtin")
                .join(b.name)
                .join("fixtures")
                .join(sub);
            let mut files: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            for f in files {
                let doc: Value =
                    serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
                out.push((
                    format!(
                        "{}/{sub}/{}",
                        b.name,
                        f.file_name().unwrap().to_string_lossy()
                    ),
                    valid,
                    doc,
                ));
            }
        }
    }
    out
}

#[tokio::test]
async fn every_fixture_round_trips_over_https() {
    let hook = start(store(&[]), Config::default()).await;
    let mut client = hook.client().await;
    let mut n = 0;
    for (name, valid, doc) in fixtures() {
        let uid = format!("uid-{n}");
        let (status, body) = send(
            &mut client,
            &admission_review(&uid, "CREATE", &doc["object"], None),
        )
        .await;
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(body["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(body["kind"], "AdmissionReview");
        let resp = &body["response"];
        assert_eq!(resp["uid"], uid.as_str(), "{name}");
        if valid {
            assert_eq!(resp["allowed"], true, "{name}: {resp}");
            assert_eq!(resp["auditAnnotations"]["decision"], "allowed");
        } else {
            assert_eq!(resp["allowed"], false, "{name}: {resp}");
            assert_eq!(resp["status"]["code"], 403, "{name}");
            assert_eq!(resp["status"]["reason"], "Forbidden");
            let msg = resp["status"]["message"].as_str().unwrap();
            assert!(msg.starts_with("Soma policy denied "), "{msg}");
            for want in doc["expect"].as_array().unwrap() {
                assert!(
                    msg.contains(want.as_str().unwrap()),
                    "{name}: {msg:?} lacks {want}"
                );
            }
            let violations: Value =
                serde_json::from_str(resp["auditAnnotations"]["violations"].as_str().unwrap())
                    .unwrap();
            assert!(!violations.as_array().unwrap().is_empty());
        }
        n += 1;
    }
    assert!(n >= 30);
}

#[tokio::test]
async fn update_is_checked_and_delete_is_not() {
    let hook = start(store(&[]), Config::default()).await;
    let mut client = hook.client().await;
    let good = &fixtures()
        .into_iter()
        .find(|f| f.0 == "images/valid/pinned-allowed-registry.json")
        .unwrap()
        .2["object"];
    let mut bad = good.clone();
    bad["spec"]["image"] = json!("registry.example.com/agents/research-assistant:latest");
    let (_, body) = send(
        &mut client,
        &admission_review("u1", "UPDATE", &bad, Some(good)),
    )
    .await;
    assert_eq!(body["response"]["allowed"], false);
    // Removing a finalizer from an object being deleted is never blocked.
    let mut deleting = bad.clone();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-11-22T04:00:00Z");
    let (_, body) = send(
        &mut client,
        &admission_review("u3", "UPDATE", &deleting, Some(&deleting)),
    )
    .await;
    assert_eq!(body["response"]["allowed"], true);
    let mut delete = admission_review("u2", "DELETE", &bad, Some(&bad));
    delete["request"]["object"] = Value::Null;
    let (_, body) = send(&mut client, &delete).await;
    assert_eq!(body["response"]["allowed"], true);
}

const LABELS_TEMPLATE: &str = "policies/suites/required-labels/template.yaml";

fn labels_constraint(name: &str, action: &str) -> String {
    format!(
        "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: K8sRequiredLabels\nmetadata: {{name: {name}}}\nspec:\n  enforcementAction: {action}\n  match: {{kinds: [{{apiGroups: [soma.dev], kinds: [Agent]}}]}}\n  parameters: {{labels: [{{key: {name}}}]}}\n"
    )
}

#[tokio::test]
async fn warn_and_dryrun_allow_with_warnings_and_audit_annotations() {
    let template = std::fs::read_to_string(repo().join(LABELS_TEMPLATE)).unwrap();
    let warn = labels_constraint("owner", "warn");
    let dry = labels_constraint("cost-center", "dryrun");
    let hook = start(store(&[&template, &warn, &dry]), Config::default()).await;
    let mut client = hook.client().await;
    let good = fixtures()
        .into_iter()
        .find(|f| f.0 == "images/valid/pinned-allowed-registry.json")
        .unwrap()
        .2;
    let (_, body) = send(
        &mut client,
        &admission_review("w", "CREATE", &good["object"], None),
    )
    .await;
    let resp = &body["response"];
    assert_eq!(resp["allowed"], true, "{resp}");
    assert_eq!(
        resp["warnings"],
        json!(["[K8sRequiredLabels/owner] you must provide labels: {\"owner\"}"])
    );
    let audit: Value =
        serde_json::from_str(resp["auditAnnotations"]["violations"].as_str().unwrap()).unwrap();
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, vec!["warn", "dryrun"]);

    // A denial still carries the warnings.
    let bad = fixtures()
        .into_iter()
        .find(|f| f.0 == "images/invalid/tag-only.json")
        .unwrap()
        .2;
    let (_, body) = send(
        &mut client,
        &admission_review("d", "CREATE", &bad["object"], None),
    )
    .await;
    assert_eq!(body["response"]["allowed"], false);
    assert_eq!(body["response"]["warnings"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn malformed_requests_get_clear_errors_and_the_server_keeps_serving() {
    let config = Config {
        max_body_bytes: 64 * 1024,
        ..Config::default()
    };
    let hook = start(store(&[]), config).await;
    let mut client = hook.client().await;
    let good = fixtures()
        .into_iter()
        .find(|f| f.0 == "images/valid/pinned-allowed-registry.json")
        .unwrap()
        .2["object"]
        .clone();

    let (status, body) = client
        .post("/validate", b"{not json".to_vec())
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("malformed AdmissionReview: not JSON"));

    let mut wrong_version = admission_review("x", "CREATE", &good, None);
    wrong_version["apiVersion"] = json!("admission.k8s.io/v2");
    assert_eq!(send(&mut client, &wrong_version).await.0, 400);

    let mut no_uid = admission_review("", "CREATE", &good, None);
    no_uid["request"]["uid"] = Value::Null;
    let (status, body) = send(&mut client, &no_uid).await;
    assert_eq!(status, 400);
    assert!(body["message"].as_str().unwrap().contains("uid"));

    let (status, _) = send(
        &mut client,
        &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}),
    )
    .await;
    assert_eq!(status, 400);

    // Unknown kinds are denied (the webhook configuration should never send them).
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "research"}, "spec": {}});
    let (status, body) = send(&mut client, &admission_review("pod", "CREATE", &pod, None)).await;
    assert_eq!(status, 200);
    assert_eq!(body["response"]["allowed"], false);
    assert_eq!(body["response"]["status"]["code"], 400);
    assert!(
        body["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("decides soma.dev Agent, Capsule, Budget, Job only")
    );

    // An object whose kind disagrees with the request.
    let mut liar = admission_review("liar", "CREATE", &good, None);
    liar["request"]["kind"]["kind"] = json!("Budget");
    let (_, body) = send(&mut client, &liar).await;
    assert_eq!(body["response"]["allowed"], false);

    // CREATE without an object.
    let mut empty = admission_review("empty", "CREATE", &good, None);
    empty["request"]["object"] = Value::Null;
    let (_, body) = send(&mut client, &empty).await;
    assert_eq!(body["response"]["allowed"], false);

    // A huge object: refused with the request's uid, as an AdmissionReview.
    let mut huge = good.clone();
    huge["metadata"]["annotations"] = json!({"blob": "x".repeat(200 * 1024)});
    // Field order as the API server writes it: request.uid first.
    let raw = format!(
        r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"huge-1","kind":{{"group":"soma.dev","version":"v1alpha1","kind":"Agent"}},"operation":"CREATE","namespace":"research","object":{huge}}}}}"#
    );
    let (status, body) = client.post("/validate", raw.into_bytes()).await.unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["response"]["uid"], "huge-1");
    assert_eq!(body["response"]["allowed"], false);
    assert_eq!(body["response"]["status"]["code"], 413);

    // Not JSON and huge: no uid to answer with, so a plain 413.
    let mut fresh = hook.client().await;
    let (status, _) = fresh
        .post("/validate", vec![b'['; 100 * 1024])
        .await
        .unwrap();
    assert_eq!(status, 413);

    // Still serving, and the errors are counted.
    let mut fresh = hook.client().await;
    let (_, body) = send(&mut fresh, &admission_review("ok", "CREATE", &good, None)).await;
    assert_eq!(body["response"]["allowed"], true);
    let (_, metrics) = fresh.get("/metrics").await.unwrap();
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("soma_admission_errors_total{reason=\"malformed\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("soma_admission_errors_total{reason=\"too_large\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("soma_admission_requests_total{kind=\"other\",operation=\"CREATE\",decision=\"invalid\"} 1"), "{metrics}");
}

#[tokio::test]
async fn a_bad_policy_is_reported_and_the_last_good_set_keeps_serving() {
    let template = std::fs::read_to_string(repo().join(LABELS_TEMPLATE)).unwrap();
    let deny = labels_constraint("owner", "deny");
    let store = store(&[&template, &deny]);
    let hook = start(store.clone(), Config::default()).await;
    let mut client = hook.client().await;
    let good = fixtures()
        .into_iter()
        .find(|f| f.0 == "images/valid/pinned-allowed-registry.json")
        .unwrap()
        .2["object"]
        .clone();
    let (_, before) = send(&mut client, &admission_review("a", "CREATE", &good, None)).await;
    assert_eq!(before["response"]["allowed"], false);

    // The platform team pushes a template that does not compile.
    let broken = template.replace("count(missing) > 0", "count(missing > 0");
    let mut sources = Sources::builtins();
    sources.add_text(
        "fixture-constraints.yaml",
        &std::fs::read_to_string(repo().join("policies/builtin/fixture-constraints.yaml")).unwrap(),
    );
    sources.add_text("platform/template.yaml", &broken);
    sources.add_text("platform/constraint.yaml", &deny);
    let report = store.load(&sources);
    hook.state.metrics.record_load(&report);
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.kept_previous, vec!["template K8sRequiredLabels"]);

    let (_, after) = send(&mut client, &admission_review("b", "CREATE", &good, None)).await;
    assert_eq!(after["response"]["allowed"], false);
    assert_eq!(
        after["response"]["status"]["message"],
        before["response"]["status"]["message"]
    );
    let (_, metrics) = client.get("/metrics").await.unwrap();
    assert!(
        String::from_utf8_lossy(&metrics)
            .contains("soma_policy_load_errors_total{reason=\"PolicyCompileError\"} 1")
    );
}

const SLOW: &str = r#"
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
            some i in numbers.range(1, 2000)
            some j in numbers.range(1, 2000)
            i * j == -1
          }
---
apiVersion: constraints.gatekeeper.sh/v1beta1
kind: Slow
metadata: {name: slow}
spec:
  match: {kinds: [{apiGroups: [soma.dev], kinds: [Agent]}]}
"#;

#[tokio::test]
async fn deadline_fails_closed_by_default_and_open_when_configured() {
    let good = fixtures()
        .into_iter()
        .find(|f| f.0 == "images/valid/pinned-allowed-registry.json")
        .unwrap()
        .2["object"]
        .clone();
    for fail_open in [false, true] {
        let config = Config {
            deadline: Duration::from_millis(30),
            fail_open,
            ..Config::default()
        };
        let hook = start(store(&[SLOW]), config).await;
        let mut client = hook.client().await;
        let (status, body) = send(
            &mut client,
            &admission_review("slow", "CREATE", &good, None),
        )
        .await;
        assert_eq!(status, 200);
        let resp = &body["response"];
        assert_eq!(resp["allowed"], fail_open, "{resp}");
        // Two answers are right, and which one comes is timing: regorus' timer stops the
        // policy at the deadline and the failure names it, or, when stopping takes longer than
        // the webhook's 50 ms of grace (a loaded machine), the webhook answers without it.
        if fail_open {
            let warning = resp["warnings"][0].as_str().unwrap_or_default();
            assert!(
                warning.contains("[Slow/slow] policy could not be evaluated")
                    || warning.contains("policy evaluation did not finish in time"),
                "{resp}"
            );
            assert_eq!(resp["auditAnnotations"]["decision"], "allowed-fail-open");
        } else {
            let message = resp["status"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains("[Slow/slow] policy could not be evaluated")
                    || message.contains("policy evaluation did not finish in time"),
                "{resp}"
            );
        }
    }
}

#[tokio::test]
async fn concurrent_requests_over_many_connections() {
    let hook = Arc::new(
        start(
            store(&[]),
            Config {
                max_in_flight: 2,
                ..Config::default()
            },
        )
        .await,
    );
    let all = Arc::new(fixtures());
    let mut tasks = Vec::new();
    for c in 0..8 {
        let hook = hook.clone();
        let all = all.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = hook.client().await;
            for (i, (name, valid, doc)) in all.iter().enumerate().filter(|(i, _)| i % 8 == c) {
                let (_, body) = send(
                    &mut client,
                    &admission_review(&format!("{c}-{i}"), "CREATE", &doc["object"], None),
                )
                .await;
                assert_eq!(body["response"]["allowed"], *valid, "{name}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn certificate_rotation_and_untrusted_clients() {
    let hook = start(store(&[]), Config::default()).await;
    let other = CertBundle::generate(&[SERVER_NAME.to_owned()]).unwrap();
    assert!(
        hook.client_with(&other.ca_pem).await.is_err(),
        "a client trusting another CA must not connect"
    );
    hook.cert.replace(&other).unwrap();
    let mut client = hook.client_with(&other.ca_pem).await.unwrap();
    assert_eq!(client.get("/healthz").await.unwrap().0, 200);
    assert!(hook.client_with(&hook.bundle.ca_pem).await.is_err());
}

#[tokio::test]
async fn health_and_readiness() {
    let hook = start(store(&[]), Config::default()).await;
    let mut client = hook.client().await;
    assert_eq!(client.get("/healthz").await.unwrap().0, 200);
    let (status, body) = client.get("/readyz").await.unwrap();
    assert_eq!(
        (status, String::from_utf8_lossy(&body).into_owned()),
        (
            200,
            format!("{} constraints", soma_policy::builtin::BUILTINS.len())
        )
    );
    let empty = start(Arc::new(PolicyStore::new()), Config::default()).await;
    assert_eq!(empty.client().await.get("/readyz").await.unwrap().0, 503);
}
