//! Scripted API scenarios for the webhook's management: the ValidatingWebhookConfiguration
//! is applied only when it differs, and the serving certificate's Secret is created once and
//! shared (the replica that loses the creation race reads the winner's back).

mod support;

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use soma_admission::tls::CertBundle;
use soma_operator::webhook::WebhookOptions;
use soma_operator::webhook::cert::{CertError, obtain, secret_for};
use soma_operator::webhook::configuration::{desired, ensure};
use support::{Seen, Step, not_found, serve, step};

const VWC: &str =
    "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/soma-policy";
const SECRETS: &str = "/api/v1/namespaces/soma-system/secrets";

fn options() -> WebhookOptions {
    WebhookOptions {
        namespace: "soma-system".into(),
        ..WebhookOptions::default()
    }
}

/// Runs `f` against a mock API server answering `steps`; returns its result and the requests.
async fn scripted<T, F>(steps: Vec<Step>, f: impl FnOnce(Client) -> F) -> (T, Vec<Seen>)
where
    F: std::future::Future<Output = T>,
{
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(serve(handle, steps));
    let out = f(Client::new(service, "default")).await;
    let seen = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("scenario finished")
        .expect("scenario passed");
    (out, seen)
}

fn as_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("json")
}

#[tokio::test]
async fn missing_configuration_is_applied_with_its_own_field_manager() {
    let want = desired(&options(), "CA");
    let steps = vec![
        step(Method::GET, VWC, |_| not_found()),
        step(Method::PATCH, VWC, |b| (StatusCode::OK, b.clone())),
    ];
    let (wrote, seen) = scripted(steps, |c| async move { ensure(&c, &want).await }).await;
    assert!(wrote.expect("applied"));
    let apply = &seen[1];
    assert_eq!(apply.content_type, "application/apply-patch+yaml");
    assert!(apply.query.contains("fieldManager=soma.dev%2Fwebhook"));
    assert!(apply.query.contains("force=true"));
    assert_eq!(apply.body["kind"], "ValidatingWebhookConfiguration");
    assert_eq!(apply.body["apiVersion"], "admissionregistration.k8s.io/v1");
    let hook = &apply.body["webhooks"][0];
    assert_eq!(hook["clientConfig"]["service"]["namespace"], "soma-system");
    assert_eq!(hook["clientConfig"]["service"]["path"], "/validate");
    assert_eq!(hook["failurePolicy"], "Fail");
}

#[tokio::test]
async fn converged_configuration_costs_one_read_and_no_write() {
    let want = desired(&options(), "CA");
    let mut live = as_json(&want);
    // What the API server adds must not count as a difference.
    live["metadata"]["resourceVersion"] = json!("42");
    live["metadata"]["managedFields"] = json!([{"manager": "soma.dev/webhook"}]);
    live["webhooks"][0]["objectSelector"] = json!({});
    live["webhooks"][0]["rules"][0]["scope"] = json!("Namespaced");
    let steps = vec![step(Method::GET, VWC, move |_| (StatusCode::OK, live))];
    let (wrote, seen) = scripted(steps, |c| async move { ensure(&c, &want).await }).await;
    assert!(!wrote.expect("read"));
    assert_eq!(seen.len(), 1);
}

#[tokio::test]
async fn a_new_ca_is_patched_in() {
    let old = as_json(&desired(&options(), "OLD CA"));
    let want = desired(&options(), "NEW CA");
    let steps = vec![
        step(Method::GET, VWC, move |_| (StatusCode::OK, old)),
        step(Method::PATCH, VWC, |b| (StatusCode::OK, b.clone())),
    ];
    let (wrote, seen) = scripted(steps, |c| async move { ensure(&c, &want).await }).await;
    assert!(wrote.expect("applied"));
    assert_eq!(
        seen[1].body["webhooks"][0]["clientConfig"]["caBundle"],
        "TkVXIENB"
    );
}

#[tokio::test]
async fn first_replica_generates_and_creates_the_secret() {
    let steps = vec![
        step(
            Method::GET,
            &format!("{SECRETS}/soma-operator-webhook-cert"),
            |_| not_found(),
        ),
        step(Method::POST, SECRETS, |b| (StatusCode::CREATED, b.clone())),
    ];
    let (bundle, seen) = scripted(steps, |c| async move {
        obtain(&c, &options(), Duration::ZERO).await
    })
    .await;
    let bundle = bundle.expect("generated");
    let created = &seen[1].body;
    assert_eq!(created["type"], "kubernetes.io/tls");
    assert_eq!(created["metadata"]["name"], "soma-operator-webhook-cert");
    let ca = created["data"]["ca.crt"].as_str().expect("base64 ca.crt");
    assert_eq!(
        ca,
        as_json(&secret_for(&options(), &bundle))["data"]["ca.crt"]
    );
}

#[tokio::test]
async fn replica_losing_the_creation_race_serves_the_winners_certificate() {
    let winner = CertBundle::generate(&options().dns_names()).expect("generate");
    let theirs = as_json(&secret_for(&options(), &winner));
    let path = format!("{SECRETS}/soma-operator-webhook-cert");
    let steps = vec![
        step(Method::GET, &path, |_| not_found()),
        step(Method::POST, SECRETS, |_| {
            (
                StatusCode::CONFLICT,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "already exists"}),
            )
        }),
        step(Method::GET, &path, move |_| (StatusCode::OK, theirs)),
    ];
    let (bundle, _) = scripted(steps, |c| async move {
        obtain(&c, &options(), Duration::ZERO).await
    })
    .await;
    let bundle = bundle.expect("read back");
    assert_eq!(bundle.ca_pem, winner.ca_pem);
    assert_eq!(bundle.cert_pem, winner.cert_pem);
}

#[tokio::test]
async fn unusable_secret_is_a_clear_error_and_nothing_is_written() {
    let broken = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "soma-operator-webhook-cert", "namespace": "soma-system"},
        "data": {"tls.crt": "bm90IGEgY2VydA=="}});
    let steps = vec![step(
        Method::GET,
        &format!("{SECRETS}/soma-operator-webhook-cert"),
        move |_| (StatusCode::OK, broken),
    )];
    let (result, _) = scripted(steps, |c| async move {
        obtain(&c, &options(), Duration::ZERO).await
    })
    .await;
    let message = result.expect_err("unusable").to_string();
    assert!(
        message.contains("soma-system/soma-operator-webhook-cert")
            && message.contains("ca.crt is missing")
            && message.contains("delete the Secret"),
        "{message}"
    );
}

#[tokio::test]
async fn cert_manager_mode_never_generates() {
    let cert_manager = WebhookOptions {
        cert_manager: true,
        ..options()
    };
    let steps = vec![step(
        Method::GET,
        &format!("{SECRETS}/soma-operator-webhook-cert"),
        |_| not_found(),
    )];
    let (result, _) = scripted(steps, |c| async move {
        obtain(&c, &cert_manager, Duration::ZERO).await
    })
    .await;
    assert!(
        matches!(result, Err(CertError::NotIssued { .. })),
        "{result:?}"
    );
}
