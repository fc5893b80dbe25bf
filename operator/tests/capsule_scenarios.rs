//! Scripted API scenarios for the Capsule controller, with a scripted verifier: each states
//! the exact requests one reconcile makes and what it writes.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use soma_crds::Capsule;
use soma_operator::capsule::content::sha256;
use soma_operator::capsule::reconcile::reconcile;
use soma_operator::capsule::verify::{CapsuleVerifier, Rejection, Request as Verify, Verified};
use soma_operator::config::OperatorConfig;
use soma_operator::context::Context;
use soma_operator::metrics::Metrics;
use support::{Seen, Step, echo, not_found, serve, step};

const CAPSULES: &str = "/apis/soma.dev/v1alpha1/namespaces/team/capsules";
const CONFIGMAPS: &str = "/api/v1/namespaces/team/configmaps";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/team/events";
const DIGEST: &str = "sha256:4f9c2a1e7b3d5c6a8e0f1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60";
const KEY: &str = "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n";

/// Answers with `answer` and counts its calls; records the key it was given.
struct Scripted {
    answer: Result<Verified, Rejection>,
    calls: AtomicUsize,
    saw_key: std::sync::Mutex<Option<String>>,
}

impl Scripted {
    fn new(answer: Result<Verified, Rejection>) -> Arc<Self> {
        Arc::new(Self {
            answer,
            calls: AtomicUsize::new(0),
            saw_key: std::sync::Mutex::new(None),
        })
    }
}

impl CapsuleVerifier for Scripted {
    fn verify<'a>(&'a self, request: Verify<'a>) -> BoxFuture<'a, Result<Verified, Rejection>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        *self.saw_key.lock().expect("lock") = request.key_pem.map(str::to_owned);
        assert_eq!(
            request.digest, DIGEST,
            "the verifier gets the content digest"
        );
        let answer = self.answer.clone();
        Box::pin(async move { answer })
    }
}

fn verified() -> Result<Verified, Rejection> {
    Ok(Verified {
        digest: DIGEST.into(),
        signer: "cosign key sha256:1234".into(),
    })
}

fn capsule_json() -> Value {
    json!({
        "apiVersion": "soma.dev/v1alpha1", "kind": "Capsule",
        "metadata": {"name": "kb", "namespace": "team", "uid": "cap-uid", "generation": 1, "resourceVersion": "5"},
        "spec": {
            "version": "1", "policyHash": format!("sha256:{}", "9b".repeat(32)),
            "source": {"oci": {"repository": "registry.example.com/capsules/kb", "digest": DIGEST}},
            "signature": {"publicKeyRef": {"name": "signers", "key": "cosign.pub"}}
        }
    })
}

fn key_config_map(_: &Value) -> (StatusCode, Value) {
    (
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "signers", "namespace": "team"},
               "data": {"cosign.pub": KEY}}),
    )
}

fn live(capsule: Value) -> impl FnOnce(&Value) -> (StatusCode, Value) + Send + 'static {
    move |_| (StatusCode::OK, capsule)
}

fn status_reply(body: &Value) -> (StatusCode, Value) {
    let mut c = capsule_json();
    c["status"] = body["status"].clone();
    (StatusCode::OK, c)
}

async fn run(
    capsule: Value,
    steps: Vec<Step>,
    verifier: Option<Arc<Scripted>>,
) -> (kube::Result<Action, soma_operator::error::Error>, Vec<Seen>) {
    run_with(capsule, steps, verifier, OperatorConfig::default()).await
}

async fn run_with(
    capsule: Value,
    steps: Vec<Step>,
    verifier: Option<Arc<Scripted>>,
    config: OperatorConfig,
) -> (kube::Result<Action, soma_operator::error::Error>, Vec<Seen>) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(serve(handle, steps));
    let mut ctx = Context::new(
        Client::new(service, "default"),
        config,
        Arc::new(Metrics::default()),
    );
    if let Some(v) = verifier {
        ctx = ctx.with_verifier(v);
    }
    let capsule: Capsule = serde_json::from_value(capsule).expect("capsule");
    let result = reconcile(Arc::new(capsule), Arc::new(ctx)).await;
    let seen = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("scenario finished")
        .expect("scenario passed");
    (result, seen)
}

/// Asserts a verified Capsule whose Qdrant load did not happen (`QdrantLoaded=False` for
/// `reason`, no `status.qdrant`) stays Ready; returns the `QdrantLoaded` message.
fn assert_ready_not_in_qdrant(status: &Value, reason: &str) -> String {
    assert_eq!(
        condition(status, "Ready"),
        ("True".into(), "Verified".into())
    );
    assert_eq!(
        condition(status, "QdrantLoaded"),
        ("False".into(), reason.to_owned())
    );
    assert!(status.get("qdrant").is_none(), "{status}");
    status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "QdrantLoaded")
        .and_then(|c| c["message"].as_str())
        .unwrap_or_default()
        .to_owned()
}

fn condition(status: &Value, type_: &str) -> (String, String) {
    let c = status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("condition {type_}"));
    (
        c["status"].as_str().unwrap_or_default().to_owned(),
        c["reason"].as_str().unwrap_or_default().to_owned(),
    )
}

fn verified_steps(capsule: Value) -> Vec<Step> {
    vec![
        step(
            Method::GET,
            &format!("{CONFIGMAPS}/signers"),
            key_config_map,
        ),
        step(Method::GET, &format!("{CAPSULES}/kb"), live(capsule)),
        step(
            Method::PATCH,
            &format!("{CAPSULES}/kb/status"),
            status_reply,
        ),
    ]
}

#[tokio::test]
async fn verified_capsule_records_digest_signer_and_time() {
    let verifier = Scripted::new(verified());
    let (result, seen) = run(
        capsule_json(),
        verified_steps(capsule_json()),
        Some(verifier.clone()),
    )
    .await;
    assert_eq!(
        result.expect("reconciled"),
        Action::requeue(Duration::from_secs(3600))
    );
    assert_eq!(verifier.calls.load(Ordering::SeqCst), 1);
    assert_eq!(verifier.saw_key.lock().expect("lock").as_deref(), Some(KEY));
    let patch = &seen[2];
    assert!(patch.query.contains("fieldManager=soma.dev%2Fcapsule"));
    assert_eq!(patch.content_type, "application/apply-patch+yaml");
    let status = &patch.body["status"];
    assert_eq!(status["verifiedDigest"], DIGEST);
    assert_eq!(status["signer"], "cosign key sha256:1234");
    assert!(status["verifiedAt"].is_string());
    assert_eq!(
        condition(status, "Ready"),
        ("True".into(), "Verified".into())
    );
    assert_eq!(condition(status, "PolicyAllowed").0, "True");
}

#[tokio::test]
async fn converged_capsule_costs_reads_and_no_writes() {
    let (_, seen) = run(
        capsule_json(),
        verified_steps(capsule_json()),
        Some(Scripted::new(verified())),
    )
    .await;
    let mut converged = capsule_json();
    converged["status"] = seen[2].body["status"].clone();
    let steps = vec![step(
        Method::GET,
        &format!("{CONFIGMAPS}/signers"),
        key_config_map,
    )];
    let (result, seen) = run(converged, steps, Some(Scripted::new(verified()))).await;
    assert_eq!(
        result.expect("reconciled"),
        Action::requeue(Duration::from_secs(3600))
    );
    assert_eq!(seen.len(), 1, "one read, nothing written");
}

#[tokio::test]
async fn without_a_verifier_the_capsule_is_honestly_not_ready() {
    let steps = vec![
        step(
            Method::GET,
            &format!("{CONFIGMAPS}/signers"),
            key_config_map,
        ),
        step(Method::GET, &format!("{CAPSULES}/kb"), live(capsule_json())),
        step(
            Method::PATCH,
            &format!("{CAPSULES}/kb/status"),
            status_reply,
        ),
        step(Method::POST, EVENTS, echo),
    ];
    let (result, seen) = run(capsule_json(), steps, None).await;
    assert_eq!(
        result.expect("not an error to retry"),
        Action::await_change()
    );
    let status = &seen[2].body["status"];
    assert_eq!(
        condition(status, "Ready"),
        ("False".into(), "VerificationUnavailable".into())
    );
    assert_eq!(condition(status, "Stalled").0, "True");
    assert!(status.get("verifiedDigest").is_none(), "{status}");
    assert_eq!(seen[3].body["reason"], "VerificationUnavailable");
    assert_eq!(seen[3].body["type"], "Warning");
}

#[tokio::test]
async fn missing_public_key_is_retried_with_backoff() {
    let steps = vec![
        step(Method::GET, &format!("{CONFIGMAPS}/signers"), |_| {
            not_found()
        }),
        step(Method::GET, &format!("{CAPSULES}/kb"), live(capsule_json())),
        step(
            Method::PATCH,
            &format!("{CAPSULES}/kb/status"),
            status_reply,
        ),
        step(Method::POST, EVENTS, echo),
    ];
    let verifier = Scripted::new(verified());
    let (result, seen) = run(capsule_json(), steps, Some(verifier.clone())).await;
    assert_eq!(
        result.expect("retried"),
        Action::requeue(Duration::from_secs(1))
    );
    assert_eq!(verifier.calls.load(Ordering::SeqCst), 0);
    let status = &seen[2].body["status"];
    assert_eq!(
        condition(status, "Ready"),
        ("False".into(), "PublicKeyNotFound".into())
    );
    assert_eq!(condition(status, "Reconciling").0, "True");
}

#[tokio::test]
async fn config_map_content_must_match_its_declared_digest() {
    let mut capsule = capsule_json();
    capsule["spec"]["source"] = json!({"configMapRef": {"name": "kb-content", "key": "kb.json", "digest": sha256(b"original")}});
    let steps = vec![
        step(Method::GET, &format!("{CONFIGMAPS}/kb-content"), |_| {
            (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "kb-content", "namespace": "team"}, "data": {"kb.json": "tampered"}}),
            )
        }),
        step(
            Method::GET,
            &format!("{CAPSULES}/kb"),
            live(capsule.clone()),
        ),
        step(
            Method::PATCH,
            &format!("{CAPSULES}/kb/status"),
            status_reply,
        ),
        step(Method::POST, EVENTS, echo),
    ];
    let verifier = Scripted::new(verified());
    let (result, seen) = run(capsule, steps, Some(verifier.clone())).await;
    assert_eq!(result.expect("permanent"), Action::await_change());
    assert_eq!(
        verifier.calls.load(Ordering::SeqCst),
        0,
        "no signature check of the wrong bytes"
    );
    assert_eq!(
        condition(&seen[2].body["status"], "Ready").1,
        "DigestMismatch"
    );
}

#[tokio::test]
async fn revoked_capsule_is_not_ready_without_verifying() {
    let mut capsule = capsule_json();
    capsule["spec"]["revoked"] = json!(true);
    let steps = vec![
        step(
            Method::GET,
            &format!("{CAPSULES}/kb"),
            live(capsule.clone()),
        ),
        step(
            Method::PATCH,
            &format!("{CAPSULES}/kb/status"),
            status_reply,
        ),
        step(Method::POST, EVENTS, echo),
    ];
    let verifier = Scripted::new(verified());
    let (result, seen) = run(capsule, steps, Some(verifier.clone())).await;
    assert_eq!(result.expect("permanent"), Action::await_change());
    assert_eq!(verifier.calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        condition(&seen[1].body["status"], "Ready"),
        ("False".into(), "Revoked".into())
    );
}

#[tokio::test]
async fn transient_verifier_failure_is_retried_and_not_cached() {
    let verifier = Scripted::new(Err(Rejection {
        reason: "RegistryUnavailable".into(),
        message: "registry did not answer".into(),
        transient: true,
        recheck: false,
    }));
    let mut steps = verified_steps(capsule_json());
    steps.push(step(Method::POST, EVENTS, echo));
    let (result, seen) = run(capsule_json(), steps, Some(verifier)).await;
    assert_eq!(
        result.expect("retried"),
        Action::requeue(Duration::from_secs(1))
    );
    assert_eq!(
        condition(&seen[2].body["status"], "Reconciling"),
        ("True".into(), "RegistryUnavailable".into())
    );
}

#[tokio::test]
async fn rejection_for_what_the_registry_holds_is_looked_up_again_later() {
    // Unsigned now; CI may push the signature after the Capsule was applied, and no watch
    // reports that: Stalled, and requeued at the recheck interval (not backoff, not never).
    let verifier = Scripted::new(Err(Rejection {
        reason: "Unsigned".into(),
        message: "no cosign signature".into(),
        transient: false,
        recheck: true,
    }));
    let mut steps = verified_steps(capsule_json());
    steps.push(step(Method::POST, EVENTS, echo));
    let (result, seen) = run(capsule_json(), steps, Some(verifier)).await;
    assert_eq!(
        result.expect("not an error"),
        Action::requeue(OperatorConfig::default().capsule_recheck)
    );
    let status = &seen[2].body["status"];
    assert_eq!(
        condition(status, "Ready"),
        ("False".into(), "Unsigned".into())
    );
    assert_eq!(condition(status, "Stalled").0, "True");
    assert_eq!(seen[3].body["reason"], "Unsigned");
}

#[tokio::test]
async fn a_capsule_kept_in_qdrant_under_an_operator_without_qdrant_stays_ready_and_says_why() {
    let mut capsule = capsule_json();
    capsule["spec"]["index"] = json!("qdrant");
    // No --qdrant-url: nothing is fetched or sent anywhere; the signature still stands.
    let verifier = Scripted::new(verified());
    let (result, seen) = run(
        capsule.clone(),
        verified_steps(capsule),
        Some(verifier.clone()),
    )
    .await;
    assert_eq!(
        result.expect("reconciled"),
        Action::requeue(Duration::from_secs(3600)),
        "not retried: a flag, not the server, is missing"
    );
    let message = assert_ready_not_in_qdrant(&seen[2].body["status"], "QdrantNotConfigured");
    assert!(message.contains("--qdrant-url"), "{message}");
}

#[tokio::test]
async fn a_capsule_kept_in_qdrant_whose_load_fails_is_retried_and_stays_ready() {
    // Nothing listens on 127.0.0.1:9: neither the server nor the registry answers.
    let mut capsule = capsule_json();
    capsule["spec"]["index"] = json!("qdrant");
    capsule["spec"]["source"]["oci"]["repository"] = json!("127.0.0.1:9/capsules/kb");
    let config = OperatorConfig {
        qdrant: Some(soma_capsule::qdrant::QdrantSettings::new("http://127.0.0.1:9").expect("url")),
        insecure_registries: vec!["127.0.0.1:9".into()],
        ..OperatorConfig::default()
    };
    let (result, seen) = run_with(
        capsule.clone(),
        verified_steps(capsule),
        Some(Scripted::new(verified())),
        config,
    )
    .await;
    let action = result.expect("reconciled");
    assert_ne!(
        action,
        Action::requeue(Duration::from_secs(3600)),
        "retried with backoff, not at the hourly resync"
    );
    assert_ready_not_in_qdrant(&seen[2].body["status"], "QdrantBundleUnavailable");
}
