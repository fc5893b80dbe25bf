//! The operator's side of the usage ledger (`--ledger-url`): the connection (migrated once,
//! lazily, so the operator starts while PostgreSQL is down), the seal key, and the stream of
//! Budgets the sidecars just charged (`NOTIFY soma_usage`), which drives Budget status
//! refreshes at a bounded rate instead of polling.
//!
//! ```text
//!  sidecar delivery ─NOTIFY soma_usage 'ns/team@uid,…'─► listen ─► dirty set ─every refresh interval─► reconcile those Budgets
//! ```

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, PostParams};
use soma_ledger::audit::SealKey;
use soma_metering::{BudgetKey, BudgetRef};
use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::{Mutex, mpsc};
use tracing::{info, warn};

/// The key in the seal key Secret.
pub const SEAL_KEY: &str = "seal-key";
/// The key in the public ConfigMap an auditor reads.
pub const SEAL_PUBLIC_KEY: &str = "public-key";

/// The ledger connection.
#[derive(Debug)]
pub struct Ledger {
    pool: PgPool,
    migrated: tokio::sync::OnceCell<()>,
    /// The operator's seal key, once loaded.
    pub seal: Mutex<Option<SealKey>>,
}

impl Ledger {
    /// A lazy connection to `url` (no network until first use).
    pub fn new(url: &str) -> Result<Ledger, sqlx::Error> {
        Ok(Ledger {
            pool: soma_ledger::pool(url, 4, Duration::from_secs(5))?,
            migrated: tokio::sync::OnceCell::new(),
            seal: Mutex::new(None),
        })
    }

    /// The pool, after the migrations have run once.
    pub async fn pool(&self) -> Result<&PgPool, String> {
        self.migrated
            .get_or_try_init(|| async {
                soma_ledger::MIGRATOR
                    .run(&self.pool)
                    .await
                    .map_err(|e| format!("ledger migrations failed: {e}"))
            })
            .await?;
        Ok(&self.pool)
    }
}

/// Loads the seal key from Secret `name` in `namespace`, creating the Secret (with a new key)
/// when it does not exist, and publishes the public key in a ConfigMap of the same name for
/// auditors (`soma audit verify --seal-public-key`).
pub async fn load_seal_key(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<SealKey, String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let existing = secrets
        .get_opt(name)
        .await
        .map_err(|e| format!("reading Secret {namespace}/{name}: {e}"))?;
    let key = match existing {
        Some(s) => read_seal(&s).ok_or_else(|| {
            format!("Secret {namespace}/{name} has no valid {SEAL_KEY:?} (base64 of a 32-byte Ed25519 seed)")
        })?,
        None => {
            let key = SealKey::generate().map_err(|e| e.to_string())?;
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    labels: Some(
                        [("app.kubernetes.io/managed-by".to_owned(), "soma-operator".to_owned())]
                            .into(),
                    ),
                    ..ObjectMeta::default()
                },
                data: Some([(SEAL_KEY.to_owned(), ByteString(key.seed().into_bytes()))].into()),
                ..Secret::default()
            };
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    info!(secret = %format!("{namespace}/{name}"), key_id = %key.key_id(), "created the ledger seal key");
                    key
                }
                // Another replica was first: use its key.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let s = secrets
                        .get(name)
                        .await
                        .map_err(|e| format!("reading Secret {namespace}/{name}: {e}"))?;
                    read_seal(&s).ok_or_else(|| format!("Secret {namespace}/{name} is not a seal key"))?
                }
                Err(e) => return Err(format!("creating Secret {namespace}/{name}: {e}")),
            }
        }
    };
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let public = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "soma-operator".to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        data: Some(
            [
                (SEAL_PUBLIC_KEY.to_owned(), key.public()),
                ("key-id".to_owned(), key.key_id()),
            ]
            .into(),
        ),
        ..ConfigMap::default()
    };
    let params = kube::api::PatchParams::apply("soma.dev/budget").force();
    if let Err(e) = maps
        .patch(name, &params, &kube::api::Patch::Apply(&public))
        .await
    {
        warn!(error = %e, "publishing the seal public key failed; auditors can read it from the ledger's ledger_seal_keys table");
    }
    Ok(key)
}

fn read_seal(s: &Secret) -> Option<SealKey> {
    let bytes = s.data.as_ref()?.get(SEAL_KEY)?;
    SealKey::from_seed(std::str::from_utf8(&bytes.0).ok()?).ok()
}

/// Budgets charged since the last flush, collected from `NOTIFY soma_usage`.
#[derive(Debug, Default)]
pub struct Charged {
    keys: std::sync::Mutex<BTreeSet<BudgetKey>>,
    /// Set when a notification could not be read (cut payload, reconnect): refresh all.
    all: std::sync::atomic::AtomicBool,
}

impl Charged {
    /// Takes what was collected: the keys, or `None` for "every Budget".
    pub fn take(&self) -> Option<Vec<BudgetKey>> {
        if self.all.swap(false, std::sync::atomic::Ordering::Relaxed) {
            self.keys
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
            return None;
        }
        Some(
            std::mem::take(
                &mut *self
                    .keys
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            )
            .into_iter()
            .collect(),
        )
    }

    fn note(&self, payload: &str) {
        match BudgetRef::parse_chain(payload) {
            Ok(refs) => self
                .keys
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend(refs.into_iter().map(|r| r.key)),
            Err(_) => self.all.store(true, std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// Listens to `soma_usage` and sends the charged Budgets, at most once per `every`, to `tx`
/// (`None`: every Budget). Reconnects with backoff; a reconnect refreshes everything, since
/// notifications sent meanwhile are lost.
pub async fn follow_usage(
    ledger: Arc<Ledger>,
    every: Duration,
    tx: mpsc::Sender<Option<Vec<BudgetKey>>>,
) {
    let charged = Arc::new(Charged::default());
    let flush = {
        let charged = charged.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match charged.take() {
                    Some(keys) if keys.is_empty() => {}
                    batch => {
                        if tx.send(batch).await.is_err() {
                            return;
                        }
                    }
                }
            }
        })
    };
    let mut wait = Duration::from_millis(500);
    loop {
        if tx.is_closed() {
            break;
        }
        let listener = async {
            let pool = ledger.pool().await.map_err(sqlx::Error::Protocol)?;
            let mut l = PgListener::connect_with(pool).await?;
            l.listen(soma_ledger::deliver::USAGE_CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        }
        .await;
        match listener {
            Ok(mut l) => {
                wait = Duration::from_millis(500);
                charged
                    .all
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                loop {
                    match l.try_recv().await {
                        Ok(Some(n)) => charged.note(n.payload()),
                        Ok(None) => break,
                        Err(e) => {
                            warn!(error = %e, "ledger usage listener lost; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot listen to the ledger's usage notifications; retrying")
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(30));
    }
    flush.abort();
}
