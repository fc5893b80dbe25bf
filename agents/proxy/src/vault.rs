//! The provider key from Vault (or OpenBao): log in, read a KV v2 field, renew the token
//! before it expires, re-read the secret every `refreshMs`, and revoke the token at stop.
//!
//! ```text
//!  run ─► fetch: token? ──no──► login (kubernetes | jwt | appRole; material read from files)
//!    ▲            │ due for renewal ─► renew-self (refused: log in again)
//!    │            ▼
//!    │          kv2 read mount/path[@version] ─► field `key` ─► KeyHolder::set (rotation: swap)
//!    │            └─ 403 with an old token: log in again once, then read again
//!    └── sleep min(refreshMs, renewal point) │ woken by a provider 401 │ stop ─► revoke-self
//! ```
//!
//! Secrets never reach a log line, a metric or an error: the Vault token, the login material
//! and the key stay in this module and in [`KeyHolder`]; problems are built from Vault's
//! status code, its error text (scrubbed of the login material all the same) and the
//! configured path.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use soma_contract::{VaultAuth, VaultCredentials};
use vaultrs::client::{Client, VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use crate::keys::{KeyHolder, Problem, Reason};
use crate::metrics::Metrics;
use crate::state::AppState;
use crate::upstream::ProviderKey;

/// Longest pause between retries after a failure.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// A token the sidecar holds: when it was issued and for how long.
struct Token {
    issued: Instant,
    ttl: Option<Duration>,
    renewable: bool,
}

impl Token {
    /// Renew at two thirds of the lease; `None`: it does not expire.
    fn renew_at(&self) -> Option<Instant> {
        self.ttl.map(|ttl| self.issued + ttl * 2 / 3)
    }
}

/// One sidecar's Vault session.
pub struct VaultSource {
    cfg: VaultCredentials,
    address: Option<String>,
    client: Option<VaultClient>,
    token: Option<Token>,
    /// Login material read from files, kept to scrub error text.
    secrets: Vec<String>,
}

impl std::fmt::Debug for VaultSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultSource")
            .field("address", &self.address)
            .field("path", &self.cfg.path)
            .field("logged_in", &self.token.is_some())
            .finish_non_exhaustive()
    }
}

/// What one fetch did.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    /// Read the key; the first one, or the same as before.
    Read,
    /// Read a different key and swapped it in.
    Rotated,
}

impl VaultSource {
    /// A session for `cfg` (its address filled from `VAULT_ADDR` by `config::apply_env`).
    /// Nothing is contacted yet.
    pub fn new(cfg: VaultCredentials) -> VaultSource {
        let address = cfg.address.clone().filter(|a| !a.trim().is_empty());
        VaultSource {
            cfg,
            address,
            client: None,
            token: None,
            secrets: Vec::new(),
        }
    }

    /// How often the secret is re-read.
    pub fn refresh(&self) -> Duration {
        Duration::from_millis(self.cfg.refresh_ms.max(1))
    }

    /// The pause before the next fetch: the refresh interval, or sooner when the token is due
    /// for renewal.
    pub fn next_wake(&self) -> Duration {
        let refresh = self.refresh();
        match self.token.as_ref().and_then(Token::renew_at) {
            Some(at) => refresh.min(at.saturating_duration_since(Instant::now())),
            None => refresh,
        }
    }

    /// The pause after a failure.
    pub fn retry(&self) -> Duration {
        self.refresh().min(MAX_RETRY)
    }

    fn problem(&self, reason: Reason, message: String) -> Problem {
        let mut message = message;
        for s in &self.secrets {
            if !s.is_empty() {
                message = message.replace(s.as_str(), "[redacted]");
            }
        }
        Problem::new(reason, message)
    }

    fn where_(&self) -> String {
        let version = self
            .cfg
            .version
            .map(|v| format!(" version {v}"))
            .unwrap_or_default();
        format!(
            "{}/data/{}{version}",
            self.cfg.mount.trim_matches('/'),
            self.cfg.kv_path()
        )
    }

    /// Maps a client error at `step` (`login`, `renew`, `read`) to a problem.
    fn classify(&self, step: &str, e: &ClientError) -> Problem {
        match e {
            ClientError::APIError { code, errors } => {
                let said = if errors.is_empty() {
                    String::new()
                } else {
                    format!(": {}", errors.join("; "))
                };
                let reason = match (step, *code) {
                    (_, 503) | (_, 502) | (_, 500) => Reason::VaultUnreachable,
                    ("login", _) => Reason::VaultLoginFailed,
                    (_, 403) => Reason::VaultPermissionDenied,
                    ("read", 404) => Reason::VaultPathNotFound,
                    _ => Reason::VaultPermissionDenied,
                };
                let what = match reason {
                    Reason::VaultPathNotFound => format!("no secret at {}", self.where_()),
                    Reason::VaultPermissionDenied => {
                        format!("Vault denied reading {}", self.where_())
                    }
                    Reason::VaultLoginFailed => format!(
                        "Vault refused the {} login{}",
                        self.cfg.auth.method(),
                        self.cfg
                            .role
                            .as_ref()
                            .map(|r| format!(" as role {r}"))
                            .unwrap_or_default()
                    ),
                    _ => format!("Vault answered {code} to the {step}"),
                };
                self.problem(reason, format!("{what} (HTTP {code}{said})"))
            }
            ClientError::ResponseEmptyError | ClientError::ResponseDataEmptyError
                if step == "read" =>
            {
                self.problem(
                    Reason::VaultPathNotFound,
                    format!("no secret at {}", self.where_()),
                )
            }
            ClientError::FileReadError { path, .. } | ClientError::FileNotFoundError { path } => {
                self.problem(
                    Reason::VaultMisconfigured,
                    format!("cannot read the CA bundle {path}"),
                )
            }
            ClientError::RestClientError { source } => self.problem(
                Reason::VaultUnreachable,
                format!(
                    "cannot reach Vault at {} for the {step}: {}",
                    self.address.as_deref().unwrap_or("?"),
                    deepest_cause(source)
                ),
            ),
            other => self.problem(
                Reason::VaultUnreachable,
                format!("unexpected answer from Vault to the {step}: {other}"),
            ),
        }
    }

    fn client(&mut self) -> Result<&mut VaultClient, Problem> {
        if self.client.is_none() {
            let Some(address) = self.address.clone() else {
                return Err(Problem::new(
                    Reason::VaultMisconfigured,
                    "no Vault address: set credentials.vault.address (or VAULT_ADDR)",
                ));
            };
            // reqwest's rustls is built without a crypto provider: use ring, like the
            // upstream client. Already installed is fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let mut b = VaultClientSettingsBuilder::default();
            b.address(address.as_str())
                .token("")
                .verify(true)
                .identity(None)
                .timeout(Some(Duration::from_secs(10)))
                .ca_certs(
                    self.cfg
                        .ca_cert_path
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect(),
                );
            if let Some(ns) = &self.cfg.namespace {
                b.set_namespace(ns.clone());
            }
            let settings = b.build().map_err(|e| {
                Problem::new(
                    Reason::VaultMisconfigured,
                    format!("invalid Vault settings: {e}"),
                )
            })?;
            let client = VaultClient::new(settings).map_err(|e| self.classify("connect", &e))?;
            self.client = Some(client);
        }
        self.client
            .as_mut()
            .ok_or_else(|| Problem::new(Reason::VaultMisconfigured, "no Vault client".to_owned()))
    }

    fn read_file(&self, what: &str, path: &std::path::Path) -> Result<String, Problem> {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .map_err(|e| {
                Problem::new(
                    Reason::VaultMisconfigured,
                    format!("cannot read the {what} {}: {e}", path.display()),
                )
            })
    }

    async fn login(&mut self) -> Result<(), Problem> {
        self.token = None;
        let role = self.cfg.role.clone();
        let need_role = || {
            role.clone().ok_or_else(|| {
                Problem::new(
                    Reason::VaultMisconfigured,
                    "credentials.vault.role is required for Kubernetes and JWT auth",
                )
            })
        };
        let auth = self.cfg.auth.clone();
        let (material, mount) = match &auth {
            VaultAuth::Kubernetes(k) => (
                vec![
                    need_role()?,
                    self.read_file("service-account token", &k.token_path)?,
                ],
                k.mount.clone(),
            ),
            VaultAuth::Jwt(j) => (
                vec![need_role()?, self.read_file("JWT", &j.token_path)?],
                j.mount.clone(),
            ),
            VaultAuth::AppRole(a) => (
                vec![
                    self.read_file("AppRole role id", &a.role_id_path)?,
                    self.read_file("AppRole secret id", &a.secret_id_path)?,
                ],
                a.mount.clone(),
            ),
        };
        // The role (name) is not secret; the rest is.
        let skip = usize::from(!matches!(auth, VaultAuth::AppRole(_)));
        self.secrets = material.iter().skip(skip).cloned().collect();
        let client = self.client()?;
        client.set_token("");
        let result = match &auth {
            VaultAuth::Kubernetes(_) => {
                vaultrs::auth::kubernetes::login(&*client, &mount, &material[0], &material[1]).await
            }
            VaultAuth::Jwt(_) => {
                vaultrs::auth::oidc::login(
                    &*client,
                    &mount,
                    &material[1],
                    Some(material[0].clone()),
                )
                .await
            }
            VaultAuth::AppRole(_) => {
                vaultrs::auth::approle::login(&*client, &mount, &material[0], &material[1]).await
            }
        };
        let info = result.map_err(|e| self.classify("login", &e))?;
        if let Some(c) = self.client.as_mut() {
            c.set_token(&info.client_token);
        }
        self.secrets.push(info.client_token.clone());
        self.token = Some(Token {
            issued: Instant::now(),
            ttl: (info.lease_duration > 0).then(|| Duration::from_secs(info.lease_duration)),
            renewable: info.renewable,
        });
        tracing::info!(
            method = self.cfg.auth.method(),
            ttl_s = info.lease_duration,
            renewable = info.renewable,
            "logged in to Vault"
        );
        Ok(())
    }

    /// Logs in when there is no token, renews one due for renewal (logging in again when the
    /// renewal is refused or the token cannot be renewed).
    async fn ensure_token(&mut self) -> Result<(), Problem> {
        let due = match &self.token {
            None => return self.login().await,
            Some(t) => t.renew_at().is_some_and(|at| Instant::now() >= at),
        };
        if !due {
            return Ok(());
        }
        let renewable = self.token.as_ref().is_some_and(|t| t.renewable);
        if renewable {
            let client = self.client()?;
            match vaultrs::token::renew_self(&*client, None).await {
                Ok(info) => {
                    let ttl = Duration::from_secs(info.lease_duration);
                    let granted = self.token.as_ref().and_then(|t| t.ttl);
                    // A renewal capped by the token's max TTL comes back shorter: once it is
                    // below a third of what it was, log in afresh instead of renewing stubs.
                    if info.lease_duration > 0 && granted.is_none_or(|g| ttl * 3 >= g) {
                        self.token = Some(Token {
                            issued: Instant::now(),
                            ttl: Some(ttl),
                            renewable: info.renewable,
                        });
                        tracing::debug!(ttl_s = info.lease_duration, "Vault token renewed");
                        return Ok(());
                    }
                }
                Err(e) => {
                    let p = self.classify("renew", &e);
                    if p.reason == Reason::VaultUnreachable {
                        return Err(p);
                    }
                    tracing::info!(cause = %p.message, "Vault refused to renew the token; logging in again");
                }
            }
        }
        self.login().await
    }

    async fn read(&mut self) -> Result<ProviderKey, ClientError> {
        let mount = self.cfg.mount.trim_matches('/').to_owned();
        let path = self.cfg.kv_path().to_owned();
        let version = self.cfg.version;
        let Some(client) = self.client.as_ref() else {
            return Err(ClientError::InvalidLoginMethodError);
        };
        let data: HashMap<String, Value> = match version {
            Some(v) => vaultrs::kv2::read_version(client, &mount, &path, v).await?,
            None => vaultrs::kv2::read(client, &mount, &path).await?,
        };
        Ok(match data.get(&self.cfg.key) {
            Some(Value::String(s)) if !s.trim().is_empty() => ProviderKey::new(Some(s.clone())),
            _ => ProviderKey::new(None),
        })
    }

    /// One round: token, then the secret; the key goes into `holder`.
    pub async fn fetch(&mut self, holder: &KeyHolder) -> Result<Fetched, Problem> {
        let fresh_login = self.token.is_none();
        self.ensure_token().await?;
        let mut result = self.read().await;
        if !fresh_login && matches!(result, Err(ClientError::APIError { code: 403, .. })) {
            // The token may have been revoked or expired early (a restarted dev server, an
            // operator's revoke): a fresh login decides whether it is the policy.
            self.login().await?;
            result = self.read().await;
        }
        let key = result.map_err(|e| self.classify("read", &e))?;
        if key.is_none() {
            return Err(self.problem(
                Reason::VaultKeyMissing,
                format!(
                    "the secret at {} has no non-empty string field {:?}",
                    self.where_(),
                    self.cfg.key
                ),
            ));
        }
        Ok(if holder.set(key) {
            Fetched::Rotated
        } else {
            Fetched::Read
        })
    }

    /// Revokes the token (at stop): its leases go with it.
    pub async fn revoke(&mut self) {
        if self.token.take().is_none() {
            return;
        }
        let Some(client) = self.client.as_ref() else {
            return;
        };
        match vaultrs::token::revoke_self(client).await {
            Ok(()) => tracing::info!("Vault token revoked"),
            Err(e) => {
                let p = self.classify("revoke", &e);
                tracing::warn!(reason = p.reason.as_str(), cause = %p.message, "revoking the Vault token failed; it expires with its TTL");
            }
        }
    }
}

/// The innermost cause of a connection failure (such as "Connection refused"), without the
/// request.
fn deepest_cause(e: &dyn std::error::Error) -> String {
    let mut cause = String::new();
    let mut source: Option<&dyn std::error::Error> = e.source();
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if cause.is_empty() {
        e.to_string()
    } else {
        cause
    }
}

/// Records one fetch's outcome in `holder`, the log and the metrics.
pub fn record(
    holder: &KeyHolder,
    metrics: &Metrics,
    before: &Option<Problem>,
    result: &Result<Fetched, Problem>,
) {
    let ready_before = holder.readiness().ready;
    match result {
        Ok(f) => {
            metrics.credential_refresh(if *f == Fetched::Rotated {
                "rotated"
            } else {
                "ok"
            });
            if *f == Fetched::Rotated {
                tracing::info!("the provider key changed in Vault; new requests use the new key");
            }
            if let Some(p) = before
                && holder.readiness().problem.is_none()
            {
                tracing::info!(
                    was = p.reason.as_str(),
                    "the provider key is available again"
                );
            }
        }
        Err(p) => {
            metrics.credential_refresh(p.reason.as_str());
            holder.failed(p.clone());
            if before.as_ref() != Some(p) {
                tracing::warn!(reason = p.reason.as_str(), cause = %p.message, "reading the provider key from Vault failed");
            }
        }
    }
    let ready = holder.readiness().ready;
    if ready != ready_before {
        metrics.credentials_ready(ready);
    }
}

/// Keeps `holder` current until `stop`, then revokes the token.
pub async fn run(
    mut source: VaultSource,
    state: Arc<AppState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let holder = &state.keys;
    loop {
        let before = holder.readiness().problem;
        let wait = match &before {
            Some(p) if p.reason != Reason::ProviderRejectedKey => source.retry(),
            _ => source.next_wake(),
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(wait) => {}
            _ = holder.woken() => {}
        }
        let result = source.fetch(holder).await;
        record(holder, &state.metrics, &before, &result);
    }
    source.revoke().await;
}
