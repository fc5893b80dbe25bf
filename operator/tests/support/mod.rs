//! The scripted API server of the scenario tests, in the style of kube-rs' controller-rs
//! `ApiServerVerifier`: each scenario states the exact requests it expects, in order, and how
//! they are answered; anything else fails the test.
#![allow(dead_code)] // each test binary uses part of it

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// How the fake API server answers one request, given its body.
pub type Reply = Box<dyn FnOnce(&Value) -> (StatusCode, Value) + Send>;

/// A request the scenario expects, and how the fake API server answers it.
pub struct Step {
    pub method: Method,
    pub path: String,
    pub reply: Reply,
}

pub fn step(
    method: Method,
    path: &str,
    reply: impl FnOnce(&Value) -> (StatusCode, Value) + Send + 'static,
) -> Step {
    Step {
        method,
        path: path.to_owned(),
        reply: Box::new(reply),
    }
}

pub fn not_found() -> (StatusCode, Value) {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
    (StatusCode::NOT_FOUND, body)
}

pub fn echo(body: &Value) -> (StatusCode, Value) {
    (StatusCode::OK, body.clone())
}

/// The sidecar settings a ConfigMap (or a written ConfigMap's body) carries in `config.yaml`.
pub fn sidecar_settings(config_map: &Value) -> Value {
    serde_json::from_str(
        config_map["data"]["config.yaml"]
            .as_str()
            .expect("config.yaml"),
    )
    .expect("config.yaml is JSON")
}

/// The Capsule `team/kb`, revoked (`spec.revoked`), as the API server holds it.
pub fn revoked_kb() -> Value {
    json!({
        "apiVersion": "soma.dev/v1alpha1", "kind": "Capsule",
        "metadata": {"name": "kb", "namespace": "team", "generation": 2},
        "spec": {"version": "1", "policyHash": format!("sha256:{}", "9b".repeat(32)), "revoked": true,
                 "source": {"oci": {"repository": "r", "digest": format!("sha256:{}", "aa".repeat(32))}},
                 "signature": {"publicKeyRef": {"name": "signers", "key": "cosign.pub"}}},
        "status": {"observedGeneration": 2, "conditions": [{"type": "Ready", "status": "False", "reason": "Revoked",
            "message": "the Capsule is revoked (spec.revoked); no Agent may use it",
            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    })
}

/// The `revokedCapsules` entry the scenarios' revoked Capsule `team/kb` gives.
pub fn revoked_kb_entry() -> Value {
    json!({"name": "kb", "digest": format!("sha256:{}", "aa".repeat(32)),
           "reason": "Capsule team/kb is revoked (spec.revoked)"})
}

/// `config_map` with its sidecar settings already listing `team/kb` as revoked.
pub fn listing_kb_revoked(mut config_map: Value) -> Value {
    let mut settings = sidecar_settings(&config_map);
    settings["revokedCapsules"] = json!([revoked_kb_entry()]);
    config_map["data"]["config.yaml"] =
        json!(serde_json::to_string_pretty(&settings).expect("text"));
    config_map
}

/// A recorded write: method, path, query and body.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

/// Serves `steps` in order, asserting each request matches; returns what it saw. Panics on an
/// unexpected or extra request (the client is dropped when the reconcile ends, which ends the
/// stream, so "nothing else" is checked too).
pub async fn serve(mut handle: Handle, steps: Vec<Step>) -> Vec<Seen> {
    let mut seen = Vec::new();
    for (i, s) in steps.into_iter().enumerate() {
        let (request, send) = handle.next_request().await.unwrap_or_else(|| {
            panic!("step {i}: expected {} {}, got no request", s.method, s.path)
        });
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or_default().to_owned();
        let content_type = request
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert_eq!(
            (&method, path.as_str()),
            (&s.method, s.path.as_str()),
            "step {i}"
        );
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .expect("request body");
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        let (status, reply) = (s.reply)(&body);
        seen.push(Seen {
            method,
            path,
            query,
            content_type,
            body,
        });
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&reply).expect("reply")))
                .expect("response"),
        );
    }
    if let Some((request, _)) = handle.next_request().await {
        panic!(
            "unexpected extra request: {} {}",
            request.method(),
            request.uri()
        );
    }
    seen
}
