//! Table tests of the Job's builders: a task runs in the Agent's pod (the same builder: the
//! same sandbox, sidecar, key custody and egress), once, with its input, under the batch/v1
//! Job's retries and deadline, suspended under a Kueue queue; a drill runs the CLI image with
//! the Secrets it names, and a schedule makes a CronJob.

use super::*;
use crate::agent::children::{Resolved, children};
use crate::config::{LedgerConfig, Redacted};
use k8s_openapi::api::core::v1::Container;
use soma_crds::agent::{Agent, Credentials, ModelSpec, Provider, Sandbox, Scaling};
use soma_crds::common::SecretKeyRef;
use soma_crds::job::JobSpec;

fn spec() -> AgentSpec {
    AgentSpec {
        image: "registry.example.com/a@sha256:0d7c".into(),
        command: vec![],
        args: vec!["--once".into()],
        env: vec![
            soma_crds::agent::EnvVar {
                name: "LOG_LEVEL".into(),
                value: "info".into(),
            },
            soma_crds::agent::EnvVar {
                name: "SOMA_TASK_INPUT".into(),
                value: "not the input".into(),
            },
        ],
        port: None,
        model: ModelSpec {
            provider: Provider::Openai,
            name: "gpt-4o-mini".into(),
            endpoint: None,
        },
        credentials: Some(Credentials {
            secret_ref: Some(SecretKeyRef {
                name: "openai-key".into(),
                key: "api-key".into(),
            }),
            vault: None,
        }),
        ledger_credentials: None,
        budget_ref: Some(LocalRef {
            name: "agent-budget".into(),
        }),
        capsules: vec![],
        tools: vec![],
        sandbox: Sandbox {
            runtime_class_name: Some("gvisor".into()),
            ..Sandbox::default()
        },
        scaling: Scaling::default(),
    }
}

fn job(edit: impl FnOnce(&mut JobSpec)) -> Job {
    let mut s = JobSpec {
        agent_ref: Some(LocalRef {
            name: "helper".into(),
        }),
        template: None,
        dr_drill: None,
        input: Some("Summarise incident 4711".into()),
        budget_ref: Some(LocalRef {
            name: "job-budget".into(),
        }),
        deadline_seconds: 900,
        retries: 2,
        ttl_seconds_after_finished: Some(60),
        queue_name: None,
        priority: 0,
        schedule: None,
    };
    edit(&mut s);
    let mut j = Job::new("summarise", s);
    j.metadata.namespace = Some("team".into());
    j.metadata.uid = Some("job-uid".into());
    j
}

fn ledgered() -> OperatorConfig {
    OperatorConfig {
        ledger: LedgerConfig {
            url: Some(Redacted::new("postgres://soma:pw@ledger:5432/soma")),
            ..LedgerConfig::default()
        },
        ..OperatorConfig::default()
    }
}

fn built(j: &Job, a: &AgentSpec, config: &OperatorConfig) -> TaskChildren {
    let task = Task {
        spec: a,
        budget_ref: j.spec.budget_ref.as_ref().or(a.budget_ref.as_ref()),
        budgets: Vec::new(),
        pinned_image: None,
        capsules: Vec::new(),
    };
    task_children(j, &task, config).expect("children build")
}

fn pod(c: &TaskChildren) -> &PodSpec {
    c.batch_job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec")
}

fn container<'a>(p: &'a PodSpec, name: &str) -> &'a Container {
    p.containers
        .iter()
        .chain(p.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("container {name}"))
}

fn vars(c: &Container) -> Vec<EnvVar> {
    c.env.clone().unwrap_or_default()
}

#[test]
fn a_task_runs_once_in_the_agent_pod_with_its_input() {
    let a = spec();
    let c = built(&job(|_| {}), &a, &OperatorConfig::default());
    let b = c.batch_job.spec.as_ref().expect("spec");
    assert_eq!(
        (
            b.backoff_limit,
            b.active_deadline_seconds,
            b.completions,
            b.parallelism,
            b.suspend
        ),
        (Some(2), Some(900), Some(1), Some(1), None)
    );
    assert_eq!(c.batch_job.metadata.name.as_deref(), Some("summarise"));
    assert!(
        !c.batch_job
            .labels()
            .contains_key(soma_crds::job::KUEUE_QUEUE_LABEL)
    );
    let p = pod(&c);
    assert_eq!(p.restart_policy.as_deref(), Some("Never"));
    let agent = container(p, AGENT_CONTAINER);
    let env = vars(agent);
    assert_eq!(
        env_value(&env, "SOMA_TASK_INPUT"),
        Some("Summarise incident 4711")
    );
    assert_eq!(
        env.iter().filter(|e| e.name == "SOMA_TASK_INPUT").count(),
        1,
        "the spec's own SOMA_TASK_INPUT is replaced"
    );
    assert_eq!(env_value(&env, "SOMA_RESULT_FILE"), Some(RESULT_FILE));
    assert_eq!(env_value(&env, "LOG_LEVEL"), Some("info"));
    assert_eq!(
        agent.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
    // Everything else is the Agent's pod, from the same builder.
    let mut agent_obj = Agent::new("helper", a.clone());
    agent_obj.metadata.namespace = Some("team".into());
    let agent_children = children(
        &agent_obj,
        &Resolved {
            replicas: 1,
            budgets: Vec::new(),
            capsules: Vec::new(),
            ..Resolved::default()
        },
        &OperatorConfig::default(),
    )
    .expect("agent children");
    let agent_pod = agent_children
        .deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("agent pod");
    assert_eq!(p.security_context, agent_pod.security_context);
    assert_eq!(p.runtime_class_name.as_deref(), Some("gvisor"));
    assert_eq!(
        p.automount_service_account_token,
        agent_pod.automount_service_account_token
    );
    assert_eq!(p.enable_service_links, Some(false));
    let sidecar = container(p, crate::workload::SIDECAR_NAME);
    let agent_sidecar = container(agent_pod, crate::workload::SIDECAR_NAME);
    assert_eq!(
        sidecar.restart_policy.as_deref(),
        Some("Always"),
        "native sidecar"
    );
    assert_eq!(sidecar.security_context, agent_sidecar.security_context);
    assert_eq!(sidecar.image, agent_sidecar.image);
    assert_eq!(
        agent.security_context,
        container(agent_pod, AGENT_CONTAINER).security_context
    );
    assert_eq!(
        agent.resources,
        container(agent_pod, AGENT_CONTAINER).resources
    );
    // Key custody: the key Secret is mounted into the sidecar only; no provider key anywhere
    // in the agent container.
    assert!(
        sidecar
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "provider-key")
    );
    assert!(
        !agent
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "provider-key")
    );
    assert!(
        env.iter()
            .all(|e| !soma_crds::agent::PROVIDER_KEY_ENV_NAMES.contains(&e.name.as_str()))
    );
}

#[test]
fn the_run_records_usage_under_its_own_identity_and_the_jobs_budget() {
    let c = built(&job(|_| {}), &spec(), &ledgered());
    let config: soma_contract::SidecarConfig =
        serde_json::from_str(&c.sidecar_config.data.as_ref().expect("data")["config.yaml"])
            .expect("sidecar config");
    assert_eq!(config.agent.name, "job/summarise");
    assert_eq!(config.agent.namespace, "team");
    assert_eq!(
        config.budget.as_deref(),
        Some("team/job-budget"),
        "the Job's Budget wins"
    );
    assert_eq!(
        config.database_url_env.as_deref(),
        Some("SOMA_DATABASE_URL")
    );
    // Without a budgetRef of its own the Job charges the Agent's.
    let c = built(
        &job(|s| s.budget_ref = None),
        &spec(),
        &OperatorConfig::default(),
    );
    let config: soma_contract::SidecarConfig =
        serde_json::from_str(&c.sidecar_config.data.as_ref().expect("data")["config.yaml"])
            .expect("sidecar config");
    assert_eq!(config.budget.as_deref(), Some("team/agent-budget"));
}

#[test]
fn children_are_named_apart_from_agents_labelled_and_owned_by_the_job() {
    let c = built(&job(|_| {}), &spec(), &ledgered());
    let names = [
        c.service_account.metadata.name.clone(),
        c.sidecar_config.metadata.name.clone(),
        c.ledger_secret
            .as_ref()
            .and_then(|s| s.metadata.name.clone()),
        c.network_policy.metadata.name.clone(),
    ];
    assert_eq!(
        names.map(Option::unwrap_or_default),
        [
            "sjob-summarise",
            "sjob-summarise-sidecar",
            "sjob-summarise-ledger",
            "sjob-summarise"
        ]
        .map(str::to_owned)
    );
    let metas = [
        &c.service_account.metadata,
        &c.sidecar_config.metadata,
        &c.network_policy.metadata,
        &c.batch_job.metadata,
    ];
    for m in metas {
        let owner = &m.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("Job", "job-uid", Some(true))
        );
        assert_eq!(
            m.labels
                .as_ref()
                .expect("labels")
                .get(JOB_LABEL)
                .map(String::as_str),
            Some("summarise")
        );
    }
    let p = pod(&c);
    assert_eq!(p.service_account_name.as_deref(), Some("sjob-summarise"));
    let selector = c
        .network_policy
        .spec
        .as_ref()
        .and_then(|s| s.pod_selector.as_ref())
        .and_then(|s| s.match_labels.clone())
        .expect("selector");
    let pod_labels = c
        .batch_job
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .expect("pod labels");
    assert!(
        selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
        "the NetworkPolicy selects the Job's pods"
    );
    assert_eq!(
        selector.get("app.kubernetes.io/name").map(String::as_str),
        Some("soma-job")
    );
}

#[test]
fn a_queued_task_is_created_suspended_with_the_kueue_label() {
    let c = built(
        &job(|s| s.queue_name = Some("team-a".into())),
        &spec(),
        &OperatorConfig::default(),
    );
    assert_eq!(
        c.batch_job.spec.as_ref().and_then(|s| s.suspend),
        Some(true)
    );
    assert_eq!(
        c.batch_job
            .labels()
            .get(soma_crds::job::KUEUE_QUEUE_LABEL)
            .map(String::as_str),
        Some("team-a")
    );
}

#[test]
fn a_verified_image_is_pinned() {
    let a = spec();
    let j = job(|_| {});
    let task = Task {
        spec: &a,
        budget_ref: None,
        budgets: Vec::new(),
        pinned_image: Some("registry.example.com/a@sha256:feed".into()),
        capsules: Vec::new(),
    };
    let c = task_children(&j, &task, &OperatorConfig::default()).expect("build");
    assert_eq!(
        container(pod(&c), AGENT_CONTAINER).image.as_deref(),
        Some("registry.example.com/a@sha256:feed")
    );
}

fn drill_job(schedule: Option<&str>, ledger: Option<SecretKeyRef>, verify: bool) -> Job {
    job(|s| {
        s.agent_ref = None;
        s.input = None;
        s.budget_ref = None;
        s.schedule = schedule.map(str::to_owned);
        s.dr_drill = Some(DrDrill {
            ledger_secret_ref: ledger,
            scratch_secret_ref: SecretKeyRef {
                name: "scratch".into(),
                key: "url".into(),
            },
            verify,
            stream: Some("SOMA_USAGE".into()),
            stream_grace_seconds: Some(30),
        });
    })
}

fn settings() -> DrillSettings {
    DrillSettings {
        operator_ledger_url: Some("postgres://soma:pw@ledger:5432/soma".into()),
        nats_url: "nats://nats.soma-system:4222".into(),
        seal_public_key: Some("cHVibGlj".into()),
    }
}

fn drill_pod(run: &DrillRun) -> PodSpec {
    match run {
        DrillRun::Once(b) => b.spec.clone().and_then(|s| s.template.spec).expect("pod"),
        DrillRun::Scheduled(c) => c
            .spec
            .clone()
            .and_then(|s| s.job_template.spec)
            .and_then(|s| s.template.spec)
            .expect("pod"),
    }
}

fn secret_of(vars: &[EnvVar], name: &str) -> Option<(String, String)> {
    vars.iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
        .map(|r| (r.name.clone(), r.key.clone()))
}

#[test]
fn a_drill_runs_the_cli_image_with_the_secrets_it_names() {
    let j = drill_job(None, None, true);
    let drill = j.spec.dr_drill.clone().expect("drill");
    let c = drill_children(&j, &drill, &settings(), &ledgered());
    let p = drill_pod(&c.run);
    assert_eq!(p.restart_policy.as_deref(), Some("Never"));
    assert_eq!(p.automount_service_account_token, Some(false));
    assert_eq!(p.security_context, Some(crate::workload::pod_security()));
    let d = container(&p, DRILL_CONTAINER);
    assert_eq!(d.image.as_deref(), Some("ghcr.io/soma-dev/soma:0.1.0"));
    assert_eq!(
        d.args.clone().unwrap_or_default(),
        ["dr", "drill", "--report-file", RESULT_FILE].map(str::to_owned)
    );
    assert_eq!(
        d.security_context,
        Some(crate::workload::container_security())
    );
    assert!(d.resources.as_ref().is_some_and(|r| r.limits.is_some()));
    let env = vars(d);
    // The operator's ledger, in a Secret of the Job's (never a literal URL in the pod).
    assert_eq!(
        secret_of(&env, "SOMA_LEDGER_URL"),
        Some(("sjob-summarise-ledger".into(), "database-url".into()))
    );
    let secret = c.ledger_secret.expect("the Job's ledger Secret");
    assert_eq!(
        secret.metadata.name.as_deref(),
        Some("sjob-summarise-ledger")
    );
    assert_eq!(
        secret_of(&env, "SOMA_SCRATCH_URL"),
        Some(("scratch".into(), "url".into()))
    );
    assert_eq!(
        env_value(&env, "SOMA_NATS_URL"),
        Some("nats://nats.soma-system:4222")
    );
    assert_eq!(
        env_value(&env, "SOMA_DRILL_STREAM_GRACE_SECONDS"),
        Some("30")
    );
    assert_eq!(env_value(&env, "SOMA_SEAL_PUBLIC_KEY"), Some("cHVibGlj"));
    assert!(
        env.iter()
            .all(|e| e.value.as_deref().is_none_or(|v| !v.contains("pw@")))
    );
    let DrillRun::Once(b) = &c.run else {
        panic!("a drill without a schedule runs once")
    };
    assert_eq!(
        b.spec
            .as_ref()
            .map(|s| (s.backoff_limit, s.active_deadline_seconds)),
        Some((Some(2), Some(900)))
    );
    // No ingress; egress to DNS, PostgreSQL and NATS.
    let np = c.network_policy.spec.expect("policy");
    assert_eq!(np.ingress, Some(Vec::new()));
    let ports: Vec<i32> = np
        .egress
        .iter()
        .flatten()
        .flat_map(|r| r.ports.iter().flatten())
        .filter_map(|p| match &p.port {
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i)) => Some(*i),
            _ => None,
        })
        .collect();
    assert!(
        ports.contains(&5432) && ports.contains(&4222) && ports.contains(&53),
        "{ports:?}"
    );
}

#[test]
fn a_drill_of_a_named_ledger_needs_no_secret_of_the_operators() {
    let j = drill_job(
        None,
        Some(SecretKeyRef {
            name: "other-ledger".into(),
            key: "url".into(),
        }),
        false,
    );
    let drill = j.spec.dr_drill.clone().expect("drill");
    let c = drill_children(&j, &drill, &settings(), &ledgered());
    assert!(c.ledger_secret.is_none());
    let p = drill_pod(&c.run);
    let d = container(&p, DRILL_CONTAINER);
    assert_eq!(
        secret_of(&vars(d), "SOMA_LEDGER_URL"),
        Some(("other-ledger".into(), "url".into()))
    );
    assert!(
        d.args
            .clone()
            .unwrap_or_default()
            .contains(&"--no-chain".to_owned())
    );
}

#[test]
fn a_scheduled_drill_is_a_cronjob_that_never_overlaps() {
    let j = drill_job(Some("0 3 * * *"), None, true);
    let drill = j.spec.dr_drill.clone().expect("drill");
    let c = drill_children(&j, &drill, &settings(), &ledgered());
    let DrillRun::Scheduled(cron) = &c.run else {
        panic!("a schedule makes a CronJob")
    };
    let s = cron.spec.as_ref().expect("spec");
    assert_eq!(s.schedule, "0 3 * * *");
    assert_eq!(s.concurrency_policy.as_deref(), Some("Forbid"));
    let labels = s
        .job_template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .expect("run labels");
    assert_eq!(
        labels.get(JOB_LABEL).map(String::as_str),
        Some("summarise"),
        "each run names its Job"
    );
    assert_eq!(
        cron.metadata
            .owner_references
            .as_ref()
            .map(|o| o[0].uid.as_str()),
        Some("job-uid")
    );
}

#[test]
fn a_task_pod_gets_its_capsules_by_digest_read_only_like_an_agent_pod() {
    use crate::capsule::delivery::{Delivery, Source};
    let a = spec();
    let j = job(|_| {});
    let digest = format!("sha256:{}", "1".repeat(64));
    let task = Task {
        spec: &a,
        budget_ref: None,
        budgets: Vec::new(),
        pinned_image: None,
        capsules: vec![Delivery {
            name: "kb".into(),
            digest: digest.clone(),
            policy_hash: format!("sha256:{}", "9".repeat(64)),
            source: Source::Oci {
                repository: "registry.example.com/capsules/kb".into(),
            },
            collection: None,
        }],
    };
    let c = task_children(&j, &task, &OperatorConfig::default()).expect("build");
    let p = pod(&c);
    let init: Vec<&str> = p
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(init, ["capsule-0", crate::workload::SIDECAR_NAME]);
    let fetch = container(p, "capsule-0");
    let args = fetch.args.clone().unwrap_or_default();
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--digest" && w[1] == digest),
        "{args:?}"
    );
    let agent = container(p, crate::workload::AGENT_CONTAINER);
    let kb = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/capsules")
        .expect("mounted");
    assert_eq!(kb.read_only, Some(true));
    assert_eq!(kb.sub_path.as_deref(), Some("visible"));
}
