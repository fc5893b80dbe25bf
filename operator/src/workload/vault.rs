//! The Vault parts of a workload: what its sidecar asks Vault for (the Agent's
//! `credentials.vault` and `ledgerCredentials.vault` with the operator's [`VaultDefaults`]
//! filled in), and the login material the sidecar container alone mounts. Pure.
//!
//! ```text
//!  credentials.vault ─┬─ auth kubernetes | jwt ─► projected SA token (audience) ─► /var/run/secrets/soma.dev/vault/token
//!                     └─ auth appRole ─► Secret appRole.secretName ─► /var/run/secrets/soma.dev/vault-approle/{role-id,secret-id}
//!  ledgerCredentials.vault ─► ledgerCredentials {mount, role} in the sidecar's config,
//!                             and the ledger Secret's URL without its user and password
//! ```
//!
//! The agent container gets none of these volumes, and nothing here is secret: the ConfigMap
//! names files and paths only.

use k8s_openapi::api::core::v1::{
    KeyToPath, ProjectedVolumeSource, SecretVolumeSource, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use soma_contract::{
    AppRoleAuth, JwtAuth, KubernetesAuth, LedgerCredentials, VaultAuth, VaultCredentials,
    VaultDatabase,
};
use soma_crds::agent::{AgentSpec, VaultAuthMethod, VaultRef};

use super::{SIDECAR_CONFIG_DIR, mount};
use crate::config::{OperatorConfig, VaultDefaults};

/// Where the sidecar finds the CA bundle of [`VaultDefaults::ca_bundle`] (a key of its
/// ConfigMap, mounted at [`SIDECAR_CONFIG_DIR`]).
pub const VAULT_CA_KEY: &str = "vault-ca.pem";

/// The projected service-account token volume for Vault's Kubernetes and JWT auth.
pub const VAULT_TOKEN_VOLUME: &str = "vault-token";
/// Where it is mounted in the sidecar (`soma_contract::VAULT_TOKEN_PATH`'s folder).
const VAULT_TOKEN_DIR: &str = "/var/run/secrets/soma.dev/vault";
/// The AppRole Secret's volume.
pub const VAULT_APPROLE_VOLUME: &str = "vault-approle";
/// Where it is mounted in the sidecar: `role-id` and `secret-id`, whatever the Secret's keys.
pub const VAULT_APPROLE_DIR: &str = "/var/run/secrets/soma.dev/vault-approle";

/// The Agent's `credentials.vault`, when the provider key comes from Vault.
pub fn vault_ref(spec: &AgentSpec) -> Option<&VaultRef> {
    spec.credentials
        .as_ref()
        .filter(|c| c.secret_ref.is_none())
        .and_then(|c| c.vault.as_ref())
}

/// What the sidecar asks Vault for: the Agent's `credentials.vault`, its unset fields filled
/// from the operator's [`VaultDefaults`], logging in with the sidecar's projected
/// service-account token (Kubernetes auth, or `auth: jwt`) or the AppRole files.
pub fn vault_credentials(v: &VaultRef, defaults: &VaultDefaults) -> VaultCredentials {
    let auth = match v.auth {
        VaultAuthMethod::Kubernetes => {
            let mut k = KubernetesAuth::default();
            if let Some(m) = v.auth_mount.as_ref().or(defaults.auth_mount.as_ref()) {
                k.mount.clone_from(m);
            }
            VaultAuth::Kubernetes(k)
        }
        VaultAuthMethod::Jwt => {
            let mut j = JwtAuth::default();
            if let Some(m) = &v.auth_mount {
                j.mount.clone_from(m);
            }
            VaultAuth::Jwt(j)
        }
        VaultAuthMethod::AppRole => VaultAuth::AppRole(AppRoleAuth {
            mount: v.auth_mount.clone().unwrap_or_else(|| "approle".into()),
            role_id_path: format!("{VAULT_APPROLE_DIR}/role-id").into(),
            secret_id_path: format!("{VAULT_APPROLE_DIR}/secret-id").into(),
        }),
    };
    // AppRole's role is its role id: a role name would only mislead `render`.
    let role = match v.auth {
        VaultAuthMethod::AppRole => None,
        _ => v.role.clone().or_else(|| defaults.role.clone()),
    };
    VaultCredentials {
        address: v.address.clone().or_else(|| defaults.address.clone()),
        namespace: v.namespace.clone(),
        ca_cert_path: defaults
            .ca_bundle
            .as_ref()
            .map(|_| format!("{SIDECAR_CONFIG_DIR}/{VAULT_CA_KEY}").into()),
        auth,
        role,
        mount: v.mount.clone().unwrap_or_else(|| "secret".into()),
        path: v.path.clone(),
        key: v.key.clone(),
        version: v.version,
        refresh_ms: v.refresh_seconds.map_or(60_000, |s| u64::from(s) * 1_000),
    }
}

/// The audience of the sidecar's projected token for Vault.
fn vault_audience(v: &VaultRef, defaults: &VaultDefaults) -> String {
    v.audience
        .clone()
        .or_else(|| defaults.audience.clone())
        .unwrap_or_else(|| "vault".into())
}

/// The reason an Agent or Job waits with when [`ledger_credentials`] cannot be used.
pub const LEDGER_CREDENTIALS_UNUSABLE: &str = "LedgerCredentialsUnusable";

/// The sidecar's `ledgerCredentials`: the Agent's `ledgerCredentials.vault` with the operator's
/// defaults, or why the sidecar could not use it (then the workload must not start: the sidecar
/// would refuse its configuration). `Ok(None)`: the Agent asks for none.
pub fn ledger_credentials(
    spec: &AgentSpec,
    config: &OperatorConfig,
) -> Result<Option<LedgerCredentials>, String> {
    let Some(l) = &spec.ledger_credentials else {
        return Ok(None);
    };
    if vault_ref(spec).is_none() {
        return Err("spec.ledgerCredentials.vault logs in to Vault as spec.credentials.vault does, and the provider key does not come from Vault: set credentials.vault, or remove ledgerCredentials".to_owned());
    }
    if config.ledger.url.is_none() {
        return Err("spec.ledgerCredentials asks Vault for the usage ledger's PostgreSQL user, but the operator has no ledger (--ledger-url, chart ledger.*): remove ledgerCredentials, or give the operator a ledger".to_owned());
    }
    let defaults = &config.vault;
    let Some(role) = l
        .vault
        .role
        .clone()
        .or_else(|| defaults.ledger_role.clone())
    else {
        return Err("spec.ledgerCredentials.vault sets no role and the operator has no default (--vault-ledger-role, chart vault.ledger.role): name the database secrets engine's role".to_owned());
    };
    let mount = l
        .vault
        .mount
        .clone()
        .or_else(|| defaults.ledger_mount.clone())
        .unwrap_or_else(|| "database".into());
    Ok(Some(LedgerCredentials::Vault(VaultDatabase {
        mount,
        role,
    })))
}

/// `url` without a user or password, in its authority or as `user=`/`password=` options: with
/// ledger credentials from Vault the sidecar logs in as the user Vault leases, so the shared
/// login never reaches its pod.
pub fn without_login(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| {
            let key = kv.split('=').next().unwrap_or_default();
            !kv.is_empty()
                && !key.eq_ignore_ascii_case("user")
                && !key.eq_ignore_ascii_case("password")
        })
        .collect();
    let query = if kept.is_empty() {
        String::new()
    } else {
        format!("?{}", kept.join("&"))
    };
    format!("{scheme}://{host}{path}{query}")
}

/// The sidecar's volumes for its Vault login: a projected token (Kubernetes or JWT auth) or
/// the AppRole Secret (its two keys as `role-id` and `secret-id`, owner-read-only).
pub fn volumes(spec: &AgentSpec, config: &OperatorConfig) -> Vec<Volume> {
    let Some(v) = vault_ref(spec) else {
        return Vec::new();
    };
    let volume = match (&v.auth, &v.app_role) {
        (VaultAuthMethod::AppRole, Some(a)) => {
            let item = |key: &Option<String>, default: &str, path: &str| KeyToPath {
                key: key.clone().unwrap_or_else(|| default.to_owned()),
                path: path.to_owned(),
                mode: None,
            };
            Volume {
                name: VAULT_APPROLE_VOLUME.to_owned(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(a.secret_name.clone()),
                    items: Some(vec![
                        item(&a.role_id_key, "role-id", "role-id"),
                        item(&a.secret_id_key, "secret-id", "secret-id"),
                    ]),
                    default_mode: Some(0o400),
                    optional: Some(false),
                }),
                ..Volume::default()
            }
        }
        // The CRD requires appRole with auth: appRole; an object that bypassed it gets no
        // volume, and the sidecar says VaultMisconfigured (no role id file).
        (VaultAuthMethod::AppRole, None) => return Vec::new(),
        // The sidecar's own token for Vault's Kubernetes or JWT auth, with Vault's audience
        // and a short life (the kubelet rotates it): mounted into the sidecar only, so the
        // agent container still has no service-account token.
        (VaultAuthMethod::Kubernetes | VaultAuthMethod::Jwt, _) => Volume {
            name: VAULT_TOKEN_VOLUME.to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(vault_audience(v, &config.vault)),
                        expiration_seconds: Some(600),
                        path: "token".to_owned(),
                    }),
                    ..VolumeProjection::default()
                }]),
                default_mode: Some(0o400),
            }),
            ..Volume::default()
        },
    };
    vec![volume]
}

/// The sidecar's mounts of [`volumes`].
pub fn mounts(spec: &AgentSpec, config: &OperatorConfig) -> Vec<VolumeMount> {
    volumes(spec, config)
        .iter()
        .map(|v| {
            let dir = if v.name == VAULT_APPROLE_VOLUME {
                VAULT_APPROLE_DIR
            } else {
                VAULT_TOKEN_DIR
            };
            mount(&v.name, dir, true)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_login_is_taken_out_of_the_ledger_url() {
        for (url, want) in [
            (
                "postgres://soma:s3cret@ledger.soma-system:5432/soma_ledger?sslmode=require",
                "postgres://ledger.soma-system:5432/soma_ledger?sslmode=require",
            ),
            ("postgresql://u@db/x", "postgresql://db/x"),
            (
                "postgres://db:5432/x?user=soma&sslmode=verify-full&password=p%40ss",
                "postgres://db:5432/x?sslmode=verify-full",
            ),
            ("postgres://db/x", "postgres://db/x"),
            ("postgres://a:b%2Fc@db", "postgres://db"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(without_login(url), want, "{url}");
        }
    }
}
