//! Loads policies and reloads them when a policy ConfigMap changes. A document that does not
//! parse or a template that does not compile never takes the webhook down: the store keeps
//! the last good version of it, the error is counted (`soma_policy_load_errors_total`) and
//! published as a Warning Event on the ConfigMap that holds it (once per ConfigMap version).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use soma_policy::{LoadReport, PolicyStore};
use tokio::sync::watch;
use tracing::{info, warn};

use super::PolicyOptions;
use super::sources::{errors_by_config_map, sources};

/// The policy store with what writes to it, shared by the loader, the inventory feeder, the
/// webhook and the reconcilers.
#[derive(Debug)]
pub struct Policies {
    /// The store evaluated by the webhook and at reconcile time.
    pub store: Arc<PolicyStore>,
    /// The webhook's metrics (load errors, constraints served are recorded there).
    pub metrics: Arc<soma_admission::Metrics>,
    /// Serialises `load` and `set_inventory`: each replaces the whole set, so two at once
    /// could lose one of them.
    writes: Mutex<()>,
    /// Counts reloads; reconcilers re-check every object when it moves.
    reloads: watch::Sender<u64>,
}

impl Policies {
    /// Policies over `store`, with metrics recorded into `metrics`.
    pub fn new(store: Arc<PolicyStore>, metrics: Arc<soma_admission::Metrics>) -> Arc<Self> {
        Arc::new(Self {
            store,
            metrics,
            writes: Mutex::default(),
            reloads: watch::channel(0).0,
        })
    }

    /// Loads `config_maps` (plus built-ins and the directory), records the outcome and
    /// announces the reload.
    pub fn load(&self, config_maps: &[ConfigMap], options: &PolicyOptions) -> LoadReport {
        let sources = sources(config_maps, options.dir.as_deref());
        let report = {
            let _guard = self
                .writes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.store.load(&sources)
        };
        self.metrics.record_load(&report);
        for (cm, errors) in errors_by_config_map(&sources, &report.errors) {
            for e in errors {
                warn!(configmap = cm.as_deref().unwrap_or("-"), reason = e.label(), error = %e, "policy not loaded; the last good version (if any) is kept");
            }
        }
        info!(
            templates = report.templates.len(),
            constraints = report.constraints.len(),
            errors = report.errors.len(),
            "policies loaded"
        );
        self.reloads.send_modify(|n| *n += 1);
        report
    }

    /// Replaces the inventory the policies see.
    pub fn set_inventory(
        &self,
        inventory: serde_json::Value,
    ) -> Result<(), soma_policy::PolicyError> {
        let _guard = self
            .writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.store.set_inventory(inventory)
    }

    /// Receives the reload count (starts at the current value; `changed()` fires on reloads).
    pub fn reloads(&self) -> watch::Receiver<u64> {
        self.reloads.subscribe()
    }
}

/// Watches the policy ConfigMaps in `options.namespace` and reloads on every change, until
/// `shutdown`. The first reload happens once the initial list is complete.
pub async fn run(
    client: Client,
    policies: Arc<Policies>,
    recorder: Recorder,
    options: PolicyOptions,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &options.namespace);
    let config = watcher::Config::default().labels(&options.configmap_selector);
    let (reader, writer) = reflector::store();
    let events = reflector(writer, watcher(api, config)).default_backoff();
    tokio::pin!(events);
    tokio::pin!(shutdown);
    // Warning Events already published, by ConfigMap and its resourceVersion.
    let mut published: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let event = tokio::select! {
            () = &mut shutdown => return,
            e = events.next() => e,
        };
        match event {
            None => return,
            Some(Err(e)) => warn!(error = %e, "watching policy ConfigMaps failed; retrying"),
            Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
            Some(Ok(_)) => {
                let maps: Vec<ConfigMap> = reader.state().iter().map(|c| (**c).clone()).collect();
                let p = policies.clone();
                let opts = options.clone();
                let loaded = tokio::task::spawn_blocking(move || {
                    let report = p.load(&maps, &opts);
                    (maps, report)
                })
                .await;
                let Ok((maps, report)) = loaded else {
                    warn!("policy load panicked; the previous set is kept");
                    continue;
                };
                publish_events(&recorder, &maps, &report, &options, &mut published).await;
            }
        }
    }
}

/// One Warning Event per broken ConfigMap version, reason = the first error's label.
async fn publish_events(
    recorder: &Recorder,
    maps: &[ConfigMap],
    report: &LoadReport,
    options: &PolicyOptions,
    published: &mut BTreeMap<String, String>,
) {
    let sources = sources(maps, options.dir.as_deref());
    for (name, errors) in errors_by_config_map(&sources, &report.errors) {
        let (Some(name), Some(first)) = (name, errors.first()) else {
            continue;
        };
        let Some(cm) = maps.iter().find(|c| c.name_any() == name) else {
            continue;
        };
        let version = cm.resource_version().unwrap_or_default();
        if published.get(&name) == Some(&version) {
            continue;
        }
        let note: String = errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ")
            .chars()
            .take(1000)
            .collect();
        let event = Event {
            type_: EventType::Warning,
            reason: first.label().to_owned(),
            note: Some(format!("{note} (the last good version is still enforced)")),
            action: "LoadPolicy".to_owned(),
            secondary: None,
        };
        match recorder.publish(&event, &cm.object_ref(&())).await {
            Ok(()) => {
                published.insert(name, version);
            }
            Err(e) => warn!(error = %e, "publishing a policy Event failed"),
        }
    }
}
