//! Scenarios of the image signature check (`--require-signed-images`), with a scripted
//! [`ImageVerifier`]: verified → pinned and recorded; rejected → `ImageNotVerified` and no
//! child written; registry down → retried with backoff; converged → no writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Method, StatusCode};
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use soma_operator::agent::image::{ImageRejection, ImageVerifier, VerifiedImage};
use soma_operator::context::Context;

use super::support::{Seen, Step, echo, not_found, step};
use super::{
    APPS, SOMA, agent_from, agent_json, budget_found, child_paths, condition, run_configured,
    stalled_status_steps,
};

const TAGGED: &str = "registry.example.com/helper:1.0";
const DIGEST: &str = "sha256:5e3a7f0c4d2b1a09887766554433221100ffeeddccbbaa998877665544332211";
const PINNED: &str = "registry.example.com/helper@sha256:5e3a7f0c4d2b1a09887766554433221100ffeeddccbbaa998877665544332211";

/// Answers every image with `result`, counting calls.
struct Scripted {
    result: Result<VerifiedImage, ImageRejection>,
    calls: AtomicUsize,
}

impl ImageVerifier for Scripted {
    fn verify<'a>(
        &'a self,
        image: &'a str,
    ) -> BoxFuture<'a, Result<VerifiedImage, ImageRejection>> {
        assert_eq!(image, TAGGED, "spec.image is what is verified");
        self.calls.fetch_add(1, Ordering::SeqCst);
        let result = self.result.clone();
        Box::pin(async move { result })
    }
}

fn verified() -> Arc<Scripted> {
    Arc::new(Scripted {
        result: Ok(VerifiedImage {
            digest: DIGEST.into(),
            signer: "key:sha256:abc".into(),
            verified_at: "2026-11-22T08:00:00Z".into(),
        }),
        calls: AtomicUsize::new(0),
    })
}

fn rejected(transient: bool) -> Arc<Scripted> {
    Arc::new(Scripted {
        result: Err(ImageRejection {
            reason: if transient {
                "RegistryUnreachable"
            } else {
                "WrongKey"
            }
            .into(),
            message: format!("image {TAGGED} is not verified: signed by another key"),
            transient,
        }),
        calls: AtomicUsize::new(0),
    })
}

fn tagged_agent() -> Value {
    let mut agent = agent_json();
    agent["spec"]["image"] = json!(TAGGED);
    agent
}

/// A context requiring signed images, verified by `verifier`.
fn requiring(verifier: Arc<Scripted>) -> impl FnOnce(Context) -> Context {
    move |mut c| {
        c.config.images.required = true;
        c.with_image_verifier(verifier)
    }
}

fn status_reply_tagged(body: &Value) -> (StatusCode, Value) {
    let mut agent = tagged_agent();
    agent["status"] = body["status"].clone();
    (StatusCode::OK, agent)
}

/// The first reconcile's steps: the Budget, every child created, the status written.
fn create_steps() -> Vec<Step> {
    let mut steps = vec![step(
        Method::GET,
        &format!("{SOMA}/budgets/team-budget"),
        budget_found,
    )];
    for path in child_paths() {
        steps.push(step(Method::GET, &path, |_| not_found()));
        steps.push(step(Method::PATCH, &path, echo));
    }
    steps.push(step(Method::GET, &format!("{SOMA}/agents/helper"), |_| {
        (StatusCode::OK, tagged_agent())
    }));
    steps.push(step(
        Method::PATCH,
        &format!("{SOMA}/agents/helper/status"),
        status_reply_tagged,
    ));
    steps
}

fn agent_image(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]["image"]
}

#[tokio::test]
async fn verified_image_is_pinned_by_digest_and_recorded() {
    let verifier = verified();
    let (result, seen, _) = run_configured(
        agent_from(tagged_agent()),
        create_steps(),
        requiring(verifier.clone()),
    )
    .await;
    assert_eq!(
        result.expect("reconcile succeeds"),
        Action::requeue(Duration::from_secs(600)),
        "the tag is resolved again after the recheck interval"
    );
    assert_eq!(verifier.calls.load(Ordering::SeqCst), 1);
    let deployment = seen
        .iter()
        .find(|s| s.method == Method::PATCH && s.path == format!("{APPS}/deployments/helper"))
        .expect("deployment applied");
    assert_eq!(agent_image(&deployment.body), PINNED);
    let status = &seen.last().expect("status").body["status"];
    assert_eq!(
        status["image"],
        json!({"reference": TAGGED, "digest": DIGEST, "signer": "key:sha256:abc", "verifiedAt": "2026-11-22T08:00:00Z"})
    );
}

#[tokio::test]
async fn rejected_image_stops_the_agent_without_writing_children() {
    let verifier = rejected(false);
    let mut steps = vec![step(
        Method::GET,
        &format!("{SOMA}/budgets/team-budget"),
        budget_found,
    )];
    steps.extend(stalled_status_steps());
    let (result, seen, _) =
        run_configured(agent_from(tagged_agent()), steps, requiring(verifier)).await;
    assert_eq!(result.expect("reconcile succeeds"), Action::await_change());
    let writes: Vec<&Seen> = seen.iter().filter(|s| s.method == Method::PATCH).collect();
    assert_eq!(writes.len(), 1, "only the status: {writes:?}");
    let status = &writes[0].body["status"];
    let ready = condition(status, "Ready");
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("False"), Some("ImageNotVerified"))
    );
    assert!(
        ready["message"]
            .as_str()
            .is_some_and(|m| m.contains("signed by another key")),
        "{ready}"
    );
    assert_eq!(condition(status, "Stalled")["status"], "True");
    assert!(status.get("image").is_none(), "nothing verified is claimed");
    let event = seen
        .iter()
        .find(|s| s.method == Method::POST)
        .expect("event");
    assert_eq!(event.body["reason"], "ImageNotVerified");
}

#[tokio::test]
async fn unreachable_registry_is_retried_with_backoff() {
    let verifier = rejected(true);
    let mut steps = vec![step(
        Method::GET,
        &format!("{SOMA}/budgets/team-budget"),
        budget_found,
    )];
    steps.extend(stalled_status_steps());
    let (result, seen, _) =
        run_configured(agent_from(tagged_agent()), steps, requiring(verifier)).await;
    assert_eq!(
        result.expect("reconcile succeeds"),
        Action::requeue(Duration::from_secs(1)),
        "first retry after 1 s"
    );
    assert!(
        seen.iter()
            .filter(|s| s.method == Method::PATCH)
            .all(|s| s.path.ends_with("/status")),
        "no child written"
    );
    let status = &seen
        .iter()
        .find(|s| s.path.ends_with("/status"))
        .expect("status")
        .body["status"];
    assert_eq!(condition(status, "Ready")["reason"], "ImageNotVerified");
    assert_eq!(condition(status, "Reconciling")["status"], "True");
    assert_eq!(condition(status, "Stalled")["status"], "False");
}

#[tokio::test]
async fn converged_agent_with_a_verified_image_makes_no_writes() {
    let (_, seen, _) = run_configured(
        agent_from(tagged_agent()),
        create_steps(),
        requiring(verified()),
    )
    .await;
    let mut live: Vec<Value> = seen
        .iter()
        .filter(|s| s.method == Method::PATCH)
        .take(5)
        .map(|s| s.body.clone())
        .collect();
    let first_status = seen.last().expect("status").body["status"].clone();
    live[3]["metadata"]["generation"] = json!(1);
    live[3]["status"] = json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1});
    let gets = |live: &Vec<Value>| {
        let mut steps = vec![step(
            Method::GET,
            &format!("{SOMA}/budgets/team-budget"),
            budget_found,
        )];
        for (path, object) in child_paths().into_iter().zip(live.clone()) {
            steps.push(step(Method::GET, &path, move |_| (StatusCode::OK, object)));
        }
        steps
    };
    // Second reconcile: the Deployment is ready, so the status changes (and an Event).
    let mut agent = tagged_agent();
    agent["status"] = first_status;
    let live_agent = agent.clone();
    let mut steps = gets(&live);
    steps.push(step(
        Method::GET,
        &format!("{SOMA}/agents/helper"),
        move |_| (StatusCode::OK, live_agent),
    ));
    steps.push(step(
        Method::PATCH,
        &format!("{SOMA}/agents/helper/status"),
        status_reply_tagged,
    ));
    steps.push(step(
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/team/events",
        echo,
    ));
    let (result, seen, _) =
        run_configured(agent_from(agent.clone()), steps, requiring(verified())).await;
    assert!(result.is_ok());
    let status = seen
        .iter()
        .find(|s| s.path.ends_with("/status"))
        .expect("status")
        .body["status"]
        .clone();
    assert_eq!(condition(&status, "Ready")["status"], "True");
    assert_eq!(status["image"]["digest"], DIGEST);

    // Third reconcile, verified again by a fresh operator: reads only.
    agent["status"] = status;
    let verifier = verified();
    let (result, seen, _) =
        run_configured(agent_from(agent), gets(&live), requiring(verifier.clone())).await;
    assert!(result.is_ok());
    assert_eq!(verifier.calls.load(Ordering::SeqCst), 1);
    assert!(
        seen.iter().all(|s| s.method == Method::GET),
        "no writes: {seen:?}"
    );
}
