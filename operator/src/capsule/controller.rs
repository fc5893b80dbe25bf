//! Wires the Capsule reconcile into kube-runtime's `Controller`. Only a new generation (the
//! spec, e.g. `revoked`) of a Capsule triggers a reconcile, so the controller's own status
//! writes do not wake it; a change to a ConfigMap a Capsule references (its content and
//! `<key>.sig`, or its public key) reconciles that Capsule, so a swapped signature or a
//! rotated key is seen at once; a policy reload reconciles every Capsule.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::runtime::controller::{self, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, watcher};
use soma_crds::Capsule;
use tracing::{debug, warn};

use super::reconcile::{error_policy, reconcile};
use crate::context::{Context, api};

/// Whether `capsule` reads ConfigMap `name` (of its own namespace): its content
/// (`spec.source.configMapRef`, with the `<key>.sig` beside it) or its public key.
pub fn reads_config_map(capsule: &Capsule, name: &str) -> bool {
    let spec = &capsule.spec;
    spec.source
        .config_map_ref
        .as_ref()
        .is_some_and(|c| c.name == name)
        || spec
            .signature
            .public_key_ref
            .as_ref()
            .is_some_and(|k| k.name == name)
}

/// The Capsules in `store` that read `config_map`.
fn readers(store: &Store<Capsule>, config_map: &ConfigMap) -> Vec<ObjectRef<Capsule>> {
    let (namespace, name) = (config_map.namespace(), config_map.name_any());
    store
        .state()
        .into_iter()
        .filter(|c| c.namespace() == namespace && reads_config_map(c, &name))
        .map(|c| ObjectRef::from_obj(&*c))
        .collect()
}

/// Runs the Capsule controller for one namespace (or all, with `None`) until `shutdown`.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    policy_reloads: tokio::sync::watch::Receiver<u64>,
) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let (capsules, writer) = reflector::store();
    let trigger = reflector(
        writer,
        watcher(
            api::<Capsule>(&client, ns),
            watcher::Config::default().any_semantic(),
        ),
    )
    .default_backoff()
    .inspect({
        // A deleted Capsule is held back by nothing (no reconcile runs for it).
        let metrics = ctx.metrics.clone();
        move |event| {
            if let Ok(watcher::Event::Delete(c)) = event {
                metrics.signature_state(
                    super::reconcile::CONTROLLER,
                    &c.namespace().unwrap_or_default(),
                    &c.name_any(),
                    None,
                );
            }
        }
    })
    .applied_objects()
    .predicate_filter(predicates::generation, PredicateConfig::default());
    let by_config_map = capsules.clone();
    Controller::for_stream(trigger, capsules)
        .with_config(controller::Config::default().concurrency(4))
        // ConfigMaps are not labelled for Soma, so all of them are watched; only those a
        // Capsule reads trigger anything.
        .watches(
            api::<ConfigMap>(&client, ns),
            watcher::Config::default().any_semantic(),
            move |config_map| readers(&by_config_map, &config_map),
        )
        .reconcile_all_on(futures::stream::unfold(
            policy_reloads,
            |mut rx| async move { rx.changed().await.ok().map(|()| ((), rx)) },
        ))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(capsule = %object, "reconciled"),
                Err(controller::Error::ReconcilerFailed(e, object)) => {
                    debug!(capsule = %object, error = %e, "reconcile failed")
                }
                Err(e) => warn!(error = %e, "capsule controller error"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capsule(source: serde_json::Value) -> Capsule {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "soma.dev/v1alpha1", "kind": "Capsule",
            "metadata": {"name": "kb", "namespace": "team"},
            "spec": {"version": "1", "policyHash": "sha256:00", "source": source,
                     "signature": {"publicKeyRef": {"name": "signers", "key": "cosign.pub"}}}
        }))
        .expect("capsule")
    }

    #[test]
    fn a_capsule_reads_its_content_and_key_config_maps_only() {
        let cm = capsule(
            serde_json::json!({"configMapRef": {"name": "kb-content", "key": "kb.json", "digest": "sha256:00"}}),
        );
        assert!(reads_config_map(&cm, "kb-content"));
        assert!(reads_config_map(&cm, "signers"));
        assert!(!reads_config_map(&cm, "kb-sidecar"));
        let oci =
            capsule(serde_json::json!({"oci": {"repository": "r/kb", "digest": "sha256:00"}}));
        assert!(reads_config_map(&oci, "signers"));
        assert!(!reads_config_map(&oci, "kb-content"));
    }

    #[test]
    fn readers_are_capsules_of_the_config_maps_namespace() {
        let (store, mut writer) = reflector::store::<Capsule>();
        let here =
            capsule(serde_json::json!({"oci": {"repository": "r/kb", "digest": "sha256:00"}}));
        let mut elsewhere = here.clone();
        elsewhere.metadata.namespace = Some("other".into());
        elsewhere.metadata.name = Some("kb2".into());
        writer.apply_watcher_event(&watcher::Event::Apply(here));
        writer.apply_watcher_event(&watcher::Event::Apply(elsewhere));
        let cm = |ns: &str, name: &str| ConfigMap {
            metadata: kube::api::ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let found = readers(&store, &cm("team", "signers"));
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].name.as_str(), found[0].namespace.as_deref()),
            ("kb", Some("team"))
        );
        assert!(readers(&store, &cm("team", "unrelated")).is_empty());
    }
}
