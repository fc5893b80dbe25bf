//! The Vault parts of an Agent's children: the login material mounted into the sidecar alone
//! (projected token, AppRole Secret), the configuration naming files and paths only, the
//! operator's defaults, ledger credentials from the database secrets engine, and `render`.

use super::*;

#[test]
fn vault_gets_the_sidecar_alone_a_projected_token_and_the_config_names_no_secret() {
    let c = built(&agent(|s| {
        s.credentials = Some(Credentials {
            secret_ref: None,
            vault: Some(
                serde_json::from_value(serde_json::json!({
                    "address": "https://vault.vault:8200", "path": "secret/data/teams/a",
                    "key": "api-key", "role": "helper", "auth": "jwt", "audience": "bao",
                    "namespace": "team-a", "refreshSeconds": 30
                }))
                .expect("VaultRef"),
            ),
        })
    }));
    let volume = pod(&c)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "vault-token")
        .expect("vault token volume");
    let projection = volume
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_ref())
        .and_then(|s| s.first())
        .and_then(|s| s.service_account_token.as_ref())
        .expect("service-account token projection");
    assert_eq!(projection.audience.as_deref(), Some("bao"));
    assert_eq!(projection.path, "token");
    let mounted = |container: &Container| {
        container
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "vault-token")
    };
    assert!(mounted(sidecar(&c)));
    assert!(!mounted(agent_container(&c)), "the agent gets no token");
    assert_eq!(pod(&c).automount_service_account_token, Some(false));
    let probe = sidecar(&c)
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .and_then(|g| g.path.as_deref());
    assert_eq!(probe, Some("/readyz"), "not ready without a key");
    let config = sidecar_config(&c);
    assert_eq!(
        config["credentials"]["vault"],
        serde_json::json!({
            "address": "https://vault.vault:8200", "namespace": "team-a",
            "auth": {"jwt": {"mount": "jwt", "tokenPath": "/var/run/secrets/soma.dev/vault/token"}},
            "role": "helper", "mount": "secret", "path": "secret/data/teams/a", "key": "api-key",
            "refreshMs": 30000
        })
    );
}

#[test]
fn the_operators_vault_defaults_fill_what_the_agent_leaves_unset() {
    let vault = |json: serde_json::Value| {
        agent(|s| {
            s.credentials = Some(Credentials {
                secret_ref: None,
                vault: Some(serde_json::from_value(json).expect("VaultRef")),
            })
        })
    };
    let config = OperatorConfig {
        vault: crate::config::VaultDefaults {
            address: Some("https://vault.vault.svc:8200".into()),
            ca_bundle: Some(
                "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            ),
            auth_mount: Some("kubernetes-prod".into()),
            role: Some("soma-agents".into()),
            audience: Some("vault-prod".into()),
            ..crate::config::VaultDefaults::default()
        },
        ..OperatorConfig::default()
    };
    let resolved = Resolved {
        replicas: 1,
        ..Resolved::default()
    };
    let audience = |c: &Children| {
        pod(c)
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "vault-token")
            .and_then(|v| v.projected.as_ref())
            .and_then(|p| p.sources.as_ref())
            .and_then(|s| s.first())
            .and_then(|s| s.service_account_token.as_ref())
            .and_then(|t| t.audience.clone())
    };
    // Nothing set on the Agent: every default applies, the CA beside the configuration.
    let c = children(
        &vault(serde_json::json!({"path": "teams/a", "key": "k"})),
        &resolved,
        &config,
    )
    .expect("children");
    let v = &sidecar_config(&c)["credentials"]["vault"];
    assert_eq!(v["address"], "https://vault.vault.svc:8200");
    assert_eq!(v["role"], "soma-agents");
    assert_eq!(v["auth"]["kubernetes"]["mount"], "kubernetes-prod");
    assert_eq!(v["caCertPath"], "/etc/soma/proxy/vault-ca.pem");
    assert_eq!(audience(&c).as_deref(), Some("vault-prod"));
    let data = c.sidecar_config.data.as_ref().expect("data");
    assert!(data["vault-ca.pem"].contains("BEGIN CERTIFICATE"));
    // The Agent's own fields win; JWT auth keeps its own mount.
    let c = children(
        &vault(
            serde_json::json!({"path": "teams/a", "key": "k", "address": "https://other:8200",
            "role": "mine", "auth": "jwt", "audience": "bao"}),
        ),
        &resolved,
        &config,
    )
    .expect("children");
    let v = &sidecar_config(&c)["credentials"]["vault"];
    assert_eq!(
        (v["address"].as_str(), v["role"].as_str()),
        (Some("https://other:8200"), Some("mine"))
    );
    assert_eq!(v["auth"]["jwt"]["mount"], "jwt");
    assert_eq!(audience(&c).as_deref(), Some("bao"));
    // render says what the sidecar will ask Vault for.
    let summary = crate::render::vault_summary(&crate::workload::vault_credentials(
        &serde_json::from_value(
            serde_json::json!({"path": "secret/data/teams/a", "key": "api-key"}),
        )
        .expect("VaultRef"),
        &config.vault,
    ));
    for part in [
        "https://vault.vault.svc:8200",
        "kubernetes auth at auth/kubernetes-prod",
        "role soma-agents",
        "\"api-key\" of secret/data/teams/a",
        "/etc/soma/proxy/vault-ca.pem",
    ] {
        assert!(summary.contains(part), "{part}: {summary}");
    }
}

/// An Agent whose provider key comes from Vault as `vault` says, with `ledger` as its
/// `ledgerCredentials` (when given).
fn vault_agent(vault: serde_json::Value, ledger: Option<serde_json::Value>) -> Agent {
    agent(|s| {
        s.credentials = Some(Credentials {
            secret_ref: None,
            vault: Some(serde_json::from_value(vault).expect("VaultRef")),
        });
        s.ledger_credentials = ledger.map(|l| serde_json::from_value(l).expect("ledger"));
    })
}

fn sidecar_config(c: &Children) -> serde_json::Value {
    let data = c.sidecar_config.data.as_ref().expect("data");
    serde_json::from_str(data.get("config.yaml").expect("config")).expect("JSON")
}

#[test]
fn approle_mounts_its_secret_into_the_sidecar_alone() {
    let c = built(&vault_agent(
        serde_json::json!({"address": "https://vault.vault:8200", "path": "teams/a", "key": "api-key",
            "auth": "appRole", "authMount": "approle-prod", "role": "ignored",
            "appRole": {"secretName": "bot-approle", "secretIdKey": "sid"}}),
        None,
    ));
    let volumes: Vec<&str> = pod(&c)
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert!(
        !volumes.contains(&"vault-token"),
        "AppRole needs no service-account token: {volumes:?}"
    );
    let volume = pod(&c)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "vault-approle")
        .expect("the AppRole Secret's volume");
    let secret = volume.secret.as_ref().expect("a Secret volume");
    assert_eq!(secret.secret_name.as_deref(), Some("bot-approle"));
    assert_eq!(secret.default_mode, Some(0o400));
    let items: Vec<(&str, &str)> = secret
        .items
        .iter()
        .flatten()
        .map(|i| (i.key.as_str(), i.path.as_str()))
        .collect();
    assert_eq!(items, vec![("role-id", "role-id"), ("sid", "secret-id")]);
    let mount = sidecar(&c)
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "vault-approle")
        .expect("mounted into the sidecar");
    assert_eq!(
        (mount.mount_path.as_str(), mount.read_only),
        ("/var/run/secrets/soma.dev/vault-approle", Some(true))
    );
    // The agent container: no such mount, and no variable that reads any Secret.
    let agent = agent_container(&c);
    assert!(
        agent
            .volume_mounts
            .iter()
            .flatten()
            .all(|m| m.name != "vault-approle" && m.name != "vault-token"),
        "{:?}",
        agent.volume_mounts
    );
    assert!(
        agent.env.iter().flatten().all(|e| e
            .value_from
            .as_ref()
            .is_none_or(|f| f.secret_key_ref.is_none())),
        "{:?}",
        agent.env
    );
    assert_eq!(pod(&c).automount_service_account_token, Some(false));
    assert_eq!(
        sidecar_config(&c)["credentials"]["vault"]["auth"],
        serde_json::json!({"appRole": {"mount": "approle-prod",
            "roleIdPath": "/var/run/secrets/soma.dev/vault-approle/role-id",
            "secretIdPath": "/var/run/secrets/soma.dev/vault-approle/secret-id"}})
    );
    assert_eq!(
        sidecar_config(&c)["credentials"]["vault"].get("role"),
        None,
        "AppRole's role is its role id"
    );
    // render names the Secret and the files, not their contents.
    let out = crate::render::render(
        &serde_yaml::to_string(&vault_agent(
            serde_json::json!({"path": "teams/a", "key": "api-key", "auth": "appRole",
                "appRole": {"secretName": "bot-approle"}}),
            None,
        ))
        .expect("yaml"),
        &OperatorConfig::default(),
    )
    .expect("render");
    for part in [
        "appRole auth at auth/approle",
        "the role id in /var/run/secrets/soma.dev/vault-approle/role-id",
        "keys \"role-id\" and \"secret-id\" of Secret bot-approle, mounted into the sidecar container only",
    ] {
        assert!(out.contains(part), "{part}: {out}");
    }
}

#[test]
fn ledger_credentials_reach_the_sidecar_config_and_the_shared_login_does_not() {
    let config = OperatorConfig {
        ledger: crate::config::LedgerConfig {
            url: Some(crate::config::Redacted::new(
                "postgres://soma:shared-pass@ledger.soma-system:5432/soma_ledger?sslmode=require",
            )),
            ..crate::config::LedgerConfig::default()
        },
        vault: crate::config::VaultDefaults {
            ledger_role: Some("soma-ledger".into()),
            ..crate::config::VaultDefaults::default()
        },
        ..OperatorConfig::default()
    };
    let resolved = Resolved {
        replicas: 1,
        ..Resolved::default()
    };
    let kv = serde_json::json!({"address": "https://vault:8200", "path": "teams/a", "key": "k", "role": "r"});
    let build = |ledger: Option<serde_json::Value>, config: &OperatorConfig| {
        children(&vault_agent(kv.clone(), ledger), &resolved, config).expect("children")
    };
    let url_in = |c: &Children| {
        let secret = c.ledger_secret.as_ref().expect("a ledger Secret");
        let bytes = &secret.data.as_ref().expect("data")["database-url"].0;
        String::from_utf8(bytes.clone()).expect("utf-8")
    };
    // The operator's default role, the default mount; the Secret's URL without the login.
    let c = build(Some(serde_json::json!({"vault": {}})), &config);
    assert_eq!(
        sidecar_config(&c)["ledgerCredentials"],
        serde_json::json!({"vault": {"mount": "database", "role": "soma-ledger"}})
    );
    assert_eq!(
        url_in(&c),
        "postgres://ledger.soma-system:5432/soma_ledger?sslmode=require"
    );
    let text = serde_json::to_string(&(&c.sidecar_config, &c.deployment)).expect("json");
    assert!(
        text.contains("soma-ledger") && !text.contains("shared-pass"),
        "{text}"
    );
    // The Agent's own fields win.
    let c = build(
        Some(serde_json::json!({"vault": {"mount": "db-prod", "role": "ledger-rw"}})),
        &config,
    );
    assert_eq!(
        sidecar_config(&c)["ledgerCredentials"],
        serde_json::json!({"vault": {"mount": "db-prod", "role": "ledger-rw"}})
    );
    // Without ledgerCredentials: the operator's URL as it is, and none in the config.
    let plain = build(None, &config);
    assert!(url_in(&plain).contains("shared-pass"));
    assert_eq!(sidecar_config(&plain).get("ledgerCredentials"), None);
    assert_ne!(
        pod_template_annotations(&plain).get(CONFIG_HASH_ANNOTATION),
        pod_template_annotations(&c).get(CONFIG_HASH_ANNOTATION),
        "asking for ledger credentials rolls the pods"
    );
    // What cannot work is said, and never written into a configuration the sidecar refuses.
    let no_ledger = OperatorConfig {
        ledger: crate::config::LedgerConfig::default(),
        ..config.clone()
    };
    let no_role = OperatorConfig {
        vault: crate::config::VaultDefaults::default(),
        ..config.clone()
    };
    let asked = serde_json::json!({"vault": {}});
    for (name, agent, cfg, says) in [
        (
            "no operator ledger",
            vault_agent(kv.clone(), Some(asked.clone())),
            &no_ledger,
            "the operator has no ledger (--ledger-url",
        ),
        (
            "no role anywhere",
            vault_agent(kv.clone(), Some(asked.clone())),
            &no_role,
            "sets no role and the operator has no default (--vault-ledger-role",
        ),
        (
            "provider key not from Vault",
            agent_with_ledger_but_no_vault(asked.clone()),
            &config,
            "set credentials.vault",
        ),
    ] {
        let err = crate::workload::vault::ledger_credentials(&agent.spec, cfg).expect_err(name);
        assert!(err.contains(says), "{name}: {err}");
        let c = children(&agent, &resolved, cfg).expect("children");
        assert_eq!(sidecar_config(&c).get("ledgerCredentials"), None, "{name}");
    }
    // render: what the sidecar will ask for, or why the pods would not start.
    let manifest = |a: &Agent| serde_yaml::to_string(a).expect("yaml");
    let out = crate::render::render(
        &manifest(&vault_agent(kv.clone(), Some(asked.clone()))),
        &config,
    )
    .expect("render");
    assert!(
        out.contains("For the ledger it reads database/creds/soma-ledger"),
        "{out}"
    );
    let out = crate::render::render(&manifest(&vault_agent(kv.clone(), Some(asked))), &no_role)
        .expect("render");
    assert!(
        out.contains("# LedgerCredentialsUnusable: spec.ledgerCredentials.vault sets no role"),
        "{out}"
    );
}

fn agent_with_ledger_but_no_vault(ledger: serde_json::Value) -> Agent {
    agent(|s| s.ledger_credentials = Some(serde_json::from_value(ledger).expect("ledger")))
}
