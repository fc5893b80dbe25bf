//! Table tests of the pure builders: defaults, overrides, every sandbox invariant, the
//! sidecar present and wired, and no provider key anywhere in the agent container.

use super::*;
use k8s_openapi::api::networking::v1::NetworkPolicyIngressRule;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use soma_crds::agent::{AgentSpec, Credentials, ModelSpec, Sandbox, Scaling, VaultRef};
use soma_crds::common::{LocalRef, SecretKeyRef};

fn agent(edit: impl FnOnce(&mut AgentSpec)) -> Agent {
    let mut spec = AgentSpec {
        image: "registry.example.com/a@sha256:0d7c".into(),
        command: vec![],
        args: vec![],
        env: vec![],
        port: Some(8080),
        model: ModelSpec {
            provider: Provider::Openai,
            name: "gpt-4o".into(),
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
            name: "team".into(),
        }),
        capsules: vec![],
        tools: vec![],
        sandbox: Sandbox::default(),
        scaling: Scaling::default(),
    };
    edit(&mut spec);
    let mut a = Agent::new("helper", spec);
    a.metadata.namespace = Some("team".into());
    a.metadata.uid = Some("uid-1".into());
    a
}

fn built(a: &Agent) -> Children {
    let resolved = Resolved {
        replicas: 2,
        budgets: Vec::new(),
        capsules: Vec::new(),
        ..Resolved::default()
    };
    children(a, &resolved, &OperatorConfig::default()).expect("children build")
}

fn pod(c: &Children) -> &PodSpec {
    c.deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec")
}

fn agent_container(c: &Children) -> &Container {
    pod(c)
        .containers
        .iter()
        .find(|c| c.name == AGENT_CONTAINER)
        .expect("agent container")
}

fn sidecar(c: &Children) -> &Container {
    pod(c)
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == SIDECAR_NAME)
        .expect("sidecar")
}

fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a EnvVar> {
    c.env.iter().flatten().find(|e| e.name == name)
}

/// Every sandbox invariant of PRODUCT.md (invariant 6), for any Agent.
fn assert_sandboxed(name: &str, c: &Children) {
    let p = pod(c);
    assert_eq!(
        p.automount_service_account_token,
        Some(false),
        "{name}: token not mounted"
    );
    assert_eq!(
        c.service_account.automount_service_account_token,
        Some(false),
        "{name}: SA token"
    );
    let psc = p.security_context.as_ref().expect("pod security context");
    assert_eq!(psc.run_as_non_root, Some(true), "{name}");
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault"),
        "{name}"
    );
    assert_eq!(
        p.enable_service_links,
        Some(false),
        "{name}: no service env leaks"
    );
    for container in p
        .containers
        .iter()
        .chain(p.init_containers.iter().flatten())
    {
        let sc = container
            .security_context
            .as_ref()
            .expect("container security context");
        assert_eq!(sc.run_as_non_root, Some(true), "{name}/{}", container.name);
        assert_eq!(
            sc.read_only_root_filesystem,
            Some(true),
            "{name}/{}",
            container.name
        );
        assert_eq!(
            sc.allow_privilege_escalation,
            Some(false),
            "{name}/{}",
            container.name
        );
        assert_eq!(sc.privileged, Some(false), "{name}/{}", container.name);
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_owned()]),
            "{name}/{}",
            container.name
        );
        assert!(
            sc.capabilities
                .as_ref()
                .and_then(|c| c.add.as_ref())
                .is_none(),
            "{name}: no added capabilities"
        );
        let r = container.resources.as_ref().expect("resources");
        for key in ["cpu", "memory"] {
            assert!(
                r.requests.as_ref().is_some_and(|m| m.contains_key(key)),
                "{name}/{}: {key} request",
                container.name
            );
            assert!(
                r.limits.as_ref().is_some_and(|m| m.contains_key(key)),
                "{name}/{}: {key} limit",
                container.name
            );
        }
    }
    let tmp = agent_container(c)
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/tmp");
    let tmp_volume = p
        .volumes
        .iter()
        .flatten()
        .find(|v| Some(&v.name) == tmp.map(|m| &m.name));
    assert!(
        tmp_volume.is_some_and(|v| v.empty_dir.is_some()),
        "{name}: writable /tmp is an emptyDir"
    );

    let np = c.network_policy.spec.as_ref().expect("policy spec");
    assert!(
        np.policy_types
            .as_ref()
            .is_some_and(|t| t.contains(&"Egress".to_owned())),
        "{name}: egress is default-deny"
    );
    let egress = np.egress.as_ref().expect("egress rules");
    assert!(
        egress.iter().any(|r| r.to.is_none()
            && r.ports
                .iter()
                .flatten()
                .any(|p| p.port == Some(IntOrString::Int(53)))),
        "{name}: DNS allowed"
    );
    for rule in egress.iter().filter(|r| {
        r.ports
            .iter()
            .flatten()
            .all(|p| p.port != Some(IntOrString::Int(53)))
    }) {
        assert!(
            rule.to.as_ref().is_some_and(|t| !t.is_empty()),
            "{name}: every non-DNS egress rule names its destination"
        );
        assert!(
            rule.ports.as_ref().is_some_and(|p| !p.is_empty()),
            "{name}: every non-DNS egress rule names its ports"
        );
    }
}

/// No provider key reaches the agent container: no key-named variable, nothing from a
/// Secret, no mount of the provider key volume.
fn assert_no_provider_key(name: &str, c: &Children) {
    let agent_c = agent_container(c);
    for e in agent_c.env.iter().flatten() {
        assert!(
            !PROVIDER_KEY_ENV_NAMES.contains(&e.name.as_str()),
            "{name}: {} in agent env",
            e.name
        );
        let from_secret = e
            .value_from
            .as_ref()
            .is_some_and(|v| v.secret_key_ref.is_some());
        assert!(!from_secret, "{name}: {} comes from a Secret", e.name);
    }
    assert!(agent_c.env_from.is_none(), "{name}: no envFrom");
    assert!(
        agent_c
            .volume_mounts
            .iter()
            .flatten()
            .all(|m| m.name != "provider-key" && !m.mount_path.starts_with(PROVIDER_KEY_DIR)),
        "{name}: provider key not mounted into the agent"
    );
}

#[test]
fn sandbox_and_key_invariants_hold_for_every_variant() {
    let variants: Vec<(&str, Agent)> = vec![
        ("defaults", agent(|_| {})),
        (
            "vault credentials",
            agent(|s| {
                s.credentials = Some(Credentials {
                    secret_ref: None,
                    vault: Some(VaultRef {
                        path: "secret/data/x".into(),
                        key: "k".into(),
                        role: Some("agents".into()),
                        address: Some("https://vault.vault:8200".into()),
                        namespace: None,
                        mount: None,
                        version: None,
                        auth: Default::default(),
                        app_role: None,
                        auth_mount: None,
                        audience: None,
                        refresh_seconds: None,
                    }),
                })
            }),
        ),
        ("no credentials", agent(|s| s.credentials = None)),
        ("worker without port", agent(|s| s.port = None)),
        (
            "anthropic",
            agent(|s| s.model.provider = Provider::Anthropic),
        ),
        (
            "compatible endpoint",
            agent(|s| {
                s.model = ModelSpec {
                    provider: Provider::OpenaiCompatible,
                    name: "llama".into(),
                    endpoint: Some("http://vllm.models:8000/v1".into()),
                }
            }),
        ),
        (
            "custom resources",
            agent(|s| s.sandbox.resources = Some(crate::config::resources("1", "1Gi", "2", "2Gi"))),
        ),
        (
            "runtime class",
            agent(|s| s.sandbox.runtime_class_name = Some("gvisor".into())),
        ),
        (
            "egress allow-list",
            agent(|s| {
                s.sandbox.egress = vec![
                    EgressRule {
                        cidr: Some("10.1.0.0/16".into()),
                        host: None,
                        ports: vec![5432],
                    },
                    EgressRule {
                        cidr: None,
                        host: Some("api.github.com".into()),
                        ports: vec![],
                    },
                ]
            }),
        ),
        (
            "user env with a key name",
            agent(|s| {
                s.env = vec![soma_crds::agent::EnvVar {
                    name: "OPENAI_API_KEY".into(),
                    value: "sk-live".into(),
                }]
            }),
        ),
    ];
    for (name, a) in &variants {
        let c = built(a);
        assert_sandboxed(name, &c);
        assert_no_provider_key(name, &c);
    }
}

#[test]
fn sidecar_is_a_native_sidecar_holding_the_key() {
    let c = built(&agent(|_| {}));
    let s = sidecar(&c);
    assert_eq!(
        s.restart_policy.as_deref(),
        Some("Always"),
        "native sidecar: an init container that keeps running"
    );
    assert_eq!(
        s.image.as_deref(),
        Some("ghcr.io/soma-dev/soma-proxy:0.1.0")
    );
    assert!(
        s.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "provider-key"
                && m.mount_path == PROVIDER_KEY_DIR
                && m.read_only == Some(true))
    );
    assert!(
        s.startup_probe.is_some(),
        "the agent starts only once the sidecar is up"
    );
    let key_volume = pod(&c)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "provider-key")
        .expect("key volume");
    assert_eq!(
        key_volume
            .secret
            .as_ref()
            .and_then(|s| s.secret_name.as_deref()),
        Some("openai-key")
    );
    let config = c
        .sidecar_config
        .data
        .as_ref()
        .and_then(|d| d.get("config.yaml"))
        .expect("config");
    let config: serde_json::Value = serde_json::from_str(config).expect("config is JSON");
    assert_eq!(
        config["listen"], "127.0.0.1:4000",
        "the proxy listens on loopback only"
    );
    assert_eq!(
        config["credentials"]["file"],
        "/var/run/secrets/soma/provider/api-key"
    );
    assert_eq!(config["budget"], "team/team", "namespace/name");
    assert_eq!(config["provider"]["upstream"], "https://api.openai.com");
}

#[test]
fn agent_is_pointed_at_the_sidecar_with_a_per_pod_credential() {
    let c = built(&agent(|s| {
        s.env = vec![soma_crds::agent::EnvVar {
            name: "OPENAI_BASE_URL".into(),
            value: "https://api.openai.com/v1".into(),
        }]
    }));
    let a = agent_container(&c);
    let value = |n: &str| env_value(a, n).and_then(|e| e.value.clone());
    assert_eq!(
        value("OPENAI_BASE_URL").as_deref(),
        Some("http://127.0.0.1:4000/v1"),
        "Soma's value wins over the user's"
    );
    assert_eq!(
        a.env
            .iter()
            .flatten()
            .filter(|e| e.name == "OPENAI_BASE_URL")
            .count(),
        1
    );
    assert_eq!(
        value("ANTHROPIC_BASE_URL").as_deref(),
        Some("http://127.0.0.1:4000")
    );
    let token = env_value(a, "SOMA_PROXY_TOKEN")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref());
    assert_eq!(
        token.map(|f| f.field_path.as_str()),
        Some("metadata.uid"),
        "per-pod credential"
    );
    let sidecar_uid = env_value(sidecar(&c), "SOMA_POD_UID")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref());
    assert_eq!(
        sidecar_uid.map(|f| f.field_path.as_str()),
        Some("metadata.uid"),
        "the sidecar checks the same credential"
    );
}

#[test]
fn defaults_and_overrides() {
    let default = built(&agent(|_| {}));
    let custom = built(&agent(|s| {
        s.sandbox.runtime_class_name = Some("kata".into());
        s.sandbox.automount_service_account_token = true;
        s.sandbox.resources = Some(crate::config::resources("2", "2Gi", "4", "4Gi"));
        s.command = vec!["/bin/agent".into()];
        s.args = vec!["--fast".into()];
    }));
    // (what, default, override)
    let rows: Vec<(&str, String, String)> = vec![
        (
            "runtimeClassName",
            format!("{:?}", pod(&default).runtime_class_name),
            format!("{:?}", pod(&custom).runtime_class_name),
        ),
        (
            "token",
            format!("{:?}", pod(&default).automount_service_account_token),
            format!("{:?}", pod(&custom).automount_service_account_token),
        ),
        (
            "cpu limit",
            format!(
                "{:?}",
                agent_container(&default)
                    .resources
                    .as_ref()
                    .and_then(|r| r.limits.as_ref())
                    .and_then(|l| l.get("cpu"))
            ),
            format!(
                "{:?}",
                agent_container(&custom)
                    .resources
                    .as_ref()
                    .and_then(|r| r.limits.as_ref())
                    .and_then(|l| l.get("cpu"))
            ),
        ),
        (
            "command",
            format!("{:?}", agent_container(&default).command),
            format!("{:?}", agent_container(&custom).command),
        ),
        (
            "args",
            format!("{:?}", agent_container(&default).args),
            format!("{:?}", agent_container(&custom).args),
        ),
    ];
    let expected = [
        ("None", "Some(\"kata\")"),
        ("Some(false)", "Some(true)"),
        ("Some(Quantity(\"1\"))", "Some(Quantity(\"4\"))"),
        ("None", "Some([\"/bin/agent\"])"),
        ("None", "Some([\"--fast\"])"),
    ];
    for ((what, d, o), (want_d, want_o)) in rows.iter().zip(expected) {
        assert_eq!(d, want_d, "{what} default");
        assert_eq!(o, want_o, "{what} override");
    }
    assert_eq!(
        default.deployment.spec.as_ref().and_then(|s| s.replicas),
        Some(2)
    );
}

#[test]
fn children_are_owned_labelled_and_named() {
    let c = built(&agent(|_| {}));
    let metas = [
        &c.service_account.metadata,
        &c.sidecar_config.metadata,
        &c.deployment.metadata,
        &c.network_policy.metadata,
        &c.service.as_ref().expect("service").metadata,
    ];
    for m in metas {
        let owner: &OwnerReference = &m.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("Agent", "helper", "uid-1")
        );
        assert_eq!(owner.controller, Some(true));
        assert_eq!(
            m.labels
                .as_ref()
                .and_then(|l| l.get(AGENT_LABEL))
                .map(String::as_str),
            Some("helper")
        );
        assert_eq!(m.namespace.as_deref(), Some("team"));
    }
    assert_eq!(
        c.sidecar_config.metadata.name.as_deref(),
        Some("helper-sidecar")
    );
}

#[test]
fn network_policy_opens_the_platform_namespaces_only_when_configured() {
    let egress = |c: &Children| {
        c.network_policy
            .spec
            .as_ref()
            .and_then(|s| s.egress.clone())
            .expect("egress")
    };
    let plain = built(&agent(|_| {}));
    assert!(
        egress(&plain).iter().all(|r| r
            .to
            .iter()
            .flatten()
            .all(|p| p.namespace_selector.is_none())),
        "no namespace is opened by default"
    );

    let mut config = OperatorConfig::default();
    config.sidecar.egress_namespaces = vec!["soma-system".into(), "observability".into()];
    let resolved = Resolved {
        replicas: 1,
        budgets: Vec::new(),
        capsules: Vec::new(),
        ..Resolved::default()
    };
    let c = children(&agent(|_| {}), &resolved, &config).expect("children");
    let rules = egress(&c);
    let last = rules.last().expect("a rule");
    let selector = last
        .to
        .as_ref()
        .and_then(|t| t[0].namespace_selector.as_ref())
        .expect("namespaceSelector");
    let req = &selector.match_expressions.as_ref().expect("expressions")[0];
    assert_eq!(req.key, "kubernetes.io/metadata.name");
    assert_eq!(req.operator, "In");
    assert_eq!(
        req.values.as_deref(),
        Some(&["soma-system".to_owned(), "observability".to_owned()][..])
    );
    assert!(last.ports.is_none(), "any port in those namespaces");
    assert_eq!(rules.len(), egress(&plain).len() + 1);
}

#[test]
fn service_only_with_a_port() {
    assert!(built(&agent(|_| {})).service.is_some());
    assert!(built(&agent(|s| s.port = None)).service.is_none());
}

#[test]
fn network_policy_opens_exactly_the_allow_list() {
    let c = built(&agent(|s| {
        s.sandbox.egress = vec![
            EgressRule {
                cidr: Some("10.1.0.0/16".into()),
                host: None,
                ports: vec![5432],
            },
            EgressRule {
                cidr: None,
                host: Some("api.github.com".into()),
                ports: vec![],
            },
        ]
    }));
    let egress = c
        .network_policy
        .spec
        .as_ref()
        .and_then(|s| s.egress.clone())
        .expect("egress");
    assert_eq!(egress.len(), 4, "DNS, provider, two allow-list entries");
    let provider = &egress[1];
    let block = provider
        .to
        .as_ref()
        .and_then(|t| t[0].ip_block.as_ref())
        .expect("ipBlock");
    assert!(
        block
            .except
            .as_ref()
            .is_some_and(|e| e.contains(&"169.254.0.0/16".to_owned())),
        "metadata endpoint excluded"
    );
    assert_eq!(
        provider.ports.as_ref().and_then(|p| p[0].port.clone()),
        Some(IntOrString::Int(443))
    );
    let cidr_rule = &egress[2];
    assert_eq!(
        cidr_rule
            .to
            .as_ref()
            .and_then(|t| t[0].ip_block.as_ref())
            .map(|b| b.cidr.as_str()),
        Some("10.1.0.0/16")
    );
    assert_eq!(
        cidr_rule.ports.as_ref().and_then(|p| p[0].port.clone()),
        Some(IntOrString::Int(5432))
    );
    let host_rule = &egress[3];
    assert_eq!(
        host_rule.ports.as_ref().and_then(|p| p[0].port.clone()),
        Some(IntOrString::Int(443)),
        "host rules default to 443"
    );

    let custom = built(&agent(|s| {
        s.model.endpoint = Some("http://vllm.models:8000/v1".into())
    }));
    let provider = &custom
        .network_policy
        .spec
        .as_ref()
        .and_then(|s| s.egress.clone())
        .expect("egress")[1];
    assert_eq!(
        provider.ports.as_ref().and_then(|p| p[0].port.clone()),
        Some(IntOrString::Int(8000)),
        "endpoint port"
    );
}

#[test]
fn config_change_rolls_the_pods() {
    let hash = |c: &Children| {
        c.deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(CONFIG_HASH_ANNOTATION))
            .cloned()
    };
    let a = built(&agent(|_| {}));
    let b = built(&agent(|s| s.model.name = "gpt-4o-mini".into()));
    assert!(hash(&a).is_some());
    assert_ne!(hash(&a), hash(&b));
    assert_eq!(
        hash(&a),
        hash(&built(&agent(|_| {}))),
        "stable for the same input"
    );
}

#[test]
fn upstream_port_parsing() {
    for (url, port) in [
        ("https://api.openai.com", 443),
        ("http://x:8000/v1", 8000),
        ("http://x/v1", 80),
        ("https://h:8443", 8443),
    ] {
        assert_eq!(upstream_port(url), port, "{url}");
    }
}

#[test]
fn sidecar_gets_budget_definitions_and_a_writable_outbox() {
    let budget: soma_metering::BudgetDef = serde_json::from_value(serde_json::json!({
        "namespace": "research", "name": "team", "uid": "u1", "generation": 2,
        "limits": {"tokens": 1000}, "period": {"calendar": "day"}
    }))
    .expect("budget definition");
    let resolved = Resolved {
        replicas: 1,
        budgets: vec![budget],
        capsules: Vec::new(),
        ..Resolved::default()
    };
    let c = children(&agent(|_| {}), &resolved, &OperatorConfig::default()).expect("children");
    let config = c
        .sidecar_config
        .data
        .as_ref()
        .and_then(|d| d.get("config.yaml"))
        .expect("config");
    let config: serde_json::Value = serde_json::from_str(config).expect("JSON");
    assert_eq!(config["budgets"][0]["name"], "team");
    assert_eq!(config["budgets"][0]["namespace"], "research");
    assert_eq!(config["budgets"][0]["uid"], "u1");
    assert_eq!(config["budgets"][0]["limits"]["tokens"], 1000);
    assert_eq!(config["outboxPath"], "/var/lib/soma/outbox.db");
    let state = sidecar(&c)
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == SIDECAR_STATE_DIR)
        .expect("state mount");
    assert_eq!(state.read_only, Some(false));
    assert!(
        agent_container(&c)
            .volume_mounts
            .iter()
            .flatten()
            .all(|m| m.name != state.name),
        "the agent cannot touch the outbox"
    );
    let volume = pod(&c)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == state.name)
        .expect("state volume");
    assert!(volume.empty_dir.is_some());
    // A Budget edit reaches running sidecars live: the ConfigMap changes, the pod template
    // (and so the pods) does not.
    let mut edited = resolved.clone();
    edited.budgets[0].limits.tokens = Some(10);
    edited.budgets[0].generation = 3;
    let e = children(&agent(|_| {}), &edited, &OperatorConfig::default()).expect("children");
    assert_ne!(c.sidecar_config.data, e.sidecar_config.data);
    let hash = |c: &Children| {
        pod_template_annotations(c)
            .get(CONFIG_HASH_ANNOTATION)
            .cloned()
            .expect("hash")
    };
    assert_eq!(hash(&c), hash(&e), "a Budget edit must not roll the pods");
    // Anything else in the configuration does.
    let other = children(
        &agent(|s| s.model.name = "gpt-4o-mini".into()),
        &edited,
        &OperatorConfig::default(),
    )
    .expect("children");
    assert_ne!(hash(&e), hash(&other));
}

fn pod_template_annotations(c: &Children) -> std::collections::BTreeMap<String, String> {
    c.deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default()
}

#[test]
fn sidecar_gets_prices_ledger_and_events_only_when_configured() {
    let resolved = Resolved {
        replicas: 3,
        budgets: Vec::new(),
        capsules: Vec::new(),
        ..Resolved::default()
    };
    let sidecar_config = |c: &Children| -> serde_json::Value {
        let text = c
            .sidecar_config
            .data
            .as_ref()
            .and_then(|d| d.get("config.yaml"))
            .expect("config");
        serde_json::from_str(text).expect("JSON")
    };

    let plain = built(&agent(|_| {}));
    let doc = sidecar_config(&plain);
    assert_eq!(doc["authority"], "embedded");
    assert!(plain.ledger_secret.is_none());
    for field in ["prices", "databaseUrlEnv", "natsUrl"] {
        assert!(
            doc.get(field).is_none(),
            "{field} written without a setting"
        );
    }
    assert!(env_value(sidecar(&plain), "SOMA_DATABASE_URL").is_none());

    let mut config = OperatorConfig::default();
    config.sidecar.prices = Some(
        crate::config::read_price_table("gpt-4o: {inputPerMTok: 2500000, outputPerMTok: 10000000}")
            .expect("prices"),
    );
    config.ledger.url = Some(crate::config::Redacted::new(
        "postgres://soma:secret@ledger.soma-system:5432/soma",
    ));
    config.sidecar.nats_url = Some("nats://nats.soma-system:4222".into());
    let c = children(&agent(|_| {}), &resolved, &config).expect("children");
    let doc = sidecar_config(&c);
    assert_eq!(doc["prices"]["gpt-4o"]["outputPerMTok"], 10_000_000);
    assert_eq!(
        doc["authority"],
        serde_json::json!({"postgres": {"leaseTtlMs": 30000}})
    );
    assert_eq!(doc["databaseUrlEnv"], "SOMA_DATABASE_URL");
    assert_eq!(doc["natsUrl"], "nats://nats.soma-system:4222");
    assert!(
        !doc.to_string().contains("postgres://"),
        "no URL (and so no password) in the ConfigMap"
    );
    let url = env_value(sidecar(&c), "SOMA_DATABASE_URL").expect("ledger env");
    let secret = url
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .expect("from a Secret");
    assert_eq!(
        (secret.name.as_str(), secret.key.as_str()),
        ("helper-ledger", "database-url")
    );
    let ledger = c.ledger_secret.as_ref().expect("ledger Secret");
    assert_eq!(ledger.metadata.name.as_deref(), Some("helper-ledger"));
    assert!(
        ledger.metadata.owner_references.is_some(),
        "deleted with its Agent"
    );
    assert!(
        !format!("{:?}", config.ledger).contains("secret@"),
        "the URL is redacted in logs"
    );
    assert!(
        env_value(agent_container(&c), "SOMA_DATABASE_URL").is_none(),
        "the agent container never sees the ledger"
    );

    let bad = crate::config::read_price_table("gpt-4o: {inputPerMTok: -1, outputPerMTok: 1}");
    assert!(bad.is_err(), "a negative price is refused");
    let bad = crate::config::read_price_table("gpt-4o: {inputPerMTok: 1, outputPerMtok: 1}");
    assert!(bad.is_err(), "a misspelt field is refused");
}

#[test]
fn sidecar_exports_traces_only_when_the_operator_has_an_otlp_endpoint() {
    let otel_vars = |c: &Children| -> Vec<(String, String)> {
        sidecar(c)
            .env
            .iter()
            .flatten()
            .filter(|e| e.name.starts_with("OTEL_"))
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect()
    };
    let plain = built(&agent(|_| {}));
    assert_eq!(otel_vars(&plain), Vec::new());
    assert!(env_value(sidecar(&plain), "SOMA_POD_NAME").is_none());

    let resolved = Resolved {
        replicas: 1,
        budgets: Vec::new(),
        capsules: Vec::new(),
        ..Resolved::default()
    };
    let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    let cases = [
        (None, None),
        (
            Some("grpc"),
            Some(pair("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")),
        ),
    ];
    for (protocol, protocol_var) in cases {
        let mut config = OperatorConfig::default();
        config.sidecar.otlp_endpoint = Some("http://otel-collector.observability:4318".into());
        config.sidecar.otlp_protocol = protocol.map(str::to_owned);
        let c = children(&agent(|_| {}), &resolved, &config).expect("children");
        let mut want = vec![pair(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://otel-collector.observability:4318",
        )];
        want.extend(protocol_var);
        want.extend([
            pair("OTEL_SERVICE_NAME", "soma-proxy"),
            pair(
                "OTEL_RESOURCE_ATTRIBUTES",
                "k8s.namespace.name=team,k8s.pod.name=$(SOMA_POD_NAME),soma.agent=helper",
            ),
        ]);
        assert_eq!(otel_vars(&c), want, "protocol {protocol:?}");
        // $(SOMA_POD_NAME) expands only from a variable defined before it.
        let names: Vec<&str> = sidecar(&c)
            .env
            .iter()
            .flatten()
            .map(|e| e.name.as_str())
            .collect();
        let pos = |n: &str| names.iter().position(|x| *x == n).expect(n);
        assert!(pos("SOMA_POD_NAME") < pos("OTEL_RESOURCE_ATTRIBUTES"));
        let pod_name = env_value(sidecar(&c), "SOMA_POD_NAME")
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        assert_eq!(pod_name, Some("metadata.name"));
        assert!(
            agent_container(&c)
                .env
                .iter()
                .flatten()
                .all(|e| !e.name.starts_with("OTEL_")),
            "the agent container's telemetry is the agent's own business"
        );
    }
}

#[test]
fn a_verified_image_is_pinned_in_the_agent_container_only() {
    let a = agent(|s| s.image = "reg.example/agent:1.0".into());
    let unpinned = built(&a);
    assert_eq!(
        agent_container(&unpinned).image.as_deref(),
        Some("reg.example/agent:1.0")
    );
    let pinned_ref =
        "reg.example/agent@sha256:2222222222222222222222222222222222222222222222222222222222222222";
    let mut pinned = built(&a);
    pin_agent_image(&mut pinned.deployment, pinned_ref);
    assert_eq!(agent_container(&pinned).image.as_deref(), Some(pinned_ref));
    let sidecar = pod(&pinned)
        .init_containers
        .as_ref()
        .and_then(|c| c.first())
        .expect("sidecar");
    assert_eq!(
        sidecar.image.as_deref(),
        Some(OperatorConfig::default().sidecar.image.as_str()),
        "the sidecar keeps the operator's image"
    );
}

#[test]
fn scrape_annotations_point_at_the_sidecar_metrics_only_when_asked() {
    let plain = built(&agent(|_| {}));
    assert!(
        pod_template_annotations(&plain)
            .keys()
            .all(|k| !k.starts_with("prometheus.io/")),
        "no scrape annotations by default"
    );
    let mut config = OperatorConfig::default();
    config.sidecar.scrape_annotations = true;
    config.sidecar.admin_port = 9191;
    let resolved = Resolved {
        replicas: 1,
        budgets: Vec::new(),
        capsules: Vec::new(),
        ..Resolved::default()
    };
    let c = children(&agent(|_| {}), &resolved, &config).expect("children");
    let a = pod_template_annotations(&c);
    assert_eq!(
        a.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        a.get("prometheus.io/port").map(String::as_str),
        Some("9191")
    );
    assert_eq!(
        a.get("prometheus.io/path").map(String::as_str),
        Some("/metrics")
    );
    assert!(a.contains_key(CONFIG_HASH_ANNOTATION), "the hash stays");
}

#[test]
fn the_metrics_port_is_opened_to_the_metrics_namespaces_only_when_named() {
    let ingress = |c: &Children| {
        c.network_policy
            .spec
            .as_ref()
            .and_then(|s| s.ingress.clone())
            .expect("ingress")
    };
    let ports = |r: &NetworkPolicyIngressRule| -> Vec<IntOrString> {
        r.ports
            .iter()
            .flatten()
            .filter_map(|p| p.port.clone())
            .collect()
    };
    // Default: one rule, from anywhere, to the agent's port and the metrics port.
    let plain = ingress(&built(&agent(|s| s.port = Some(8000))));
    assert_eq!(plain.len(), 1);
    assert!(plain[0].from.is_none());
    assert_eq!(
        ports(&plain[0]),
        [IntOrString::Int(8000), IntOrString::Int(9090)]
    );

    let mut config = OperatorConfig::default();
    config.sidecar.metrics_namespaces = vec!["monitoring".into()];
    let resolved = Resolved {
        replicas: 1,
        budgets: Vec::new(),
        capsules: Vec::new(),
        ..Resolved::default()
    };
    for (port, rules) in [(Some(8000), 2), (None, 1)] {
        let c = children(&agent(|s| s.port = port), &resolved, &config).expect("children");
        let rules_got = ingress(&c);
        assert_eq!(rules_got.len(), rules, "port {port:?}");
        if let Some(p) = port {
            assert!(rules_got[0].from.is_none(), "the agent's port stays open");
            assert_eq!(ports(&rules_got[0]), [IntOrString::Int(p)]);
        }
        let metrics = rules_got.last().expect("the metrics rule");
        assert_eq!(ports(metrics), [IntOrString::Int(9090)]);
        let from = metrics.from.as_ref().expect("restricted");
        let req = &from[0]
            .namespace_selector
            .as_ref()
            .and_then(|n| n.match_expressions.clone())
            .expect("expressions")[0];
        assert_eq!(
            (req.key.as_str(), req.operator.as_str()),
            ("kubernetes.io/metadata.name", "In")
        );
        assert_eq!(req.values.as_deref(), Some(&["monitoring".to_owned()][..]));
    }
}

#[test]
fn a_brown_out_is_rendered_into_the_sidecar_file_without_rolling_the_pods() {
    let plain = built(&agent(|_| {}));
    let browned = children(
        &agent(|_| {}),
        &Resolved {
            replicas: 2,
            brown_out: Some(soma_contract::load::BrownOut {
                fraction: 0.43,
                action: soma_contract::load::BrownOutAction::Shed,
                model: None,
                message: "maxReplicas is 2".into(),
            }),
            brown_out_revision: 1_700_000_000_000,
            ..Resolved::default()
        },
        &OperatorConfig::default(),
    )
    .expect("children");
    let doc: serde_json::Value = serde_json::from_str(
        browned
            .sidecar_config
            .data
            .as_ref()
            .and_then(|d| d.get("config.yaml"))
            .expect("config"),
    )
    .expect("JSON");
    assert_eq!(doc["brownOut"]["fraction"], 0.43);
    assert_eq!(doc["brownOut"]["action"], "shed");
    assert_eq!(doc["brownOutRevision"], 1_700_000_000_000_i64);
    // The sidecar reads it back (the contract), and the pods are not rolled for it.
    let text = serde_json::to_string(&doc).expect("JSON");
    let parsed = soma_contract::SidecarConfig::parse(&text).expect("the sidecar reads it");
    assert_eq!(parsed.brown_out_revision, 1_700_000_000_000);
    assert_eq!(
        pod_template_annotations(&browned).get(CONFIG_HASH_ANNOTATION),
        pod_template_annotations(&plain).get(CONFIG_HASH_ANNOTATION)
    );
}

mod vault;
