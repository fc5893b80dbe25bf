//! One scripted API scenario per reconcile branch, in the style of kube-rs' controller-rs
//! `ApiServerVerifier`: the reconcile runs against a `tower-test` mock, and each scenario
//! states the exact requests it must make, in order, and nothing else.

#[path = "scenarios/image.rs"]
mod image;
mod support;

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use soma_crds::Agent;
use soma_operator::agent::reconcile::{error_policy, reconcile};
use soma_operator::config::OperatorConfig;
use soma_operator::context::Context;
use soma_operator::metrics::Metrics;
use soma_operator::policy::check::Checker;
use support::{
    Seen, Step, echo, listing_kb_revoked, not_found, revoked_kb, revoked_kb_entry, serve,
    sidecar_settings, step,
};

/// The live Agent as the API server has it (here: as the test's cache has it).
fn live_agent(_: &Value) -> (StatusCode, Value) {
    (StatusCode::OK, agent_json())
}

/// The API server answers a status patch with the whole object.
fn status_reply(body: &Value) -> (StatusCode, Value) {
    let mut agent = agent_json();
    agent["status"] = body["status"].clone();
    (StatusCode::OK, agent)
}

fn agent_json() -> Value {
    json!({
        "apiVersion": "soma.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": "helper", "namespace": "team", "uid": "agent-uid", "generation": 4, "resourceVersion": "10"},
        "spec": {
            "image": "registry.example.com/helper@sha256:0d7c",
            "port": 8080,
            "model": {"provider": "openai", "name": "gpt-4o"},
            "credentials": {"secretRef": {"name": "openai-key", "key": "api-key"}},
            "budgetRef": {"name": "team-budget"}
        }
    })
}

fn agent_from(value: Value) -> Arc<Agent> {
    Arc::new(serde_json::from_value(value).expect("agent"))
}

fn context(client: Client) -> Arc<Context> {
    Arc::new(Context::new(
        client,
        OperatorConfig::default(),
        Arc::new(Metrics::default()),
    ))
}

const NS: &str = "/api/v1/namespaces/team";
const APPS: &str = "/apis/apps/v1/namespaces/team";
const NET: &str = "/apis/networking.k8s.io/v1/namespaces/team";
const SOMA: &str = "/apis/soma.dev/v1alpha1/namespaces/team";

fn budget_found(_: &Value) -> (StatusCode, Value) {
    (
        StatusCode::OK,
        json!({"apiVersion": "soma.dev/v1alpha1", "kind": "Budget", "metadata": {"name": "team-budget", "namespace": "team"}, "spec": {"limits": {"tokens": 1000}, "period": {"calendar": "day"}}}),
    )
}

/// The condition of `type_` in a status object.
fn condition(status: &Value, type_: &str) -> Value {
    status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("condition {type_}"))
        .clone()
}

/// What a reconcile that cannot proceed does after resolving: read the Deployment (absent
/// here), read the live Agent, write the Stalled status, publish the Event.
fn stalled_status_steps() -> Vec<Step> {
    vec![
        step(Method::GET, &format!("{APPS}/deployments/helper"), |_| {
            not_found()
        }),
        step(Method::GET, &format!("{SOMA}/agents/helper"), live_agent),
        step(
            Method::PATCH,
            &format!("{SOMA}/agents/helper/status"),
            status_reply,
        ),
        step(
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/team/events",
            echo,
        ),
    ]
}

/// The children paths in the order the reconcile applies them.
fn child_paths() -> Vec<String> {
    vec![
        format!("{NS}/serviceaccounts/helper"),
        format!("{NS}/configmaps/helper-sidecar"),
        format!("{NET}/networkpolicies/helper"),
        format!("{APPS}/deployments/helper"),
        format!("{NS}/services/helper"),
    ]
}

type Outcome = (
    kube::Result<Action, soma_operator::error::Error>,
    Vec<Seen>,
    Arc<Context>,
);

/// Runs one reconcile of `agent` against `steps`.
async fn run(agent: Arc<Agent>, steps: Vec<Step>) -> Outcome {
    run_with(agent, steps, Checker::default()).await
}

/// Runs one reconcile of `agent` against `steps`, re-checking it against `policy`.
async fn run_with(agent: Arc<Agent>, steps: Vec<Step>, policy: Checker) -> Outcome {
    run_configured(agent, steps, |c| c.with_policy(policy)).await
}

/// Runs one reconcile of `agent` against `steps` with a context `configure` adjusts.
async fn run_configured(
    agent: Arc<Agent>,
    steps: Vec<Step>,
    configure: impl FnOnce(Context) -> Context,
) -> Outcome {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(serve(handle, steps));
    let ctx = Arc::new(configure(
        Arc::into_inner(context(Client::new(service, "default"))).expect("one reference"),
    ));
    let result = reconcile(agent, ctx.clone()).await;
    // Dropping every clone of the mock client ends the request stream, so `serve` can check
    // that no extra request follows; the caller gets a context on a fresh mock instead.
    let ctx_for_caller = Arc::new(Context::new(
        Client::new(
            tower_test::mock::pair::<Request<Body>, Response<Body>>().0,
            "default",
        ),
        OperatorConfig::default(),
        ctx.metrics.clone(),
    ));
    drop(ctx);
    let seen = tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("scenario finished")
        .expect("scenario passed");
    (result, seen, ctx_for_caller)
}

/// The first reconcile: every child is created by server-side apply under `soma.dev/agent`,
/// owned by the Agent, and the status says the Deployment is not yet ready.
async fn first_reconcile() -> (Vec<Seen>, Value) {
    let mut steps = vec![step(
        Method::GET,
        &format!("{SOMA}/budgets/team-budget"),
        budget_found,
    )];
    for path in child_paths() {
        steps.push(step(Method::GET, &path, |_| not_found()));
        steps.push(step(Method::PATCH, &path, echo));
    }
    steps.push(step(
        Method::GET,
        &format!("{SOMA}/agents/helper"),
        live_agent,
    ));
    steps.push(step(
        Method::PATCH,
        &format!("{SOMA}/agents/helper/status"),
        status_reply,
    ));
    let (result, seen, _) = run(agent_from(agent_json()), steps).await;
    assert_eq!(
        result.expect("reconcile succeeds"),
        Action::requeue(std::time::Duration::from_secs(3600))
    );
    let status = seen.last().expect("status write").body["status"].clone();
    (seen, status)
}

#[tokio::test]
async fn first_reconcile_creates_every_child_with_field_manager_and_owner() {
    let (seen, status) = first_reconcile().await;
    let writes: Vec<&Seen> = seen.iter().filter(|s| s.method == Method::PATCH).collect();
    assert_eq!(writes.len(), 6, "five children and the status");
    for w in &writes {
        assert!(
            w.query.contains("fieldManager=soma.dev%2Fagent"),
            "{}: field manager in {:?}",
            w.path,
            w.query
        );
        assert!(w.query.contains("force=true"), "{}: force", w.path);
        assert_eq!(
            w.content_type, "application/apply-patch+yaml",
            "{}: server-side apply",
            w.path
        );
    }
    for w in &writes[..5] {
        let owner = &w.body["metadata"]["ownerReferences"][0];
        assert_eq!(owner["uid"], "agent-uid", "{}", w.path);
        assert_eq!(owner["kind"], "Agent");
        assert_eq!(owner["controller"], true);
        assert_eq!(w.body["metadata"]["labels"]["soma.dev/agent"], "helper");
        assert!(
            w.body["metadata"]["annotations"]["soma.dev/applied-hash"].is_string(),
            "{}",
            w.path
        );
    }
    let ready = condition(&status, "Ready");
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("False"), Some("Progressing"))
    );
    assert_eq!(status["observedGeneration"], 4);
}

#[tokio::test]
async fn unchanged_agent_makes_no_writes() {
    // Converge once, then let the "cluster" report the Deployment ready.
    let (seen, _) = first_reconcile().await;
    let mut live: Vec<Value> = seen
        .iter()
        .filter(|s| s.method == Method::PATCH)
        .take(5)
        .map(|s| s.body.clone())
        .collect();
    live[3]["metadata"]["generation"] = json!(1);
    live[3]["status"] = json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1});
    // Server-added fields must not count as differences.
    for object in &mut live {
        object["metadata"]["resourceVersion"] = json!("77");
        object["metadata"]["managedFields"] =
            json!([{"manager": "soma.dev/agent", "operation": "Apply"}]);
    }
    live[3]["spec"]["progressDeadlineSeconds"] = json!(600);

    // Second reconcile: nothing to apply, the status changes to Ready.
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
    let mut steps = gets(&live);
    steps.push(step(
        Method::GET,
        &format!("{SOMA}/agents/helper"),
        live_agent,
    ));
    steps.push(step(
        Method::PATCH,
        &format!("{SOMA}/agents/helper/status"),
        status_reply,
    ));
    steps.push(step(
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/team/events",
        echo,
    ));
    let (result, seen, _) = run(agent_from(agent_json()), steps).await;
    assert!(result.is_ok());
    let status = seen
        .iter()
        .find(|s| s.path.ends_with("/status"))
        .expect("status")
        .body["status"]
        .clone();
    let ready = condition(&status, "Ready");
    assert_eq!(ready["status"], "True");
    let event = seen
        .iter()
        .find(|s| s.method == Method::POST)
        .expect("event");
    assert_eq!(event.body["reason"], "Available");

    // Third reconcile with that status: only reads, no write of any kind.
    let mut agent = agent_json();
    agent["status"] = status;
    let (result, seen, _) = run(agent_from(agent), gets(&live)).await;
    assert_eq!(
        result.expect("reconcile succeeds"),
        Action::requeue(std::time::Duration::from_secs(3600))
    );
    assert!(
        seen.iter().all(|s| s.method == Method::GET),
        "no writes: {seen:?}"
    );
}

#[tokio::test]
async fn edited_child_is_put_back() {
    let (seen, status) = first_reconcile().await;
    let mut live: Vec<Value> = seen
        .iter()
        .filter(|s| s.method == Method::PATCH)
        .take(5)
        .map(|s| s.body.clone())
        .collect();
    // Someone weakens the sandbox by hand.
    live[3]["spec"]["template"]["spec"]["automountServiceAccountToken"] = json!(true);
    let mut steps = vec![step(
        Method::GET,
        &format!("{SOMA}/budgets/team-budget"),
        budget_found,
    )];
    for (i, (path, object)) in child_paths().into_iter().zip(live).enumerate() {
        steps.push(step(Method::GET, &path, move |_| (StatusCode::OK, object)));
        if i == 3 {
            steps.push(step(Method::PATCH, &path, echo));
        }
    }
    let mut agent = agent_json();
    agent["status"] = status;
    let (result, seen, _) = run(agent_from(agent), steps).await;
    assert!(result.is_ok());
    let patch = seen
        .iter()
        .find(|s| s.method == Method::PATCH)
        .expect("deployment re-applied");
    assert_eq!(
        patch.body["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );
}

#[tokio::test]
async fn missing_budget_sets_condition_and_event_and_starts_nothing() {
    let mut steps = vec![step(
        Method::GET,
        &format!("{SOMA}/budgets/team-budget"),
        |_| not_found(),
    )];
    steps.extend(stalled_status_steps());
    let (result, seen, _) = run(agent_from(agent_json()), steps).await;
    assert_eq!(
        result.expect("a missing reference is not an error to retry"),
        Action::await_change()
    );
    let status = &seen[3].body["status"];
    assert_eq!(condition(status, "Ready")["status"], "False");
    assert_eq!(condition(status, "Ready")["reason"], "BudgetNotFound");
    assert!(
        condition(status, "Ready")["message"]
            .as_str()
            .is_some_and(|m| m.contains("team-budget") && m.contains("spec.budgetRef"))
    );
    assert_eq!(condition(status, "Stalled")["status"], "True");
    let event = &seen[4].body;
    assert_eq!(event["reason"], "BudgetNotFound");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["name"], "helper");
}

#[tokio::test]
async fn rejected_child_stalls_instead_of_retrying() {
    let invalid = |_: &Value| {
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422, "message": "Deployment.apps \"helper\" is invalid: spec.template.spec.runtimeClassName: Invalid value"}),
        )
    };
    let mut steps = vec![step(
        Method::GET,
        &format!("{SOMA}/budgets/team-budget"),
        budget_found,
    )];
    for (i, path) in child_paths().into_iter().take(4).enumerate() {
        steps.push(step(Method::GET, &path, |_| not_found()));
        steps.push(if i == 3 {
            step(Method::PATCH, &path, invalid)
        } else {
            step(Method::PATCH, &path, echo)
        });
    }
    steps.extend(stalled_status_steps());
    let (result, seen, _) = run(agent_from(agent_json()), steps).await;
    assert_eq!(
        result.expect("permanent failures are reported in status"),
        Action::await_change()
    );
    let status = &seen
        .iter()
        .find(|s| s.path.ends_with("/status"))
        .expect("status")
        .body["status"];
    let stalled = condition(status, "Stalled");
    assert_eq!(stalled["status"], "True");
    assert_eq!(stalled["reason"], "ApplyFailed");
    assert!(
        stalled["message"]
            .as_str()
            .is_some_and(|m| m.contains("runtimeClassName"))
    );
}

#[tokio::test]
async fn transient_failure_is_retried_with_growing_backoff() {
    let unavailable = |_: &Value| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503, "message": "etcd leader changed"}),
        )
    };
    let steps = vec![step(
        Method::GET,
        &format!("{SOMA}/budgets/team-budget"),
        unavailable,
    )];
    let agent = agent_from(agent_json());
    let (result, seen, ctx) = run(agent.clone(), steps).await;
    assert_eq!(seen.len(), 1);
    let error = result.expect_err("a 503 fails the reconcile");
    assert!(error.is_transient());
    let first = error_policy(agent.clone(), &error, ctx.clone());
    let second = error_policy(agent.clone(), &error, ctx.clone());
    let third = error_policy(agent, &error, ctx);
    assert_eq!(first, Action::requeue(std::time::Duration::from_secs(1)));
    assert_eq!(second, Action::requeue(std::time::Duration::from_secs(2)));
    assert_eq!(third, Action::requeue(std::time::Duration::from_secs(4)));
}

#[tokio::test]
async fn deleted_agent_is_left_to_the_garbage_collector() {
    let mut agent = agent_json();
    agent["metadata"]["deletionTimestamp"] = json!("2026-11-22T00:00:00Z");
    let (result, seen, _) = run(agent_from(agent), vec![]).await;
    assert_eq!(
        result.expect("deletion needs no work"),
        Action::await_change()
    );
    assert!(
        seen.is_empty(),
        "children carry owner references; nothing to call"
    );
}

#[tokio::test]
async fn service_is_deleted_when_the_port_goes_away() {
    let (seen, status) = first_reconcile().await;
    let live: Vec<Value> = seen
        .iter()
        .filter(|s| s.method == Method::PATCH)
        .take(5)
        .map(|s| s.body.clone())
        .collect();
    let mut agent = agent_json();
    agent["spec"].as_object_mut().expect("spec").remove("port");
    agent["metadata"]["generation"] = json!(5);
    agent["status"] = status;
    let mut steps = vec![step(
        Method::GET,
        &format!("{SOMA}/budgets/team-budget"),
        budget_found,
    )];
    let paths = child_paths();
    for (path, object) in paths.iter().take(4).cloned().zip(live.clone()) {
        steps.push(step(Method::GET, &path, move |_| (StatusCode::OK, object)));
        // The port is gone from the pod and the policy, so those two are re-applied.
        if path.contains("deployments") || path.contains("networkpolicies") {
            steps.push(step(Method::PATCH, &path, echo));
        }
    }
    let service = live[4].clone();
    steps.push(step(Method::GET, &paths[4], move |_| {
        (StatusCode::OK, service)
    }));
    steps.push(step(Method::DELETE, &paths[4], |_| {
        (
            StatusCode::OK,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        )
    }));
    steps.push(step(
        Method::GET,
        &format!("{SOMA}/agents/helper"),
        live_agent,
    ));
    steps.push(step(
        Method::PATCH,
        &format!("{SOMA}/agents/helper/status"),
        status_reply,
    ));
    let (result, seen, _) = run(agent_from(agent), steps).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(seen.iter().any(|s| s.method == Method::DELETE));
}

#[tokio::test]
async fn missing_parent_budget_names_the_parent_field() {
    let with_parent = |_: &Value| {
        (
            StatusCode::OK,
            json!({"apiVersion": "soma.dev/v1alpha1", "kind": "Budget",
                   "metadata": {"name": "team-budget", "namespace": "team"},
                   "spec": {"limits": {"tokens": 1000}, "period": {"calendar": "day"}, "parentRef": {"name": "tenant"}}}),
        )
    };
    let mut steps = vec![
        step(
            Method::GET,
            &format!("{SOMA}/budgets/team-budget"),
            with_parent,
        ),
        step(Method::GET, &format!("{SOMA}/budgets/tenant"), |_| {
            not_found()
        }),
    ];
    steps.extend(stalled_status_steps());
    let (result, seen, _) = run(agent_from(agent_json()), steps).await;
    assert_eq!(
        result.expect("waits for the parent"),
        Action::await_change()
    );
    let ready = condition(&seen[4].body["status"], "Ready");
    assert_eq!(ready["reason"], "BudgetNotFound");
    let message = ready["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("\"tenant\"")
            && message.contains("spec.parentRef of Budget team/team-budget"),
        "{message}"
    );
}

#[tokio::test]
async fn budget_parent_loop_stalls() {
    let budget = |name: &'static str, parent: &'static str| {
        move |_: &Value| {
            (
                StatusCode::OK,
                json!({"apiVersion": "soma.dev/v1alpha1", "kind": "Budget",
                       "metadata": {"name": name, "namespace": "team"},
                       "spec": {"limits": {"tokens": 1}, "period": {"calendar": "day"}, "parentRef": {"name": parent}}}),
            )
        }
    };
    let mut steps = vec![
        step(
            Method::GET,
            &format!("{SOMA}/budgets/team-budget"),
            budget("team-budget", "tenant"),
        ),
        step(
            Method::GET,
            &format!("{SOMA}/budgets/tenant"),
            budget("tenant", "team-budget"),
        ),
    ];
    steps.extend(stalled_status_steps());
    let (result, seen, _) = run(agent_from(agent_json()), steps).await;
    assert_eq!(result.expect("a loop is permanent"), Action::await_change());
    let stalled = condition(&seen[4].body["status"], "Stalled");
    assert_eq!(stalled["status"], "True");
    assert_eq!(stalled["reason"], "BudgetChainInvalid");
}

/// The built-in policies, as the operator loads them at start-up.
fn builtins(deadline: std::time::Duration) -> Checker {
    let (store, report) = soma_policy::PolicyStore::loaded(&soma_policy::Sources::builtins());
    assert!(report.is_clean(), "{:?}", report.errors);
    Checker {
        store: Arc::new(store),
        deadline,
        fail_open: false,
    }
}

#[tokio::test]
async fn agent_denied_by_a_policy_is_not_started_and_says_why() {
    let mut agent = agent_json();
    agent["spec"]["image"] = json!("registry.example.com/helper:latest");
    let mut steps = vec![step(
        Method::GET,
        &format!("{SOMA}/budgets/team-budget"),
        budget_found,
    )];
    // No child is read or written: straight to the status.
    steps.extend(stalled_status_steps());
    let (result, seen, _) = run_with(
        agent_from(agent),
        steps,
        builtins(std::time::Duration::from_secs(5)),
    )
    .await;
    assert_eq!(
        result.expect("a denial is not an error to retry"),
        Action::await_change()
    );
    let status = &seen[3].body["status"];
    let policy = condition(status, "PolicyAllowed");
    assert_eq!(
        (policy["status"].as_str(), policy["reason"].as_str()),
        (Some("False"), Some("Denied"))
    );
    assert!(
        policy["message"]
            .as_str()
            .is_some_and(|m| m.contains("[SomaImages/") && m.contains("digest")),
        "{policy}"
    );
    let ready = condition(status, "Ready");
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("False"), Some("PolicyDenied"))
    );
    assert_eq!(condition(status, "Stalled")["status"], "True");
    assert_eq!(seen[4].body["reason"], "PolicyDenied");
    assert_eq!(seen[4].body["type"], "Warning");
}

#[tokio::test]
async fn policy_that_cannot_be_evaluated_blocks_and_is_retried() {
    let mut steps = vec![step(
        Method::GET,
        &format!("{SOMA}/budgets/team-budget"),
        budget_found,
    )];
    // A zero deadline: no constraint finishes, so the decision fails closed.
    steps.extend(stalled_status_steps());
    let (result, seen, _) = run_with(
        agent_from(agent_json()),
        steps,
        builtins(std::time::Duration::ZERO),
    )
    .await;
    assert_eq!(
        result.expect("retried by requeue, not by the error policy"),
        Action::requeue(std::time::Duration::from_secs(1))
    );
    let status = &seen[3].body["status"];
    assert_eq!(condition(status, "PolicyAllowed")["reason"], "PolicyError");
    assert_eq!(condition(status, "Ready")["reason"], "PolicyError");
    assert_eq!(condition(status, "Reconciling")["status"], "True");
    assert_eq!(condition(status, "Stalled")["status"], "False");
    assert_eq!(seen[4].body["reason"], "PolicyError");
}

#[tokio::test]
async fn allowed_agent_reports_policy_allowed() {
    let (_, status) = first_reconcile().await;
    let policy = condition(&status, "PolicyAllowed");
    assert_eq!(
        (policy["status"].as_str(), policy["reason"].as_str()),
        (Some("True"), Some("Allowed"))
    );
}

#[tokio::test]
async fn agent_waits_for_a_capsule_that_is_not_ready() {
    let mut agent = agent_json();
    agent["spec"]["capsules"] = json!([{"name": "kb"}]);
    let capsule = json!({
        "apiVersion": "soma.dev/v1alpha1", "kind": "Capsule",
        "metadata": {"name": "kb", "namespace": "team"},
        "spec": {"version": "1", "policyHash": format!("sha256:{}", "9b".repeat(32)),
                 "source": {"oci": {"repository": "r", "digest": format!("sha256:{}", "aa".repeat(32))}},
                 "signature": {"publicKeyRef": {"name": "signers", "key": "cosign.pub"}}},
        "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "VerificationUnavailable",
            "message": "this operator build cannot verify Cosign signatures yet",
            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    });
    let mut steps = vec![
        step(
            Method::GET,
            &format!("{SOMA}/budgets/team-budget"),
            budget_found,
        ),
        step(Method::GET, &format!("{SOMA}/capsules/kb"), move |_| {
            (StatusCode::OK, capsule)
        }),
    ];
    steps.extend(stalled_status_steps());
    let (result, seen, _) = run(agent_from(agent), steps).await;
    assert_eq!(result.expect("waits"), Action::await_change());
    let status = &seen[4].body["status"];
    let ready = condition(status, "Ready");
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("False"), Some("CapsuleNotReady"))
    );
    assert!(
        ready["message"]
            .as_str()
            .is_some_and(|m| m.contains("\"kb\"") && m.contains("VerificationUnavailable")),
        "{ready}"
    );
    assert_eq!(seen[5].body["reason"], "CapsuleNotReady");
}

/// An Agent whose pods run with Capsule `kb`, now revoked: the sidecar ConfigMap of its
/// running pods is read, and written with the revocation; the status says so.
fn revoked_capsule_steps(config_map: Value) -> (Value, Vec<Step>) {
    let mut agent = agent_json();
    agent["spec"]["capsules"] = json!([{"name": "kb"}]);
    let capsule = revoked_kb();
    let steps = vec![
        step(
            Method::GET,
            &format!("{SOMA}/budgets/team-budget"),
            budget_found,
        ),
        step(Method::GET, &format!("{SOMA}/capsules/kb"), move |_| {
            (StatusCode::OK, capsule)
        }),
        step(
            Method::GET,
            &format!("{NS}/configmaps/helper-sidecar"),
            move |_| (StatusCode::OK, config_map),
        ),
    ];
    (agent, steps)
}

/// The sidecar ConfigMap the operator wrote when the pods started.
fn running_config_map(agent: &Value) -> Value {
    let agent: Agent = serde_json::from_value(agent.clone()).expect("agent");
    let children = soma_operator::agent::children::children(
        &agent,
        &soma_operator::agent::children::Resolved {
            replicas: 1,
            ..Default::default()
        },
        &OperatorConfig::default(),
    )
    .expect("children");
    serde_json::to_value(children.sidecar_config).expect("json")
}

#[tokio::test]
async fn a_revoked_capsule_reaches_the_running_pods_configuration_without_rolling_them() {
    let (agent, _) = revoked_capsule_steps(json!({}));
    let (agent, mut steps) = revoked_capsule_steps(running_config_map(&agent));
    steps.push(step(
        Method::PATCH,
        &format!("{NS}/configmaps/helper-sidecar"),
        echo,
    ));
    steps.extend(stalled_status_steps());
    let (result, seen, _) = run(agent_from(agent), steps).await;
    assert_eq!(result.expect("waits"), Action::await_change());
    let written = &seen[3];
    assert_eq!(written.content_type, "application/apply-patch+yaml");
    let settings = sidecar_settings(&written.body);
    assert_eq!(settings["revokedCapsules"], json!([revoked_kb_entry()]));
    assert_eq!(
        written.body["metadata"]["ownerReferences"][0]["uid"],
        "agent-uid"
    );
    // Only the ConfigMap: the Deployment is read, never written (steps would fail otherwise).
    let ready = condition(&seen[6].body["status"], "Ready");
    assert_eq!(ready["reason"], "CapsuleNotReady");
    assert!(
        ready["message"]
            .as_str()
            .is_some_and(|m| m.contains("(Revoked:")
                && m.contains("Running pods are told to stop using [\"kb\"]")),
        "{ready}"
    );
}

#[tokio::test]
async fn a_revocation_the_configuration_already_carries_is_not_written_again() {
    let (agent, _) = revoked_capsule_steps(json!({}));
    let cm = listing_kb_revoked(running_config_map(&agent));
    let (agent, mut steps) = revoked_capsule_steps(cm);
    steps.extend(stalled_status_steps());
    let (result, _, _) = run(agent_from(agent), steps).await;
    assert_eq!(result.expect("waits"), Action::await_change());
}
