//! State shared by every reconcile: the client, the operator's configuration, metrics, the
//! Event recorder, and per-object retry counts for backoff.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kube::Client;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};

use crate::agent::image::{ImageCache, ImageVerifier, Unconfigured};
use crate::capsule::verify::{Cache, CapsuleVerifier, Unavailable};
use crate::config::OperatorConfig;
use crate::metrics::Metrics;
use crate::policy::check::Checker;

/// The API of a namespaced kind in `namespace`, or in every namespace with `None`: what each
/// controller watches.
pub fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The operator's clock: the system's, or (tests of period boundaries) the system's moved by
/// the number of milliseconds in a file, read at every use.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// The system clock plus the offset (signed milliseconds) in this file.
    OffsetFile(std::path::PathBuf),
}

impl Clock {
    /// Now.
    pub fn now(&self) -> k8s_openapi::jiff::Timestamp {
        let now = k8s_openapi::jiff::Timestamp::now();
        match self {
            Clock::System => now,
            Clock::OffsetFile(path) => std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .and_then(|ms| {
                    now.checked_add(k8s_openapi::jiff::SignedDuration::from_millis(ms))
                        .ok()
                })
                .unwrap_or(now),
        }
    }
}

/// The scopes the operator may watch: every namespace (`None`), or each of `namespaces`.
pub fn scopes(namespaces: &[String]) -> Vec<Option<String>> {
    if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.iter().cloned().map(Some).collect()
    }
}

/// Every object of a namespaced kind in the namespaces the operator watches ([`scopes`]):
/// what the leader's periodic loops (scaling, credentials) go over each round. `what` names
/// the kind in the error.
pub async fn list_watched<K>(
    client: &Client,
    namespaces: &[String],
    what: &str,
) -> crate::error::Result<Vec<K>>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let mut all = Vec::new();
    for scope in scopes(namespaces) {
        let list = api::<K>(client, scope.as_deref())
            .list(&kube::api::ListParams::default())
            .await
            .map_err(|source| crate::error::Error::Read {
                what: what.to_owned(),
                source,
            })?;
        all.extend(list.items);
    }
    Ok(all)
}

/// Every Budget the operator may read, as one watch stream: one watch for all namespaces, or
/// one per watched namespace in a namespace-scoped install (which has no cluster-wide rights).
/// A Budget's parent may be in another watched namespace, so every controller sees them all.
pub fn budget_watch(
    client: &Client,
    namespaces: &[String],
) -> impl futures::Stream<
    Item = Result<kube::runtime::watcher::Event<soma_crds::Budget>, kube::runtime::watcher::Error>,
> + Send
+ 'static {
    use futures::StreamExt;
    futures::stream::select_all(scopes(namespaces).into_iter().map(|ns| {
        kube::runtime::watcher(
            api::<soma_crds::Budget>(client, ns.as_deref()),
            kube::runtime::watcher::Config::default(),
        )
        .boxed()
    }))
}

/// Shared reconcile state.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Operator configuration.
    pub config: OperatorConfig,
    /// Metrics.
    pub metrics: std::sync::Arc<Metrics>,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// The reconcile-time policy re-check (no policies unless [`Context::with_policy`]).
    pub policy: Checker,
    /// Verifies Capsule signatures ([`Unavailable`] unless [`Context::with_verifier`]).
    pub verifier: std::sync::Arc<dyn CapsuleVerifier>,
    /// Verification results by (digest, signer, policy hash).
    pub verified: Cache,
    /// Verifies agent images when signed images are required
    /// ([`Unconfigured`] unless [`Context::with_image_verifier`]).
    pub images: std::sync::Arc<dyn ImageVerifier>,
    /// Verified agent images by reference.
    pub verified_images: ImageCache,
    /// The usage ledger, when the operator has one (`--ledger-url`).
    pub ledger: Option<std::sync::Arc<crate::ledger::Ledger>>,
    /// The clock reconciles compare periods with.
    pub clock: Clock,
    /// Which Budgets each chain passed through, and the Budget refresh bus.
    pub index: std::sync::Arc<crate::budget::index::ChainIndex>,
    /// What the Job reconciles share (caches, slot locks, chains).
    pub jobs: std::sync::Arc<crate::job::JobState>,
    /// Consecutive failures per object (`namespace/name`), for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context reporting Events as `soma-operator` (instance: the pod name, if known).
    pub fn new(client: Client, config: OperatorConfig, metrics: std::sync::Arc<Metrics>) -> Self {
        let reporter = Reporter {
            controller: "soma-operator".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            metrics,
            policy: Checker::default(),
            verifier: std::sync::Arc::new(Unavailable),
            verified: Cache::default(),
            images: std::sync::Arc::new(Unconfigured),
            verified_images: ImageCache::default(),
            ledger: None,
            clock: Clock::default(),
            index: std::sync::Arc::default(),
            jobs: std::sync::Arc::default(),
            failures: Mutex::default(),
        }
    }

    /// The same context, with the usage ledger.
    #[must_use]
    pub fn with_ledger(mut self, ledger: std::sync::Arc<crate::ledger::Ledger>) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// The same context, with `clock`.
    #[must_use]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The same context, re-checking objects against `policy`.
    #[must_use]
    pub fn with_policy(mut self, policy: Checker) -> Self {
        self.policy = policy;
        self
    }

    /// The same context, verifying Capsules with `verifier` (each answer counted in the
    /// metrics).
    #[must_use]
    pub fn with_verifier(mut self, verifier: std::sync::Arc<dyn CapsuleVerifier>) -> Self {
        self.verifier = std::sync::Arc::new(crate::capsule::verify::Measured::new(
            verifier,
            self.metrics.clone(),
        ));
        self
    }

    /// The same context, verifying agent images with `images` (each answer counted in the
    /// metrics).
    #[must_use]
    pub fn with_image_verifier(mut self, images: std::sync::Arc<dyn ImageVerifier>) -> Self {
        self.images = std::sync::Arc::new(crate::agent::image::Measured::new(
            images,
            self.metrics.clone(),
        ));
        self
    }

    /// Records a failure of `key` and returns how long to wait before retrying:
    /// 1 s, 2 s, 4 s, … capped at 5 minutes.
    pub fn backoff(&self, key: &str) -> Duration {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = failures.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        let secs = 1u64
            .checked_shl(n.saturating_sub(1))
            .unwrap_or(u64::MAX)
            .min(300);
        Duration::from_secs(secs)
    }

    /// Forgets the failures of `key` after a successful reconcile.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }
}
