//! `soma-operator render`: the children the operator would apply for the Agents and Jobs in a
//! manifest, as YAML, built by the same pure builders the controllers use (no cluster).
//! Users review the output in GitOps pull requests and diff it between versions.

use serde::Deserialize;
use soma_crds::agent::VaultAuthMethod;
use soma_crds::{Agent, Budget, Job};

use soma_metering::BudgetKey;
use soma_metering::chain::ChainProblem;

use crate::agent::children::{Resolved, children};
use crate::agent::reconcile::desired_replicas;
use crate::budget::def::resolve_in;
use crate::config::OperatorConfig;
use crate::job::children::{DrillRun, DrillSettings, Task, drill_children, task_children};
use crate::workload::vault::{
    LEDGER_CREDENTIALS_UNUSABLE, ledger_credentials, vault_credentials, vault_ref,
};

/// Why a manifest could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The input is not YAML.
    #[error("document {index}: not valid YAML: {source}")]
    Yaml {
        /// 1-based document number.
        index: usize,
        /// Parser error.
        #[source]
        source: serde_yaml::Error,
    },
    /// A Soma document does not match its schema.
    #[error("document {index} ({kind} {name:?}): {source}")]
    Invalid {
        /// 1-based document number.
        index: usize,
        /// `Agent` or `Budget`.
        kind: String,
        /// The Agent's name, if readable.
        name: String,
        /// Deserialisation error.
        #[source]
        source: serde_json::Error,
    },
    /// The input holds no Agent and no Job.
    #[error("no Agent or Job (apiVersion soma.dev/v1alpha1) found in the input")]
    NoAgent,
    /// Serialising a child failed.
    #[error("serialising the output failed: {0}")]
    Output(String),
}

/// Renders every Agent and Job in `manifest` (multi-document YAML) into the YAML stream of
/// their children. Budgets in the same manifest fill in the sidecar's Budget definitions, and
/// Agents the Agent a task Job names, as the operator does from the cluster; other kinds are
/// skipped.
pub fn render(manifest: &str, config: &OperatorConfig) -> Result<String, RenderError> {
    let mut agents: Vec<Agent> = Vec::new();
    let mut budgets: Vec<Budget> = Vec::new();
    let mut jobs: Vec<Job> = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(manifest).enumerate() {
        let index = i + 1;
        let value = serde_json::Value::deserialize(doc)
            .map_err(|source| RenderError::Yaml { index, source })?;
        if value.is_null() || value["apiVersion"] != "soma.dev/v1alpha1" {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        let name = value["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let invalid = |source| RenderError::Invalid {
            index,
            kind: kind.clone(),
            name: name.clone(),
            source,
        };
        match kind.as_str() {
            "Agent" => agents.push(serde_json::from_value(value).map_err(invalid)?),
            "Budget" => budgets.push(serde_json::from_value(value).map_err(invalid)?),
            "Job" => jobs.push(serde_json::from_value(value).map_err(invalid)?),
            _ => {}
        }
    }
    if agents.is_empty() && jobs.is_empty() {
        return Err(RenderError::NoAgent);
    }
    let namespace_of = |meta: &kube::api::ObjectMeta| {
        meta.namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned())
    };
    let mut out = String::new();
    for b in &mut budgets {
        b.metadata.namespace = Some(namespace_of(&b.metadata));
    }
    for agent in &mut agents {
        agent.metadata.namespace = Some(namespace_of(&agent.metadata));
    }
    for agent in agents.clone() {
        let namespace = namespace_of(&agent.metadata);
        let name = agent.metadata.name.clone().unwrap_or_default();
        // The Budget chain from the manifest, walked with the controller's rules.
        let resolution = agent.spec.budget_ref.as_ref().map(|b| {
            resolve_in(
                &BudgetKey::new(namespace.clone(), b.name.clone()),
                "spec.budgetRef",
                budgets.iter(),
            )
        });
        let resolved = Resolved {
            replicas: desired_replicas(&agent),
            budgets: resolution
                .as_ref()
                .map(|r| r.budgets.clone())
                .unwrap_or_default(),
            // Capsules are verified in the cluster; offline, none is delivered.
            capsules: Vec::new(),
            // A brown-out is decided by the scaling loop in the cluster; offline, none.
            ..Resolved::default()
        };
        let c =
            children(&agent, &resolved, config).map_err(|e| RenderError::Output(e.to_string()))?;
        out.push_str(&format!(
            "# Children of Agent {namespace}/{name} (ownerReferences are added in the cluster, where the Agent has a uid)\n"
        ));
        if let Some(problem) = resolution.and_then(|r| r.problem) {
            let consequence = match &problem {
                ChainProblem::Missing { .. } => {
                    "the Budget is not in the input, so the sidecar configuration below lacks its definition; in the cluster the operator reads it, and waits (BudgetNotFound) while it does not exist"
                }
                _ => {
                    "the operator would not start or change this Agent's pods (and the sidecar would refuse metered calls) until the chain is valid"
                }
            };
            out.push_str(&format!(
                "# {}: {problem};\n#   {consequence}.\n",
                problem.reason()
            ));
        }
        if let Some(secret) = &c.ledger_secret {
            out.push_str(&format!(
                "# Secret {} (the ledger's URL for the sidecar) is not shown: it holds a password.\n",
                secret.metadata.name.as_deref().unwrap_or_default()
            ));
        }
        out.push_str(&vault_lines(&agent.spec, config, "this Agent's pods"));
        let mut docs: Vec<String> = Vec::new();
        let mut push = |v: Result<String, serde_yaml::Error>| -> Result<(), RenderError> {
            docs.push(v.map_err(|e| RenderError::Output(e.to_string()))?);
            Ok(())
        };
        push(yaml("v1", "ServiceAccount", &c.service_account))?;
        push(yaml("v1", "ConfigMap", &c.sidecar_config))?;
        push(yaml(
            "networking.k8s.io/v1",
            "NetworkPolicy",
            &c.network_policy,
        ))?;
        push(yaml("apps/v1", "Deployment", &c.deployment))?;
        if let Some(service) = &c.service {
            push(yaml("v1", "Service", service))?;
        }
        for d in docs {
            out.push_str("---\n");
            out.push_str(&d);
        }
    }
    for mut job in jobs {
        let namespace = namespace_of(&job.metadata);
        job.metadata.namespace = Some(namespace.clone());
        render_job(&job, &namespace, &agents, &budgets, config, &mut out)?;
    }
    Ok(out)
}

/// Appends the children of one Job to `out`.
fn render_job(
    job: &Job,
    namespace: &str,
    agents: &[Agent],
    budgets: &[Budget],
    config: &OperatorConfig,
    out: &mut String,
) -> Result<(), RenderError> {
    let name = job.metadata.name.clone().unwrap_or_default();
    let mut docs: Vec<String> = Vec::new();
    let mut push = |v: Result<String, serde_yaml::Error>| -> Result<(), RenderError> {
        docs.push(v.map_err(|e| RenderError::Output(e.to_string()))?);
        Ok(())
    };
    if let Some(drill) = &job.spec.dr_drill {
        out.push_str(&format!(
            "# Children of Job {namespace}/{name} (a DR drill: `soma dr drill` in {})\n",
            config.jobs.cli_image
        ));
        let nats_url = config.sidecar.nats_url.clone().unwrap_or_else(|| {
            out.push_str("# NoStream: without --nats-url the operator does not start a drill (it reconciles the restore against the NATS stream); shown with nats://NATS:4222.\n");
            "nats://NATS:4222".to_owned()
        });
        if drill.ledger_secret_ref.is_none() && config.ledger.url.is_none() {
            out.push_str("# NoLedger: without --ledger-url (or spec.drDrill.ledgerSecretRef) the operator does not start this drill.\n");
        }
        let settings = DrillSettings {
            operator_ledger_url: config.ledger.url.as_ref().map(|u| u.expose().to_owned()),
            nats_url,
            seal_public_key: None,
        };
        let c = drill_children(job, drill, &settings, config);
        if let Some(secret) = &c.ledger_secret {
            out.push_str(&format!(
                "# Secret {} (the operator's ledger URL for the drill) is not shown: it holds a password.\n",
                secret.metadata.name.as_deref().unwrap_or_default()
            ));
        }
        push(yaml(
            "networking.k8s.io/v1",
            "NetworkPolicy",
            &c.network_policy,
        ))?;
        match &c.run {
            DrillRun::Once(b) => push(yaml("batch/v1", "Job", b.as_ref()))?,
            DrillRun::Scheduled(cron) => push(yaml("batch/v1", "CronJob", cron.as_ref()))?,
        }
    } else {
        let (spec, source) = match (&job.spec.agent_ref, &job.spec.template) {
            (Some(r), _) => {
                let found = agents.iter().find(|a| {
                    a.metadata.name.as_deref() == Some(r.name.as_str())
                        && a.metadata.namespace.as_deref() == Some(namespace)
                });
                match found {
                    Some(a) => (&a.spec, format!("a task on Agent {:?}", r.name)),
                    None => {
                        out.push_str(&format!(
                            "# Job {namespace}/{name}: Agent {:?} is not in the input, so its children cannot be shown; in the cluster the Job waits (AgentNotFound) while it does not exist.\n",
                            r.name
                        ));
                        return Ok(());
                    }
                }
            }
            (None, Some(t)) => (t, "a task on its template".to_owned()),
            (None, None) => return Ok(()),
        };
        out.push_str(&format!(
            "# Children of Job {namespace}/{name} ({source}; ownerReferences are added in the cluster)\n"
        ));
        let budget_ref = job.spec.budget_ref.as_ref().or(spec.budget_ref.as_ref());
        let resolution = budget_ref.map(|b| {
            resolve_in(
                &BudgetKey::new(namespace, b.name.clone()),
                "spec.budgetRef",
                budgets.iter(),
            )
        });
        if let Some(problem) = resolution.as_ref().and_then(|r| r.problem.as_ref()) {
            out.push_str(&format!(
                "# {}: {problem}; in the cluster the Job does not start until it is fixed.\n",
                problem.reason()
            ));
        }
        out.push_str(&vault_lines(spec, config, "this Job"));
        let task = Task {
            spec,
            budget_ref,
            budgets: resolution.map(|r| r.budgets).unwrap_or_default(),
            pinned_image: None,
            // Capsules are verified in the cluster; offline, none is delivered.
            capsules: Vec::new(),
        };
        let c =
            task_children(job, &task, config).map_err(|e| RenderError::Output(e.to_string()))?;
        if let Some(secret) = &c.ledger_secret {
            out.push_str(&format!(
                "# Secret {} (the ledger's URL for the sidecar) is not shown: it holds a password.\n",
                secret.metadata.name.as_deref().unwrap_or_default()
            ));
        }
        push(yaml("v1", "ServiceAccount", &c.service_account))?;
        push(yaml("v1", "ConfigMap", &c.sidecar_config))?;
        push(yaml(
            "networking.k8s.io/v1",
            "NetworkPolicy",
            &c.network_policy,
        ))?;
        push(yaml("batch/v1", "Job", &c.batch_job))?;
    }
    for d in docs {
        out.push_str("---\n");
        out.push_str(&d);
    }
    Ok(())
}

/// One object as YAML with its `apiVersion` and `kind` first.
fn yaml<T: serde::Serialize>(
    api_version: &str,
    kind: &str,
    object: &T,
) -> Result<String, serde_yaml::Error> {
    let mut map = serde_yaml::Mapping::new();
    map.insert("apiVersion".into(), api_version.into());
    map.insert("kind".into(), kind.into());
    if let serde_yaml::Value::Mapping(fields) = serde_yaml::to_value(object)? {
        for (k, v) in fields {
            if k.as_str() != Some("apiVersion") && k.as_str() != Some("kind") {
                map.insert(k, v);
            }
        }
    }
    serde_yaml::to_string(&map)
}

/// What a workload's sidecar will ask Vault for (the provider key, its AppRole Secret, the
/// ledger's user), or why the operator would not start it (`what`: "this Agent's pods").
fn vault_lines(spec: &soma_crds::agent::AgentSpec, config: &OperatorConfig, what: &str) -> String {
    let mut out = String::new();
    if let Some(v) = vault_ref(spec) {
        out.push_str(&vault_summary(&vault_credentials(v, &config.vault)));
        if let Some(a) = v
            .app_role
            .as_ref()
            .filter(|_| v.auth == VaultAuthMethod::AppRole)
        {
            out.push_str(&format!(
                "#   The role id and secret id are keys {:?} and {:?} of Secret {}, mounted into the sidecar container only.\n",
                a.role_id_key.as_deref().unwrap_or("role-id"),
                a.secret_id_key.as_deref().unwrap_or("secret-id"),
                a.secret_name
            ));
        }
    }
    match ledger_credentials(spec, config) {
        Ok(Some(soma_contract::LedgerCredentials::Vault(db))) => out.push_str(&format!(
            "#   For the ledger it reads {}/creds/{}: a PostgreSQL user leased to the pod (renewed at two thirds of its TTL, replaced when refused, revoked at stop); the ledger Secret's URL carries no user or password.\n",
            db.mount.trim_matches('/'),
            db.role
        )),
        Ok(None) => {}
        Err(message) => out.push_str(&format!(
            "# {LEDGER_CREDENTIALS_UNUSABLE}: {message}; in the cluster the operator does not start {what}.\n"
        )),
    }
    out
}

/// What the sidecar will ask Vault for, as comment lines (the Agent's fields with the operator's
/// Vault defaults applied).
pub fn vault_summary(v: &soma_contract::VaultCredentials) -> String {
    let (mount, with) = match &v.auth {
        soma_contract::VaultAuth::Kubernetes(k) => (
            k.mount.as_str(),
            format!(
                "its projected service-account token ({})",
                k.token_path.display()
            ),
        ),
        soma_contract::VaultAuth::Jwt(j) => (
            j.mount.as_str(),
            format!("the JWT in {}", j.token_path.display()),
        ),
        soma_contract::VaultAuth::AppRole(a) => (
            a.mount.as_str(),
            format!(
                "the role id in {} and the secret id in {}",
                a.role_id_path.display(),
                a.secret_id_path.display()
            ),
        ),
    };
    let version = v.version.map_or_else(
        || "the latest version".to_owned(),
        |n| format!("version {n}"),
    );
    // AppRole's role is its role id, read from a file.
    let role = match &v.auth {
        soma_contract::VaultAuth::AppRole(_) => String::new(),
        _ => format!(", role {}", v.role.as_deref().unwrap_or("(none set)")),
    };
    format!(
        "# Vault: the sidecar logs in to {} ({} auth at auth/{mount}{role}{}) with {with};\n#   it reads field {:?} of {}/data/{} ({version}) every {} s{}.\n",
        v.address
            .as_deref()
            .unwrap_or("$VAULT_ADDR (no address set)"),
        v.auth.method(),
        v.namespace
            .as_ref()
            .map(|n| format!(", namespace {n}"))
            .unwrap_or_default(),
        v.key,
        v.mount.trim_matches('/'),
        v.kv_path(),
        v.refresh_ms / 1000,
        v.ca_cert_path
            .as_ref()
            .map(|p| format!(", trusting the CA bundle {}", p.display()))
            .unwrap_or_default(),
    )
}
