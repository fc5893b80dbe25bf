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
    /// Whether the policy ConfigMaps have been listed once.
    synced: watch::Sender<bool>,
    /// Whether the inventory has been built once.
    inventory_synced: watch::Sender<bool>,
    /// Fingerprint of the sources last loaded: an event that changes no document (a relist,
    /// a label edit) neither reloads nor re-checks every object.
    last: Mutex<Option<String>>,
    /// The documents of each origin (ConfigMap key, file) that last parsed: an origin that no
    /// longer parses keeps serving these.
    last_good: Mutex<BTreeMap<String, Vec<serde_json::Value>>>,
}

impl Policies {
    /// Policies over `store`, with metrics recorded into `metrics`.
    pub fn new(store: Arc<PolicyStore>, metrics: Arc<soma_admission::Metrics>) -> Arc<Self> {
        Arc::new(Self {
            store,
            metrics,
            writes: Mutex::default(),
            reloads: watch::channel(0).0,
            synced: watch::channel(false).0,
            inventory_synced: watch::channel(false).0,
            last: Mutex::default(),
            last_good: Mutex::default(),
        })
    }

    /// Loads `config_maps` (plus built-ins and the directory), records the outcome and
    /// announces the reload. `None` when the documents are those of the last load.
    pub fn load(&self, config_maps: &[ConfigMap], options: &PolicyOptions) -> Option<LoadReport> {
        let mut sources = sources(config_maps, options.dir.as_deref());
        let fingerprint = serde_json::to_vec(&(&sources.documents, &sources.unreadable))
            .ok()
            .map(|bytes| crate::capsule::content::sha256(&bytes));
        {
            let mut last = self
                .last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if fingerprint.is_some() && *last == fingerprint {
                return None;
            }
            last.clone_from(&fingerprint);
        }
        self.keep_last_good(&mut sources);
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
        Some(report)
    }

    /// Remembers the documents of every origin that parsed, and puts back the last good
    /// documents of an origin that no longer parses (the error is still reported).
    fn keep_last_good(&self, sources: &mut soma_policy::Sources) {
        let mut last_good = self
            .last_good
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut now: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
        for (origin, doc) in &sources.documents {
            now.entry(origin.clone()).or_default().push(doc.clone());
        }
        for (origin, _) in &sources.unreadable {
            if let Some(docs) = last_good.get(origin) {
                warn!(%origin, "policy document does not parse; serving its last good version");
                sources
                    .documents
                    .extend(docs.iter().map(|d| (origin.clone(), d.clone())));
                now.insert(origin.clone(), docs.clone());
            }
        }
        *last_good = now;
    }

    /// Records that the policy ConfigMaps have been listed (and loaded) once.
    pub fn mark_synced(&self) {
        self.synced.send_replace(true);
    }

    /// Records that the inventory has been built once.
    pub fn mark_inventory_synced(&self) {
        self.inventory_synced.send_replace(true);
    }

    /// Resolves once the policy ConfigMaps have been listed and the inventory built, or after
    /// `limit` (returns whether both happened).
    pub async fn wait_synced(&self, limit: std::time::Duration) -> bool {
        let mut policies = self.synced.subscribe();
        let mut inventory = self.inventory_synced.subscribe();
        tokio::time::timeout(limit, async {
            let _ = policies.wait_for(|s| *s).await;
            let _ = inventory.wait_for(|s| *s).await;
        })
        .await
        .is_ok()
    }

    /// Receives whether the policy ConfigMaps have been listed once.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
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
                policies.mark_synced();
                match loaded {
                    Ok((maps, Some(report))) => {
                        publish_events(&recorder, &maps, &report, &options, &mut published).await;
                    }
                    Ok((_, None)) => {}
                    Err(_) => warn!("policy load panicked; the previous set is kept"),
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn cm(text: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("soma-system".into()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([("p.yaml".to_owned(), text.to_owned())])),
            ..ConfigMap::default()
        }
    }

    #[test]
    fn only_a_change_of_documents_reloads() {
        let p = Policies::new(
            Arc::new(PolicyStore::new()),
            Arc::new(soma_admission::Metrics::default()),
        );
        let reloads = p.reloads();
        let options = PolicyOptions::default();
        let strict = "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: SomaImages\nmetadata: {name: strict}\nspec: {parameters: {requireDigest: true}}\n";
        assert!(p.load(&[], &options).is_some());
        assert!(p.load(&[], &options).is_none(), "same documents");
        let report = p.load(&[cm(strict)], &options).expect("changed");
        assert!(report.constraints.contains(&"SomaImages/strict".to_owned()));
        assert!(p.load(&[cm(strict)], &options).is_none());
        // A broken document reloads (and is reported); its last good version keeps serving.
        let broken = p.load(&[cm("a: [unclosed")], &options).expect("changed");
        assert_eq!(broken.errors[0].label(), "InvalidPolicyDocument");
        assert!(broken.constraints.contains(&"SomaImages/strict".to_owned()));
        // Removing the ConfigMap removes its policies.
        let gone = p.load(&[], &options).expect("changed");
        assert!(!gone.constraints.contains(&"SomaImages/strict".to_owned()));
        assert_eq!(*reloads.borrow(), 4);
    }
}
