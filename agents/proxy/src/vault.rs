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
use soma_contract::{VaultAuth, VaultCredentials, VaultDatabase};
use vaultrs::client::{Client, VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use crate::keys::{KeyHolder, Problem, Reason};
use crate::ledger_access::LedgerAccess;
use crate::metrics::Metrics;
use crate::state::AppState;
use crate::upstream::ProviderKey;

/// The step that reads the ledger's credentials, for [`VaultSource::classify`].
const DATABASE_STEP: &str = "database credentials";

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
    /// Dynamic ledger credentials (`ledgerCredentials.vault`), when configured.
    database: Option<Database>,
}

/// The ledger's user from the database secrets engine, and where it goes.
struct Database {
    cfg: VaultDatabase,
    access: Arc<LedgerAccess>,
    lease: Option<Lease>,
    /// After a failed round: not again before this.
    retry_at: Option<Instant>,
}

impl Database {
    /// When the next round is due: the lease's renewal point (`now` without a lease), but not
    /// before a failed round's retry time. One `now` for the caller's comparison too: a
    /// second clock read here would always be later, so a sidecar without a lease would never
    /// be due again.
    fn due_at(&self, now: Instant) -> Instant {
        let at = self.lease.as_ref().map_or(now, Lease::renew_at);
        self.retry_at.map_or(at, |r| r.max(at))
    }
}

/// A lease on dynamic credentials. The lease id is a secret (it can revoke or renew them).
struct Lease {
    id: String,
    issued: Instant,
    ttl: Duration,
    renewable: bool,
    /// The granted TTL when it was first issued: a renewal much shorter than it is a lease
    /// near its max TTL.
    first_ttl: Duration,
}

impl Lease {
    fn renew_at(&self) -> Instant {
        self.issued + self.ttl * 2 / 3
    }
}

/// What one round of the ledger credentials did.
#[derive(Debug, PartialEq, Eq)]
pub enum DatabaseRound {
    /// Nothing was due.
    Current,
    /// The lease was renewed.
    Renewed {
        /// The TTL granted.
        ttl_s: u64,
    },
    /// New credentials were read and every pool now uses them (the first, or a replacement).
    Issued {
        /// The user Vault created (not secret: it appears in `pg_roles`).
        username: String,
        /// The lease's TTL.
        ttl_s: u64,
        /// Why: `first`, `renewal refused`, `max TTL reached`, `not renewable`.
        why: &'static str,
    },
    /// Vault did not hand out or renew credentials; the ledger keeps its current ones (the
    /// outbox holds usage until delivery works again).
    Failed(Problem),
}

/// `GET <mount>/creds/<role>`, read with its lease (vaultrs' own endpoint drops it).
struct CredsRequest {
    path: String,
}

#[derive(serde::Deserialize)]
struct LeasedCreds {
    lease_id: String,
    lease_duration: u64,
    renewable: bool,
    data: Option<DbCreds>,
}

#[derive(serde::Deserialize)]
struct DbCreds {
    username: String,
    password: String,
}

impl rustify::Endpoint for CredsRequest {
    type Response = LeasedCreds;
    const REQUEST_BODY_TYPE: rustify::enums::RequestType = rustify::enums::RequestType::JSON;
    const RESPONSE_BODY_TYPE: rustify::enums::ResponseType = rustify::enums::ResponseType::JSON;
    fn path(&self) -> String {
        self.path.clone()
    }
    fn method(&self) -> rustify::enums::RequestMethod {
        rustify::enums::RequestMethod::GET
    }
}

/// `PUT sys/leases/renew` or `sys/leases/revoke` for one lease.
struct LeaseRequest {
    path: &'static str,
    body: Vec<u8>,
}

#[derive(serde::Deserialize)]
struct RenewedLease {
    lease_duration: u64,
    renewable: bool,
}

impl rustify::Endpoint for LeaseRequest {
    type Response = RenewedLease;
    const REQUEST_BODY_TYPE: rustify::enums::RequestType = rustify::enums::RequestType::JSON;
    const RESPONSE_BODY_TYPE: rustify::enums::ResponseType = rustify::enums::ResponseType::JSON;
    fn path(&self) -> String {
        self.path.to_owned()
    }
    fn method(&self) -> rustify::enums::RequestMethod {
        rustify::enums::RequestMethod::PUT
    }
    fn body(&self) -> Result<Option<Vec<u8>>, rustify::errors::ClientError> {
        Ok(Some(self.body.clone()))
    }
}

fn lease_request(path: &'static str, lease_id: &str) -> LeaseRequest {
    LeaseRequest {
        path,
        body: serde_json::json!({ "lease_id": lease_id })
            .to_string()
            .into_bytes(),
    }
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
            database: None,
        }
    }

    /// Also keeps the ledger's credentials from the database secrets engine (`cfg`) current
    /// in `access`.
    pub fn with_database(mut self, cfg: VaultDatabase, access: Arc<LedgerAccess>) -> VaultSource {
        self.database = Some(Database {
            cfg,
            access,
            lease: None,
            retry_at: None,
        });
        self
    }

    /// Whether it keeps ledger credentials.
    pub fn wants_database(&self) -> bool {
        self.database.is_some()
    }

    /// Whether the ledger credentials are due: none yet, or their lease at two thirds.
    pub fn database_due(&self) -> bool {
        let now = Instant::now();
        self.database.as_ref().is_some_and(|d| now >= d.due_at(now))
    }

    fn creds_path(&self) -> String {
        self.database
            .as_ref()
            .map(|d| {
                format!(
                    "{}/creds/{}",
                    d.cfg.mount.trim_matches('/'),
                    d.cfg.role.trim_matches('/')
                )
            })
            .unwrap_or_default()
    }

    /// Reads new ledger credentials and hands them to every pool.
    async fn issue_database(&mut self, why: &'static str) -> DatabaseRound {
        if let Err(p) = self.ensure_token().await {
            return DatabaseRound::Failed(p);
        }
        let path = self.creds_path();
        let Some(client) = self.client.as_ref() else {
            return DatabaseRound::Failed(Problem::new(
                Reason::VaultMisconfigured,
                "no Vault client",
            ));
        };
        let answer =
            vaultrs::api::exec_with_no_result(client, CredsRequest { path: path.clone() }).await;
        let leased = match answer {
            Ok(l) => l,
            Err(e) => {
                // A parse failure's text could hold the body (the password): only the
                // status reaches the problem.
                let p = match &e {
                    ClientError::APIError { .. } | ClientError::RestClientError { .. } => {
                        self.classify(DATABASE_STEP, &e)
                    }
                    _ => Problem::new(
                        Reason::VaultUnreachable,
                        format!("unexpected answer from Vault to reading {path}"),
                    ),
                };
                return DatabaseRound::Failed(Problem::new(
                    p.reason,
                    format!("ledger credentials from {path}: {}", p.message),
                ));
            }
        };
        let Some(creds) = leased.data else {
            return DatabaseRound::Failed(Problem::new(
                Reason::VaultPathNotFound,
                format!("Vault returned no credentials at {path}"),
            ));
        };
        let ttl = Duration::from_secs(leased.lease_duration.max(1));
        self.secrets.push(creds.password.clone());
        self.secrets.push(leased.lease_id.clone());
        let Some(db) = self.database.as_mut() else {
            return DatabaseRound::Current;
        };
        db.access
            .set_credentials(&creds.username, &creds.password, ttl);
        let old = db.lease.replace(Lease {
            id: leased.lease_id,
            issued: Instant::now(),
            ttl,
            renewable: leased.renewable,
            first_ttl: ttl,
        });
        // The replaced user is revoked now rather than left to its TTL: the pools no longer
        // open connections with it.
        if let Some(old) = old {
            self.revoke_lease(&old).await;
        }
        DatabaseRound::Issued {
            username: creds.username,
            ttl_s: ttl.as_secs(),
            why,
        }
    }

    async fn revoke_lease(&self, lease: &Lease) {
        let Some(client) = self.client.as_ref() else {
            return;
        };
        let req = lease_request("sys/leases/revoke", &lease.id);
        match vaultrs::api::exec_with_empty(client, req).await {
            Ok(()) => tracing::info!("ledger credentials lease revoked"),
            Err(e) => {
                let p = self.classify("lease revoke", &e);
                tracing::warn!(reason = p.reason.as_str(), cause = %p.message, "revoking the ledger credentials lease failed; it expires with its TTL");
            }
        }
    }

    /// One round of the ledger credentials: issue the first ones, renew the lease at two
    /// thirds of its TTL, or replace them when the renewal is refused or capped.
    pub async fn database_round(&mut self) -> DatabaseRound {
        let round = self.database_step().await;
        let retry = self.retry();
        if let Some(d) = self.database.as_mut() {
            d.retry_at = matches!(round, DatabaseRound::Failed(_)).then(|| Instant::now() + retry);
            if let DatabaseRound::Failed(p) = &round {
                d.access.failed(p.clone());
            }
        }
        round
    }

    async fn database_step(&mut self) -> DatabaseRound {
        let Some(db) = self.database.as_ref() else {
            return DatabaseRound::Current;
        };
        let Some(lease) = db.lease.as_ref() else {
            return self.issue_database("first").await;
        };
        if Instant::now() < lease.renew_at() {
            return DatabaseRound::Current;
        }
        if !lease.renewable {
            return self.issue_database("not renewable").await;
        }
        let (id, first_ttl) = (lease.id.clone(), lease.first_ttl);
        if let Err(p) = self.ensure_token().await {
            return DatabaseRound::Failed(p);
        }
        let Some(client) = self.client.as_ref() else {
            return DatabaseRound::Failed(Problem::new(
                Reason::VaultMisconfigured,
                "no Vault client",
            ));
        };
        match vaultrs::api::exec_with_no_result(client, lease_request("sys/leases/renew", &id))
            .await
        {
            Ok(r)
                if r.lease_duration > 0
                    && Duration::from_secs(r.lease_duration) * 3 >= first_ttl =>
            {
                if let Some(d) = self.database.as_mut() {
                    d.access.renewed(Duration::from_secs(r.lease_duration));
                    if let Some(l) = d.lease.as_mut() {
                        l.issued = Instant::now();
                        l.ttl = Duration::from_secs(r.lease_duration);
                        l.renewable = r.renewable;
                    }
                }
                DatabaseRound::Renewed {
                    ttl_s: r.lease_duration,
                }
            }
            Ok(_) => self.issue_database("max TTL reached").await,
            Err(e) => {
                let p = self.classify("lease renewal", &e);
                if p.reason == Reason::VaultUnreachable {
                    return DatabaseRound::Failed(p);
                }
                self.issue_database("renewal refused").await
            }
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
        let now = Instant::now();
        let lease = self.database.as_ref().map(|d| d.due_at(now));
        [self.token.as_ref().and_then(Token::renew_at), lease]
            .into_iter()
            .flatten()
            .map(|at| at.saturating_duration_since(now))
            .fold(refresh, Duration::min)
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
                    // The database engine answers 400 for a role it does not have; 404 is
                    // no engine at the mount.
                    (DATABASE_STEP, 400 | 404) => Reason::VaultPathNotFound,
                    _ => Reason::VaultPermissionDenied,
                };
                let what = match reason {
                    Reason::VaultPathNotFound if step == DATABASE_STEP => {
                        "no such role of a database secrets engine at that mount".to_owned()
                    }
                    Reason::VaultPermissionDenied if step == DATABASE_STEP => {
                        "Vault denied reading them".to_owned()
                    }
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

    /// Revokes the ledger credentials' lease, then the token (at stop).
    pub async fn revoke(&mut self) {
        if let Some(lease) = self.database.as_mut().and_then(|d| d.lease.take()) {
            self.revoke_lease(&lease).await;
        }
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

/// Logs and counts one round of the ledger credentials (never the password or the lease id).
pub fn record_database(round: &DatabaseRound, metrics: &Metrics) {
    match round {
        DatabaseRound::Current => {}
        DatabaseRound::Renewed { ttl_s } => {
            metrics.ledger_credential_refresh("renewed");
            tracing::debug!(ttl_s, "ledger credentials lease renewed")
        }
        DatabaseRound::Issued {
            username,
            ttl_s,
            why,
        } => {
            metrics.ledger_credential_refresh("issued");
            tracing::info!(%username, ttl_s, why, "ledger credentials from Vault in use")
        }
        DatabaseRound::Failed(p) => {
            let reason = crate::ledger_access::ledger_reason(p.reason);
            metrics.ledger_credential_refresh(reason);
            tracing::warn!(reason, cause = %p.message, "ledger credentials from Vault could not be renewed or read; usage waits in the outbox")
        }
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
        if source.database_due() {
            record_database(&source.database_round().await, &state.metrics);
        }
    }
    source.revoke().await;
}
