//! One scripted API scenario per branch of the Job reconcile, in the style of kube-rs'
//! controller-rs `ApiServerVerifier`: the exact requests each branch makes, in order, and
//! nothing else.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use soma_crds::Job;
use soma_operator::config::{LedgerConfig, OperatorConfig, Redacted};
use soma_operator::context::Context;
use soma_operator::job::reconcile::reconcile;
use soma_operator::metrics::Metrics;
use soma_operator::policy::check::Checker;
use support::{
    Seen, Step, echo, listing_kb_revoked, not_found, revoked_kb, revoked_kb_entry, serve,
    sidecar_settings, step,
};

const NS: &str = "/api/v1/namespaces/team";
const NET: &str = "/apis/networking.k8s.io/v1/namespaces/team";
const BATCH: &str = "/apis/batch/v1/namespaces/team";
const SOMA: &str = "/apis/soma.dev/v1alpha1/namespaces/team";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/team/events";

fn job_json() -> Value {
    json!({
        "apiVersion": "soma.dev/v1alpha1", "kind": "Job",
        "metadata": {"name": "summarise", "namespace": "team", "uid": "job-uid", "generation": 1,
                     "resourceVersion": "10", "creationTimestamp": "2026-12-07T09:00:00Z"},
        "spec": {"agentRef": {"name": "helper"}, "input": "Summarise incident 4711",
                 "budgetRef": {"name": "team-budget"}, "deadlineSeconds": 900, "retries": 2,
                 "ttlSecondsAfterFinished": 60}
    })
}

fn drill_json() -> Value {
    json!({
        "apiVersion": "soma.dev/v1alpha1", "kind": "Job",
        "metadata": {"name": "drill", "namespace": "team", "uid": "drill-uid", "generation": 1,
                     "resourceVersion": "10", "creationTimestamp": "2026-12-07T09:00:00Z"},
        "spec": {"drDrill": {"scratchSecretRef": {"name": "scratch", "key": "url"}},
                 "deadlineSeconds": 1800}
    })
}

fn agent_json(image: &str) -> Value {
    json!({
        "apiVersion": "soma.dev/v1alpha1", "kind": "Agent",
        "metadata": {"name": "helper", "namespace": "team", "uid": "agent-uid", "generation": 1},
        "spec": {"image": image, "model": {"provider": "openai", "name": "gpt-4o-mini"},
                 "credentials": {"secretRef": {"name": "openai-key", "key": "api-key"}},
                 "budgetRef": {"name": "agent-budget"}}
    })
}

const IMAGE: &str = "registry.example.com/helper@sha256:0d7c";

fn budget(status: Value) -> Value {
    json!({"apiVersion": "soma.dev/v1alpha1", "kind": "Budget",
           "metadata": {"name": "team-budget", "namespace": "team", "uid": "b-uid"},
           "spec": {"limits": {"costMicros": 1000}, "period": {"calendar": "day"}},
           "status": status})
}

fn found(v: Value) -> impl FnOnce(&Value) -> (StatusCode, Value) + Send + 'static {
    move |_| (StatusCode::OK, v)
}

fn list(kind: &str, items: Value) -> impl FnOnce(&Value) -> (StatusCode, Value) + Send + 'static {
    let kind = kind.to_owned();
    move |_| {
        (
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items}),
        )
    }
}

fn status_reply(job: Value) -> impl FnOnce(&Value) -> (StatusCode, Value) + Send + 'static {
    move |body: &Value| {
        let mut job = job;
        job["status"] = body["status"].clone();
        (StatusCode::OK, job)
    }
}

/// Reading the live Job, writing its status, publishing the phase's Event.
fn status_steps(job: &Value) -> Vec<Step> {
    let name = job["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    vec![
        step(
            Method::GET,
            &format!("{SOMA}/jobs/{name}"),
            found(job.clone()),
        ),
        step(
            Method::PATCH,
            &format!("{SOMA}/jobs/{name}/status"),
            status_reply(job.clone()),
        ),
        step(Method::POST, EVENTS, echo),
    ]
}

fn condition(status: &Value, type_: &str) -> Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .cloned()
        .unwrap_or(Value::Null)
}

fn reason(status: &Value) -> (String, String) {
    let c = condition(status, "Ready");
    (
        c["status"].as_str().unwrap_or_default().to_owned(),
        c["reason"].as_str().unwrap_or_default().to_owned(),
    )
}

type Outcome = (Result<Action, soma_operator::error::Error>, Vec<Seen>);

async fn run(job: Value, steps: Vec<Step>, configure: impl FnOnce(Context) -> Context) -> Outcome {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(serve(handle, steps));
    let ctx = Arc::new(configure(Context::new(
        Client::new(service, "default"),
        OperatorConfig::default(),
        Arc::new(Metrics::default()),
    )));
    let job: Arc<Job> = Arc::new(serde_json::from_value(job).expect("job"));
    let result = reconcile(job, ctx.clone()).await;
    drop(ctx);
    let seen = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("scenario finished")
        .expect("scenario passed");
    (result, seen)
}

fn plain(c: Context) -> Context {
    c
}

/// The reads that resolve the example task: no run yet, the Agent, its Budget.
fn resolve_steps(agent: Value, budget_status: Value) -> Vec<Step> {
    vec![
        step(Method::GET, &format!("{BATCH}/jobs/summarise"), |_| {
            not_found()
        }),
        step(Method::GET, &format!("{SOMA}/agents/helper"), found(agent)),
        step(
            Method::GET,
            &format!("{SOMA}/budgets/team-budget"),
            found(budget(budget_status)),
        ),
    ]
}

fn status_of(seen: &[Seen]) -> Value {
    seen.iter()
        .rev()
        .find(|s| s.path.ends_with("/status"))
        .expect("a status write")
        .body["status"]
        .clone()
}

/// The last Event published.
fn event(seen: &[Seen]) -> &Value {
    &seen
        .iter()
        .rev()
        .find(|s| s.path == EVENTS)
        .expect("an Event")
        .body
}

/// The API server's answer to a DELETE.
fn deleted(_: &Value) -> (StatusCode, Value) {
    (
        StatusCode::OK,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
    )
}

#[tokio::test]
async fn a_job_whose_agent_is_missing_stalls_with_the_field_to_fix_and_starts_nothing() {
    let mut steps = vec![
        step(Method::GET, &format!("{BATCH}/jobs/summarise"), |_| {
            not_found()
        }),
        step(Method::GET, &format!("{SOMA}/agents/helper"), |_| {
            not_found()
        }),
    ];
    steps.extend(status_steps(&job_json()));
    let (result, seen) = run(job_json(), steps, plain).await;
    assert_eq!(
        result.expect("permanent, not an error"),
        Action::await_change()
    );
    let status = status_of(&seen);
    assert_eq!(status["phase"], "Pending");
    assert_eq!(reason(&status), ("False".into(), "AgentNotFound".into()));
    assert_eq!(condition(&status, "Stalled")["status"], "True");
    let message = condition(&status, "Ready")["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains("Agent \"helper\" does not exist in namespace \"team\"; create it or correct spec.agentRef"), "{message}");
    assert_eq!(
        (
            event(&seen)["type"].as_str(),
            event(&seen)["reason"].as_str()
        ),
        (Some("Warning"), Some("AgentNotFound"))
    );
}

#[tokio::test]
async fn a_job_whose_budget_is_missing_names_it() {
    let mut steps = vec![
        step(Method::GET, &format!("{BATCH}/jobs/summarise"), |_| {
            not_found()
        }),
        step(
            Method::GET,
            &format!("{SOMA}/agents/helper"),
            found(agent_json(IMAGE)),
        ),
        step(Method::GET, &format!("{SOMA}/budgets/team-budget"), |_| {
            not_found()
        }),
    ];
    steps.extend(status_steps(&job_json()));
    let (_, seen) = run(job_json(), steps, plain).await;
    let status = status_of(&seen);
    assert_eq!(reason(&status), ("False".into(), "BudgetNotFound".into()));
    assert!(condition(&status, "Ready")["message"].as_str().unwrap_or_default().contains("Budget \"team-budget\" does not exist in namespace \"team\"; create it or correct spec.budgetRef"));
}

#[tokio::test]
async fn an_agent_denied_by_a_policy_never_starts_a_pod() {
    let (store, report) = soma_policy::PolicyStore::loaded(&soma_policy::Sources::builtins());
    assert!(report.is_clean(), "{:?}", report.errors);
    let checker = Checker {
        store: Arc::new(store),
        deadline: Duration::from_secs(5),
        fail_open: false,
    };
    // An image without a digest: the built-in SomaImages policy denies the Agent.
    let mut steps = resolve_steps(agent_json("registry.example.com/helper:latest"), json!({}));
    steps.extend(status_steps(&job_json()));
    let (result, seen) = run(job_json(), steps, |c| c.with_policy(checker)).await;
    assert_eq!(
        result.expect("a denial waits for a change"),
        Action::await_change()
    );
    let status = status_of(&seen);
    assert_eq!(reason(&status), ("False".into(), "PolicyDenied".into()));
    assert_eq!(condition(&status, "PolicyAllowed")["status"], "False");
    assert!(
        !seen
            .iter()
            .any(|s| s.path.contains("/apis/batch/") && s.method == Method::PATCH),
        "no batch/v1 Job is written"
    );
}

#[tokio::test]
async fn a_job_whose_budget_is_exhausted_waits_until_its_period_resets() {
    let reset = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600);
    let exhausted = json!({"periodEnd": reset.to_string(), "conditions": [
        {"type": "Exhausted", "status": "True", "reason": "CapReached",
         "message": "limits.costMicros is used up", "lastTransitionTime": "2026-12-07T08:00:00Z"}]});
    let mut steps = resolve_steps(agent_json(IMAGE), exhausted);
    steps.extend(status_steps(&job_json()));
    let (result, seen) = run(job_json(), steps, plain).await;
    let action = result.expect("waiting is not an error");
    let status = status_of(&seen);
    assert_eq!(status["phase"], "Waiting");
    assert_eq!(reason(&status), ("False".into(), "BudgetExhausted".into()));
    assert_eq!(condition(&status, "Reconciling")["status"], "True");
    let message = condition(&status, "Ready")["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("Budget team/team-budget is exhausted (limits.costMicros is used up)"),
        "{message}"
    );
    assert!(
        message.contains(&format!("the Job starts when its period resets at {reset}")),
        "{message}"
    );
    // Requeued for the reset, not polled.
    let wait = Duration::from_secs(3600);
    assert!(
        action == Action::requeue(wait) || format!("{action:?}").contains("requeue_after: Some(3"),
        "{action:?}"
    );
    assert_eq!(event(&seen)["reason"], "BudgetExhausted");
    assert_eq!(event(&seen)["type"], "Warning");
}

#[tokio::test]
async fn a_budget_whose_period_has_reset_no_longer_holds_the_job_back() {
    // The Budget's status still says Exhausted, for a period that is over (the clock passed
    // its periodEnd before the Budget controller rolled it over): the Job starts.
    let past = json!({"periodEnd": "2020-01-01T00:00:00Z", "conditions": [
        {"type": "Exhausted", "status": "True", "reason": "CapReached", "message": "m",
         "lastTransitionTime": "2019-12-31T08:00:00Z"}]});
    let mut steps = resolve_steps(agent_json(IMAGE), past);
    steps.extend(start_steps(json!([])));
    steps.extend(status_steps(&job_json()));
    let (_, seen) = run(job_json(), steps, plain).await;
    assert_eq!(status_of(&seen)["phase"], "Running");
}

/// What starting the example task writes, after resolving: the slot count, the children
/// (each read, then applied), the run.
fn start_steps(running: Value) -> Vec<Step> {
    let mut steps = vec![step(
        Method::GET,
        &format!("{BATCH}/jobs"),
        list("JobList", running),
    )];
    for path in [
        format!("{NS}/serviceaccounts/sjob-summarise"),
        format!("{NS}/configmaps/sjob-summarise-sidecar"),
        format!("{NET}/networkpolicies/sjob-summarise"),
    ] {
        steps.push(step(Method::GET, &path, |_| not_found()));
        steps.push(step(Method::PATCH, &path, echo));
    }
    steps.push(step(
        Method::PATCH,
        &format!("{BATCH}/jobs/summarise"),
        echo,
    ));
    steps
}

#[tokio::test]
async fn a_runnable_task_becomes_a_batch_job_owned_by_it() {
    let mut steps = resolve_steps(agent_json(IMAGE), json!({}));
    steps.extend(start_steps(json!([])));
    steps.extend(status_steps(&job_json()));
    let (result, seen) = run(job_json(), steps, plain).await;
    assert_eq!(result.expect("started"), Action::await_change());
    let list = seen
        .iter()
        .find(|s| s.path == format!("{BATCH}/jobs"))
        .expect("the slot count");
    assert!(list.query.contains("labelSelector="), "{}", list.query);
    let batch = seen
        .iter()
        .find(|s| s.method == Method::PATCH && s.path == format!("{BATCH}/jobs/summarise"))
        .expect("the run");
    assert!(
        batch.query.contains("fieldManager=soma.dev%2Fjob") && batch.query.contains("force=true"),
        "{}",
        batch.query
    );
    assert_eq!(batch.content_type, "application/apply-patch+yaml");
    let b = &batch.body;
    assert_eq!(
        (
            b["spec"]["backoffLimit"].clone(),
            b["spec"]["activeDeadlineSeconds"].clone()
        ),
        (json!(2), json!(900))
    );
    assert_eq!(b["metadata"]["ownerReferences"][0]["uid"], "job-uid");
    assert_eq!(b["metadata"]["ownerReferences"][0]["controller"], true);
    let pod = &b["spec"]["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["initContainers"][0]["name"], "soma-proxy");
    assert_eq!(pod["initContainers"][0]["restartPolicy"], "Always");
    let env = pod["containers"][0]["env"].as_array().expect("env");
    assert!(
        env.iter()
            .any(|e| e["name"] == "SOMA_TASK_INPUT" && e["value"] == "Summarise incident 4711")
    );
    // The sidecar charges the Job's Budget as the run's own identity.
    let cm = seen
        .iter()
        .find(|s| {
            s.method == Method::PATCH && s.path.ends_with("/configmaps/sjob-summarise-sidecar")
        })
        .expect("the sidecar configuration");
    let config = sidecar_settings(&cm.body);
    assert_eq!(config["agent"]["name"], "job/summarise");
    assert_eq!(config["budget"], "team/team-budget");
    let status = status_of(&seen);
    assert_eq!(status["phase"], "Running");
    assert_eq!(reason(&status), ("False".into(), "Running".into()));
    assert_eq!(event(&seen)["type"], "Normal");
}

#[tokio::test]
async fn with_every_slot_taken_a_task_waits_its_turn() {
    let other = json!([{"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "other", "namespace": "team", "labels": {"soma.dev/job": "other"}},
        "status": {"active": 1}}]);
    let mut steps = resolve_steps(agent_json(IMAGE), json!({}));
    steps.push(step(
        Method::GET,
        &format!("{BATCH}/jobs"),
        list("JobList", other),
    ));
    steps.extend(status_steps(&job_json()));
    let (result, seen) = run(job_json(), steps, |mut c| {
        c.config.jobs.concurrency = 1;
        c
    })
    .await;
    assert_eq!(result.expect("waiting"), Action::await_change());
    let status = status_of(&seen);
    assert_eq!(status["phase"], "Waiting");
    assert_eq!(reason(&status), ("False".into(), "ConcurrencyLimit".into()));
    assert!(
        condition(&status, "Ready")["message"]
            .as_str()
            .unwrap_or_default()
            .contains("1 of 1 task Jobs run in namespace \"team\"")
    );
}

#[tokio::test]
async fn a_task_with_a_kueue_queue_is_created_suspended_for_kueue_to_admit() {
    let mut job = job_json();
    job["spec"]["queueName"] = json!("team-a");
    let mut steps = resolve_steps(agent_json(IMAGE), json!({}));
    // No slot count: Kueue's quotas decide.
    let mut start = start_steps(json!([]));
    start.remove(0);
    steps.extend(start);
    steps.extend(status_steps(&job));
    let (_, seen) = run(job, steps, plain).await;
    let batch = seen
        .iter()
        .find(|s| s.method == Method::PATCH && s.path == format!("{BATCH}/jobs/summarise"))
        .expect("the run");
    assert_eq!(batch.body["spec"]["suspend"], true);
    assert_eq!(
        batch.body["metadata"]["labels"]["kueue.x-k8s.io/queue-name"],
        "team-a"
    );
}

fn finished_batch(condition_type: &str, reason: &str) -> Value {
    json!({"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "summarise", "namespace": "team",
                        "ownerReferences": [{"apiVersion": "soma.dev/v1alpha1", "kind": "Job", "name": "summarise",
                                             "uid": "job-uid", "controller": true}]},
           "spec": {"template": {"spec": {"containers": []}}},
           "status": {"startTime": "2026-01-07T09:00:01Z", "failed": if condition_type == "Failed" { 3 } else { 1 },
                      "succeeded": if condition_type == "Complete" { 1 } else { 0 },
                      "completionTime": if condition_type == "Complete" { json!("2026-01-07T09:05:00Z") } else { Value::Null },
                      "conditions": [{"type": condition_type, "status": "True", "reason": reason,
                                      "message": "m", "lastTransitionTime": "2026-01-07T09:05:00Z"}]}})
}

fn pods(container: &str, exit: i64, message: &str) -> Value {
    json!([{"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "summarise-1", "namespace": "team", "creationTimestamp": "2026-01-07T09:04:00Z"},
            "status": {"phase": if exit == 0 { "Succeeded" } else { "Failed" }, "containerStatuses": [
                {"name": container, "ready": false, "restartCount": 0, "image": "x", "imageID": "",
                 "state": {"terminated": {"exitCode": exit, "reason": if exit == 0 { "Completed" } else { "Error" },
                                          "message": message}}}]}}])
}

#[tokio::test]
async fn a_completed_run_reports_its_result_and_expires_after_its_ttl() {
    let steps = vec![
        step(
            Method::GET,
            &format!("{BATCH}/jobs/summarise"),
            found(finished_batch("Complete", "Completed")),
        ),
        step(
            Method::GET,
            "/api/v1/namespaces/team/pods",
            list("PodList", pods("agent", 0, "Incident 4711: a full disk.")),
        ),
    ]
    .into_iter()
    .chain(status_steps(&job_json()))
    .chain([
        // The TTL passed long ago: the Job is deleted (its children go with it).
        step(Method::DELETE, &format!("{SOMA}/jobs/summarise"), deleted),
    ])
    .collect();
    let (result, seen) = run(job_json(), steps, plain).await;
    assert_eq!(result.expect("done"), Action::await_change());
    let status = status_of(&seen);
    assert_eq!(status["phase"], "Succeeded");
    assert_eq!(condition(&status, "Complete")["status"], "True");
    assert_eq!(status["result"], "Incident 4711: a full disk.");
    assert_eq!(status["attempts"], 2);
    assert_eq!(status["completionTime"], "2026-01-07T09:05:00Z");
    let pods_read = seen
        .iter()
        .find(|s| s.path.ends_with("/pods"))
        .expect("pods");
    assert!(
        pods_read
            .query
            .contains("batch.kubernetes.io%2Fjob-name%3Dsummarise"),
        "{}",
        pods_read.query
    );
}

#[tokio::test]
async fn a_run_that_used_up_its_retries_fails_with_the_last_exit() {
    let steps = vec![
        step(
            Method::GET,
            &format!("{BATCH}/jobs/summarise"),
            found(finished_batch("Failed", "BackoffLimitExceeded")),
        ),
        step(
            Method::GET,
            "/api/v1/namespaces/team/pods",
            list("PodList", pods("agent", 3, "")),
        ),
    ]
    .into_iter()
    .chain(status_steps(&job_json()))
    .chain([step(
        Method::DELETE,
        &format!("{SOMA}/jobs/summarise"),
        deleted,
    )])
    .collect();
    let (_, seen) = run(job_json(), steps, plain).await;
    let status = status_of(&seen);
    assert_eq!(status["phase"], "Failed");
    let failed = condition(&status, "Failed");
    assert_eq!(
        (failed["status"].as_str(), failed["reason"].as_str()),
        (Some("True"), Some("BackoffLimitExceeded"))
    );
    assert!(
        failed["message"].as_str().unwrap_or_default().contains(
            "all 3 attempt(s) failed (retries: 2); the last attempt ended with exit code 3 (Error)"
        ),
        "{failed}"
    );
    assert_eq!(event(&seen)["type"], "Warning");
}

#[tokio::test]
async fn a_finished_job_is_kept_until_its_ttl_and_then_only_deleted() {
    let mut job = job_json();
    let done = jiff::Timestamp::now();
    job["status"] = json!({"phase": "Succeeded", "completionTime": done.to_string(), "conditions": [
        {"type": "Complete", "status": "True", "reason": "Succeeded", "message": "m", "lastTransitionTime": done.to_string()}]});
    // Not due yet: no request at all, a requeue for the moment it is.
    let (result, seen) = run(job.clone(), vec![], plain).await;
    assert!(seen.is_empty());
    let action = format!("{:?}", result.expect("kept"));
    assert!(
        action.contains("requeue_after: Some(6") || action.contains("requeue_after: Some(5"),
        "{action}"
    );
    // Due: one DELETE.
    job["spec"]["ttlSecondsAfterFinished"] = json!(0);
    let (result, seen) = run(
        job,
        vec![step(
            Method::DELETE,
            &format!("{SOMA}/jobs/summarise"),
            deleted,
        )],
        plain,
    )
    .await;
    assert_eq!(result.expect("deleted"), Action::await_change());
    assert_eq!(seen.len(), 1);
}

fn drill_context(c: Context) -> Context {
    let mut config = OperatorConfig {
        ledger: LedgerConfig {
            url: Some(Redacted::new(
                "postgres://soma:pw@ledger.soma-system:5432/soma",
            )),
            ..LedgerConfig::default()
        },
        ..OperatorConfig::default()
    };
    config.sidecar.nats_url = Some("nats://nats.soma-system:4222".into());
    let Context {
        client, metrics, ..
    } = c;
    Context::new(client, config, metrics)
}

#[tokio::test]
async fn a_drill_without_a_stream_to_reconcile_with_does_not_start() {
    let mut steps = vec![step(Method::GET, &format!("{BATCH}/jobs/drill"), |_| {
        not_found()
    })];
    steps.extend(status_steps(&drill_json()));
    let (_, seen) = run(drill_json(), steps, plain).await;
    let status = status_of(&seen);
    assert_eq!(reason(&status), ("False".into(), "NoStream".into()));
    assert!(
        condition(&status, "Ready")["message"]
            .as_str()
            .unwrap_or_default()
            .contains("--nats-url")
    );
}

#[tokio::test]
async fn a_drill_whose_scratch_secret_is_missing_names_it_and_looks_again() {
    let mut steps = vec![
        step(Method::GET, &format!("{BATCH}/jobs/drill"), |_| not_found()),
        step(Method::GET, &format!("{NS}/secrets/scratch"), |_| {
            not_found()
        }),
    ];
    steps.extend(status_steps(&drill_json()));
    let (result, seen) = run(drill_json(), steps, drill_context).await;
    assert_eq!(
        result.expect("waiting"),
        Action::requeue(Duration::from_secs(60))
    );
    let status = status_of(&seen);
    assert_eq!(reason(&status), ("False".into(), "SecretNotFound".into()));
    assert!(
        condition(&status, "Ready")["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Secret \"scratch\" (spec.drDrill.scratchSecretRef) does not exist")
    );
}

fn scratch_secret(_: &Value) -> (StatusCode, Value) {
    (
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "scratch", "namespace": "team"},
                            "data": {"url": "cG9zdGdyZXM6Ly9zY3JhdGNo"}}),
    )
}

#[tokio::test]
async fn a_drill_runs_the_cli_with_the_operators_ledger_and_stream() {
    let mut steps = vec![
        step(Method::GET, &format!("{BATCH}/jobs/drill"), |_| not_found()),
        step(
            Method::GET,
            &format!("{NS}/secrets/scratch"),
            scratch_secret,
        ),
        step(
            Method::GET,
            &format!("{NS}/secrets/sjob-drill-ledger"),
            |_| not_found(),
        ),
        step(
            Method::PATCH,
            &format!("{NS}/secrets/sjob-drill-ledger"),
            echo,
        ),
        step(
            Method::GET,
            &format!("{NET}/networkpolicies/sjob-drill"),
            |_| not_found(),
        ),
        step(
            Method::PATCH,
            &format!("{NET}/networkpolicies/sjob-drill"),
            echo,
        ),
        step(Method::PATCH, &format!("{BATCH}/jobs/drill"), echo),
    ];
    steps.extend(status_steps(&drill_json()));
    let (_, seen) = run(drill_json(), steps, drill_context).await;
    let batch = seen
        .iter()
        .find(|s| s.method == Method::PATCH && s.path == format!("{BATCH}/jobs/drill"))
        .expect("run");
    let c = &batch.body["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "ghcr.io/soma-dev/soma:0.1.0");
    assert_eq!(
        c["args"],
        json!(["dr", "drill", "--report-file", "/dev/termination-log"])
    );
    let env = c["env"].as_array().expect("env");
    let nats = env
        .iter()
        .find(|e| e["name"] == "SOMA_NATS_URL")
        .expect("nats");
    assert_eq!(nats["value"], "nats://nats.soma-system:4222");
    let ledger = env
        .iter()
        .find(|e| e["name"] == "SOMA_LEDGER_URL")
        .expect("ledger");
    assert_eq!(
        ledger["valueFrom"]["secretKeyRef"]["name"],
        "sjob-drill-ledger"
    );
    assert!(
        !batch.body.to_string().contains("pw@"),
        "the ledger URL travels in the Secret only"
    );
    assert_eq!(status_of(&seen)["phase"], "Running");
}

#[tokio::test]
async fn a_scheduled_drill_becomes_a_cronjob() {
    let mut job = drill_json();
    job["spec"]["schedule"] = json!("0 3 * * *");
    let mut steps = vec![
        step(Method::GET, &format!("{BATCH}/cronjobs/drill"), |_| {
            not_found()
        }),
        step(
            Method::GET,
            &format!("{NS}/secrets/scratch"),
            scratch_secret,
        ),
        step(
            Method::GET,
            &format!("{NS}/secrets/sjob-drill-ledger"),
            |_| not_found(),
        ),
        step(
            Method::PATCH,
            &format!("{NS}/secrets/sjob-drill-ledger"),
            echo,
        ),
        step(
            Method::GET,
            &format!("{NET}/networkpolicies/sjob-drill"),
            |_| not_found(),
        ),
        step(
            Method::PATCH,
            &format!("{NET}/networkpolicies/sjob-drill"),
            echo,
        ),
        step(Method::GET, &format!("{BATCH}/cronjobs/drill"), |_| {
            not_found()
        }),
        step(Method::PATCH, &format!("{BATCH}/cronjobs/drill"), echo),
    ];
    steps.extend(status_steps(&job));
    let (_, seen) = run(job, steps, drill_context).await;
    let cron = seen
        .iter()
        .rev()
        .find(|s| s.path == format!("{BATCH}/cronjobs/drill"))
        .expect("cron");
    assert_eq!(cron.body["spec"]["schedule"], "0 3 * * *");
    assert_eq!(cron.body["spec"]["concurrencyPolicy"], "Forbid");
    let status = status_of(&seen);
    assert_eq!(status["phase"], "Scheduled");
    assert_eq!(reason(&status), ("True".into(), "Scheduled".into()));
}

#[tokio::test]
async fn a_failed_drill_reports_the_discrepancy_an_event_and_a_metric() {
    let mut batch = finished_batch("Failed", "BackoffLimitExceeded");
    batch["metadata"]["name"] = json!("drill");
    batch["metadata"]["ownerReferences"][0]["uid"] = json!("drill-uid");
    let report = json!({"passed": false, "snapshotAt": "2026-12-07T03:00:00.000Z", "backupSeconds": 1.0,
        "restoreSeconds": 2.0, "verifySeconds": 0.5, "rtoSeconds": 2.5, "rpoSeconds": 0.0, "recordsMissed": 0,
        "recordsRestored": 99, "tokensRestored": 1, "costMicrosRestored": 1, "streamMessages": 100,
        "chainVerified": false, "streamReconciled": true,
        "discrepancies": ["record r5 (research/bot, seq 5 of holder h) is in the stream SOMA_USAGE (published 2026-12-07T02:00:00Z) but in neither the ledger nor the backup: it was deleted from the ledger"]});
    let mut steps = vec![
        step(Method::GET, &format!("{BATCH}/jobs/drill"), found(batch)),
        step(
            Method::GET,
            "/api/v1/namespaces/team/pods",
            list("PodList", pods("drill", 1, &report.to_string())),
        ),
    ];
    steps.extend(status_steps(&drill_json()));
    // The drill's own Event beside the phase's.
    steps.push(step(Method::POST, EVENTS, echo));
    let metrics = Arc::new(Metrics::default());
    let m = metrics.clone();
    let (_, seen) = run(drill_json(), steps, move |c| {
        let Context { client, config, .. } = c;
        Context::new(client, config, m)
    })
    .await;
    let status = status_of(&seen);
    assert_eq!(reason(&status), ("False".into(), "DrillFailed".into()));
    assert_eq!(condition(&status, "DrillPassed")["status"], "False");
    assert_eq!(status["drill"]["outcome"], "Failed");
    assert_eq!(status["drill"]["recordsRestored"], 99);
    assert!(
        status["drill"]["discrepancies"][0]
            .as_str()
            .unwrap_or_default()
            .contains("it was deleted from the ledger")
    );
    let drill_event = event(&seen);
    assert_eq!(
        (drill_event["type"].as_str(), drill_event["reason"].as_str()),
        (Some("Warning"), Some("DrillFailed"))
    );
    let text = metrics.encode().expect("metrics");
    assert!(
        text.contains("soma_drill_passed{namespace=\"team\",name=\"drill\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("soma_jobs_finished_total{namespace=\"team\",phase=\"Failed\"} 1"),
        "{text}"
    );
}

/// The run of the example task, still going (no condition yet).
fn running_batch() -> Value {
    json!({"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "summarise", "namespace": "team",
                        "ownerReferences": [{"apiVersion": "soma.dev/v1alpha1", "kind": "Job", "name": "summarise",
                                             "uid": "job-uid", "controller": true}]},
           "spec": {"template": {"spec": {"containers": []}}},
           "status": {"startTime": "2026-01-07T09:00:01Z", "active": 1}})
}

/// The sidecar ConfigMap the operator wrote when the run started, its pods holding Capsule
/// `kb` (built by the Job's own children builder).
fn running_job_config_map() -> Value {
    let job: Job = serde_json::from_value(job_json()).expect("job");
    let agent: soma_crds::Agent = serde_json::from_value(agent_json(IMAGE)).expect("agent");
    let mut spec = agent.spec.clone();
    spec.capsules = vec![soma_crds::common::LocalRef { name: "kb".into() }];
    let digest = format!("sha256:{}", "aa".repeat(32));
    let task = soma_operator::job::children::Task {
        spec: &spec,
        budget_ref: job.spec.budget_ref.as_ref(),
        budgets: Vec::new(),
        pinned_image: None,
        capsules: vec![soma_operator::capsule::delivery::Delivery {
            name: "kb".into(),
            digest,
            policy_hash: format!("sha256:{}", "9b".repeat(32)),
            source: soma_operator::capsule::delivery::Source::Oci {
                repository: "r".into(),
            },
            collection: None,
        }],
    };
    let children =
        soma_operator::job::children::task_children(&job, &task, &OperatorConfig::default())
            .expect("children");
    serde_json::to_value(children.sidecar_config).expect("json")
}

/// The reads of a running Job holding `kb`: the run, its sidecar ConfigMap, the Capsule.
fn running_with_kb_steps(config_map: Value, capsule: Value) -> Vec<Step> {
    vec![
        step(
            Method::GET,
            &format!("{BATCH}/jobs/summarise"),
            found(running_batch()),
        ),
        step(
            Method::GET,
            &format!("{NS}/configmaps/sjob-summarise-sidecar"),
            found(config_map),
        ),
        step(Method::GET, &format!("{SOMA}/capsules/kb"), found(capsule)),
    ]
}

/// The Capsule `team/kb` verified and not revoked: usable again.
fn usable_kb() -> Value {
    let mut kb = revoked_kb();
    kb["spec"]["revoked"] = json!(false);
    kb["status"]["conditions"] = json!([{"type": "Ready", "status": "True", "reason": "Verified",
        "message": "verified", "lastTransitionTime": "2026-01-01T00:00:00Z"}]);
    kb
}

#[tokio::test]
async fn a_revoked_capsule_reaches_a_running_jobs_pods_configuration_without_stopping_the_run() {
    let mut steps = running_with_kb_steps(running_job_config_map(), revoked_kb());
    steps.push(step(
        Method::PATCH,
        &format!("{NS}/configmaps/sjob-summarise-sidecar"),
        echo,
    ));
    steps.extend(status_steps(&job_json()));
    let (result, seen) = run(job_json(), steps, plain).await;
    assert_eq!(result.expect("running"), Action::await_change());
    let written = &seen[3];
    assert_eq!(written.method, Method::PATCH);
    assert_eq!(written.content_type, "application/apply-patch+yaml");
    assert!(
        written.query.contains("fieldManager=soma.dev%2Fjob"),
        "{}",
        written.query
    );
    let settings = sidecar_settings(&written.body);
    assert_eq!(settings["revokedCapsules"], json!([revoked_kb_entry()]));
    // The rest of the configuration is what the pods were started with.
    assert_eq!(settings["agent"]["name"], "job/summarise");
    assert_eq!(
        written.body["metadata"]["ownerReferences"][0]["uid"],
        "job-uid"
    );
    assert_eq!(
        written.body["metadata"]["labels"]["soma.dev/job"],
        "summarise"
    );
    // The run is observed, never written (steps would fail otherwise).
    assert_eq!(status_of(&seen)["phase"], "Running");
}

#[tokio::test]
async fn a_running_job_whose_capsules_stand_is_not_written() {
    let usable = usable_kb();
    let mut steps = running_with_kb_steps(running_job_config_map(), usable);
    steps.extend(status_steps(&job_json()));
    let (result, _) = run(job_json(), steps, plain).await;
    assert_eq!(result.expect("running"), Action::await_change());

    // A ConfigMap that already says so is not written again.
    let cm = listing_kb_revoked(running_job_config_map());
    let mut steps = running_with_kb_steps(cm, revoked_kb());
    steps.extend(status_steps(&job_json()));
    let (result, _) = run(job_json(), steps, plain).await;
    assert_eq!(result.expect("running"), Action::await_change());

    // Another's ConfigMap (not controlled by this Job) is left alone: no Capsule is read.
    let mut foreign = running_job_config_map();
    foreign["metadata"]["ownerReferences"][0]["uid"] = json!("someone-else");
    let mut steps = running_with_kb_steps(foreign, revoked_kb());
    steps.pop();
    steps.extend(status_steps(&job_json()));
    let (result, _) = run(job_json(), steps, plain).await;
    assert_eq!(result.expect("running"), Action::await_change());
}

#[tokio::test]
async fn a_lifted_revocation_leaves_a_running_jobs_configuration() {
    // The Job's ConfigMap is not applied again after its run starts: the Job controller
    // removes the entry itself once the Capsule is usable again.
    let cm = listing_kb_revoked(running_job_config_map());
    let usable = usable_kb();
    let mut steps = running_with_kb_steps(cm, usable);
    steps.push(step(
        Method::PATCH,
        &format!("{NS}/configmaps/sjob-summarise-sidecar"),
        echo,
    ));
    steps.extend(status_steps(&job_json()));
    let (result, seen) = run(job_json(), steps, plain).await;
    assert_eq!(result.expect("running"), Action::await_change());
    let settings = sidecar_settings(&seen[3].body);
    assert!(settings.get("revokedCapsules").is_none(), "{settings}");
}
