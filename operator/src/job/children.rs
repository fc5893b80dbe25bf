//! Builds a Job's children: pure functions from the Job (and what the reconcile resolved) to
//! the objects the controller applies. Nothing here calls the API.
//!
//! ```text
//!  task Job <name> ──▶ batch/v1 Job <name> (backoffLimit = retries, activeDeadlineSeconds =
//!                      deadlineSeconds, suspended under a Kueue queue)
//!                        └─ pod: agent (SOMA_TASK_INPUT, result in its termination message)
//!                               + soma-proxy (native sidecar, records as agent job/<name>)
//!                      ServiceAccount, ConfigMap sjob-<name>-sidecar, Secret sjob-<name>-ledger,
//!                      NetworkPolicy sjob-<name>: the Agent pod's, from the same builder
//!  drill Job <name> ──▶ batch/v1 Job <name>, or CronJob <name> with `schedule`
//!                        └─ pod: drill (`soma dr drill`, the report in its termination message)
//!                      Secret sjob-<name>-ledger (the operator's ledger), NetworkPolicy sjob-<name>
//! ```

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    CronJob, CronJobSpec, Job as BatchJob, JobSpec as BatchJobSpec, JobTemplateSpec,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EmptyDirVolumeSource, EnvVar, PodSpec, PodTemplateSpec, Secret,
    ServiceAccount, Volume,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::{Resource, ResourceExt};
use soma_crds::agent::AgentSpec;
use soma_crds::common::LocalRef;
use soma_crds::job::{DrDrill, Job, KUEUE_QUEUE_LABEL};
use soma_metering::BudgetDef;

use crate::config::{LEDGER_SECRET_KEY, OperatorConfig};
use crate::workload::{
    self, AGENT_CONTAINER, Workload, container_security, env, hash_config, mount, pod_security,
    secret_env, tcp,
};

/// Field manager for everything the Job controller applies.
pub const FIELD_MANAGER: &str = "soma.dev/job";
/// Label naming the Job a child (and its pods) belongs to.
pub const JOB_LABEL: &str = "soma.dev/job";
/// The label Kubernetes' Job controller puts on a batch/v1 Job's pods.
pub const POD_JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";
/// Name of the drill pod's container.
pub const DRILL_CONTAINER: &str = "drill";
/// Where a container's termination message is read from (the Kubernetes default path).
pub const RESULT_FILE: &str = "/dev/termination-log";
/// Variables the Job sets on the agent container beside the Agent's.
const TASK_ENV: &[&str] = &["SOMA_TASK_INPUT", "SOMA_RESULT_FILE"];

/// The name of a Job's ServiceAccount and NetworkPolicy, and the prefix of its ConfigMap and
/// Secret: `sjob-` keeps them apart from the children of an Agent of the same name.
pub fn workload_name(job_name: &str) -> String {
    format!("sjob-{job_name}")
}

/// The agent name a Job's sidecar records usage under: `job/<name>` (a `/` is in no Agent's
/// name, so a run's records are its own), what `status.usage` sums.
pub fn run_identity(job_name: &str) -> String {
    format!("job/{job_name}")
}

/// What the reconcile resolved for a task Job.
#[derive(Clone, Debug, PartialEq)]
pub struct Task<'a> {
    /// What runs: the Agent's spec, or the template.
    pub spec: &'a AgentSpec,
    /// The Budget charged: the Job's, else the Agent's or the template's.
    pub budget_ref: Option<&'a LocalRef>,
    /// That Budget followed by its `parentRef` chain.
    pub budgets: Vec<BudgetDef>,
    /// The verified `repo@digest` to run, when images must be signed.
    pub pinned_image: Option<String>,
    /// The verified Capsules to deliver into the pod (`crate::capsule::delivery`).
    pub capsules: Vec<crate::capsule::delivery::Delivery>,
}

/// Every child of a task Job, in the order they are applied.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskChildren {
    /// The pod identity; its token is not mounted unless the spec asks.
    pub service_account: ServiceAccount,
    /// The ledger's URL for the sidecar; only when the operator has a ledger.
    pub ledger_secret: Option<Secret>,
    /// The sidecar's configuration.
    pub sidecar_config: ConfigMap,
    /// Default-deny egress except DNS, the provider and the allow-list.
    pub network_policy: NetworkPolicy,
    /// The run.
    pub batch_job: BatchJob,
}

/// Labels on every child of `job` and on its pods (`app` names the kind of pod).
pub fn labels(job: &Job, app: &str) -> BTreeMap<String, String> {
    let name = job.name_any();
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), app.to_owned()),
        ("app.kubernetes.io/instance".to_owned(), name.clone()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "soma-operator".to_owned(),
        ),
        (JOB_LABEL.to_owned(), name),
    ])
}

fn selector(job: &Job, app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), app.to_owned()),
        (JOB_LABEL.to_owned(), job.name_any()),
    ])
}

/// A task Job as a workload: the Agent pod's builder, named `sjob-<name>`, recording usage
/// as `job/<name>`.
pub fn task_workload<'a>(job: &'a Job, task: &Task<'a>) -> Workload<'a> {
    Workload {
        spec: task.spec,
        namespace: job.namespace().unwrap_or_default(),
        name: workload_name(&job.name_any()),
        identity: run_identity(&job.name_any()),
        budget_ref: task.budget_ref,
        labels: labels(job, "soma-job"),
        selector: selector(job, "soma-job"),
        owner: job.controller_owner_ref(&()),
    }
}

/// Builds every child of a task Job.
pub fn task_children(
    job: &Job,
    task: &Task<'_>,
    config: &OperatorConfig,
) -> Result<TaskChildren, serde_json::Error> {
    let w = task_workload(job, task);
    let mut settings = workload::sidecar_config(&w, &task.budgets, config);
    crate::capsule::delivery::sidecar_capsules(&mut settings, &task.capsules, config);
    let config_hash = hash_config(&settings)?;
    let mut template = workload::pod_template(&w, &config_hash, config);
    if let Some(image) = &task.pinned_image {
        workload::pin_image(&mut template, image);
    }
    run_once(&mut template, job.spec.input.as_deref());
    crate::capsule::delivery::deliver(&mut template, &task.capsules, config);
    let mut network_policy = workload::network_policy(&w, config);
    crate::capsule::delivery::capsule_egress(&mut network_policy, &task.capsules, config);
    Ok(TaskChildren {
        service_account: workload::service_account(&w),
        ledger_secret: workload::ledger_secret(&w, config),
        sidecar_config: workload::sidecar_config_map(&w, &settings, config)?,
        network_policy,
        batch_job: batch_job(job, &w.labels, template),
    })
}

/// Turns an Agent's pod into a task's: never restarted in place (a failed attempt is a new
/// pod, which the Job controller counts against `backoffLimit`), the input in
/// `SOMA_TASK_INPUT`, and `SOMA_RESULT_FILE` naming the file whose content (at most 4096
/// bytes) becomes the Job's result; the end of the log stands in for it when the agent fails
/// without writing one.
fn run_once(template: &mut PodTemplateSpec, input: Option<&str>) {
    let Some(pod) = template.spec.as_mut() else {
        return;
    };
    pod.restart_policy = Some("Never".to_owned());
    for c in pod
        .containers
        .iter_mut()
        .filter(|c| c.name == AGENT_CONTAINER)
    {
        let vars = c.env.get_or_insert_with(Vec::new);
        vars.retain(|e| !TASK_ENV.contains(&e.name.as_str()));
        if let Some(input) = input {
            vars.push(env("SOMA_TASK_INPUT", input));
        }
        vars.push(env("SOMA_RESULT_FILE", RESULT_FILE));
        c.termination_message_path = Some(RESULT_FILE.to_owned());
        c.termination_message_policy = Some("FallbackToLogsOnError".to_owned());
    }
}

/// The batch/v1 Job running `template` once: retried `retries` times, stopped after
/// `deadlineSeconds`; created suspended under a Kueue queue (Kueue admits it).
fn batch_job(job: &Job, labels: &BTreeMap<String, String>, template: PodTemplateSpec) -> BatchJob {
    let mut labels = labels.clone();
    if let Some(queue) = &job.spec.queue_name {
        labels.insert(KUEUE_QUEUE_LABEL.to_owned(), queue.clone());
    }
    BatchJob {
        metadata: ObjectMeta {
            name: Some(job.name_any()),
            namespace: job.namespace(),
            labels: Some(labels),
            owner_references: job.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(batch_spec(job, template)),
        status: None,
    }
}

fn batch_spec(job: &Job, template: PodTemplateSpec) -> BatchJobSpec {
    BatchJobSpec {
        backoff_limit: Some(job.spec.retries),
        active_deadline_seconds: Some(job.spec.deadline_seconds),
        completions: Some(1),
        parallelism: Some(1),
        suspend: job.spec.queue_name.as_ref().map(|_| true),
        template,
        ..BatchJobSpec::default()
    }
}

/// What a drill needs from the operator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrillSettings {
    /// The operator's ledger URL, used when the drill names no `ledgerSecretRef` (copied into
    /// the Job's Secret `sjob-<name>-ledger`).
    pub operator_ledger_url: Option<String>,
    /// The NATS server holding the usage stream.
    pub nats_url: String,
    /// The operator's seal public key, when loaded: seals are checked against it.
    pub seal_public_key: Option<String>,
}

/// How a drill runs.
#[derive(Clone, Debug, PartialEq)]
pub enum DrillRun {
    /// Once.
    Once(Box<BatchJob>),
    /// On a schedule.
    Scheduled(Box<CronJob>),
}

/// Every child of a drill Job.
#[derive(Clone, Debug, PartialEq)]
pub struct DrillChildren {
    /// The operator's ledger URL for the drill pod (when the drill names no Secret of its own).
    pub ledger_secret: Option<Secret>,
    /// Egress to DNS, the platform namespaces and PostgreSQL and NATS ports; no ingress.
    pub network_policy: NetworkPolicy,
    /// The run.
    pub run: DrillRun,
}

/// Builds every child of a drill Job.
pub fn drill_children(
    job: &Job,
    drill: &DrDrill,
    settings: &DrillSettings,
    config: &OperatorConfig,
) -> DrillChildren {
    let name = job.name_any();
    let labels = labels(job, "soma-drill");
    let meta = |n: String| ObjectMeta {
        name: Some(n),
        namespace: job.namespace(),
        labels: Some(labels.clone()),
        owner_references: job.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    };
    let own_secret = workload::ledger_secret_name(&workload_name(&name));
    let ledger_secret = match (&drill.ledger_secret_ref, &settings.operator_ledger_url) {
        (None, Some(url)) => Some(Secret {
            metadata: meta(own_secret.clone()),
            data: Some(BTreeMap::from([(
                LEDGER_SECRET_KEY.to_owned(),
                k8s_openapi::ByteString(url.as_bytes().to_vec()),
            )])),
            type_: Some("Opaque".to_owned()),
            ..Secret::default()
        }),
        _ => None,
    };
    let ledger_env = match &drill.ledger_secret_ref {
        Some(r) => secret_env("SOMA_LEDGER_URL", &r.name, &r.key),
        None => secret_env("SOMA_LEDGER_URL", &own_secret, LEDGER_SECRET_KEY),
    };
    let mut vars = vec![
        ledger_env,
        secret_env(
            "SOMA_SCRATCH_URL",
            &drill.scratch_secret_ref.name,
            &drill.scratch_secret_ref.key,
        ),
        env("SOMA_NATS_URL", settings.nats_url.clone()),
        env("TMPDIR", "/tmp"),
    ];
    if let Some(stream) = &drill.stream {
        vars.push(env("SOMA_DRILL_STREAM", stream.clone()));
    }
    if let Some(grace) = drill.stream_grace_seconds {
        vars.push(env("SOMA_DRILL_STREAM_GRACE_SECONDS", grace.to_string()));
    }
    if let Some(key) = &settings.seal_public_key {
        vars.push(env("SOMA_SEAL_PUBLIC_KEY", key.clone()));
    }
    let mut args: Vec<String> = ["dr", "drill", "--report-file", RESULT_FILE]
        .map(str::to_owned)
        .to_vec();
    if !drill.verify {
        args.push("--no-chain".to_owned());
    }
    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels.clone()),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            restart_policy: Some("Never".to_owned()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(pod_security()),
            containers: vec![Container {
                name: DRILL_CONTAINER.to_owned(),
                image: Some(config.jobs.cli_image.clone()),
                args: Some(args),
                env: Some(vars),
                resources: Some(config.jobs.drill_resources.clone()),
                security_context: Some(container_security()),
                termination_message_path: Some(RESULT_FILE.to_owned()),
                termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
                volume_mounts: Some(vec![mount("tmp", "/tmp", false)]),
                ..Container::default()
            }],
            // The backup is written here: an emptyDir, gone with the pod.
            volumes: Some(vec![Volume {
                name: "tmp".to_owned(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            }]),
            ..PodSpec::default()
        }),
    };
    let run = match &job.spec.schedule {
        None => DrillRun::Once(Box::new(batch_job(job, &labels, template))),
        Some(schedule) => DrillRun::Scheduled(Box::new(CronJob {
            metadata: meta(name.clone()),
            spec: Some(CronJobSpec {
                schedule: schedule.clone(),
                concurrency_policy: Some("Forbid".to_owned()),
                successful_jobs_history_limit: Some(3),
                failed_jobs_history_limit: Some(3),
                job_template: JobTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels.clone()),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(batch_spec(job, template)),
                },
                ..CronJobSpec::default()
            }),
            status: None,
        })),
    };
    DrillChildren {
        ledger_secret,
        network_policy: drill_network_policy(job, &labels, config),
        run,
    }
}

/// The drill pod reaches DNS, the platform namespaces (`--sidecar-egress-namespaces`: the
/// ledger, NATS) and PostgreSQL (5432) and NATS (4222) ports at any address, since the scratch
/// database may live anywhere; nothing may connect to it.
fn drill_network_policy(
    job: &Job,
    labels: &BTreeMap<String, String>,
    config: &OperatorConfig,
) -> NetworkPolicy {
    let anywhere = NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr: "0.0.0.0/0".to_owned(),
            except: None,
        }),
        ..NetworkPolicyPeer::default()
    };
    let mut egress = vec![
        workload::dns_egress(),
        NetworkPolicyEgressRule {
            to: Some(vec![anywhere]),
            ports: Some(vec![tcp(5432), tcp(4222)]),
        },
    ];
    egress.extend(workload::platform_egress(config));
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(workload_name(&job.name_any())),
            namespace: job.namespace(),
            labels: Some(labels.clone()),
            owner_references: job.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector(job, "soma-drill")),
                match_expressions: None,
            }),
            policy_types: Some(vec!["Ingress".to_owned(), "Egress".to_owned()]),
            egress: Some(egress),
            ingress: Some(Vec::new()),
        }),
    }
}

/// The value of variable `name` in `vars`, if literal.
pub fn env_value<'a>(vars: &'a [EnvVar], name: &str) -> Option<&'a str> {
    vars.iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

#[cfg(test)]
mod tests;
