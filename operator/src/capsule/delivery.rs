//! Pure: how a verified Capsule reaches an agent pod. The pod gets one emptyDir for its
//! Capsules, filled before anything else starts by one init container per Capsule running
//! `soma capsule fetch` with the verified digest (the only content it accepts: every byte is
//! checked against the digest after download) into `visible/<name>/`. The agent container
//! mounts only `visible/`, read-only, at `/capsules`, so it reads `/capsules/<name>/` and can
//! never change it. The metering sidecar mounts the whole volume: on a revocation it moves
//! `visible/<name>` to `withheld/<name>` (one rename), which takes the folder out of the
//! agent's view, and back when the revocation is lifted (`soma-proxy`'s `withdraw`).
//!
//! ```text
//!  Capsule status.verifiedDigest ─► Delivery ─► init container capsule-<i>
//!                                                 soma capsule fetch --repository R --digest D
//!                                                 (or --file <ConfigMap key> --digest D)
//!                                                 └─► emptyDir capsules: visible/<name>/
//!      agent:   /capsules ◄── subPath visible (readOnly)
//!      sidecar: /var/lib/soma-capsules ◄── the whole volume (visible/, withheld/)
//! ```
//!
//! A ConfigMap's content is mounted into the init container only; the agent gets the copy
//! checked against the digest, so an edit to the ConfigMap after verification never reaches
//! a running pod (a pod started after the edit fails its init container until the Capsule is
//! fixed). Inline Capsules are never verified (no signature can cover them), hence never
//! delivered.

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, EmptyDirVolumeSource, KeyToPath, PodTemplateSpec, Volume,
    VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPeer,
};
use soma_crds::Capsule;

use crate::config::{OperatorConfig, resources};
use crate::workload::{
    AGENT_CONTAINER, SIDECAR_NAME, container_security, env, mount, tcp, upstream_port,
};

/// Where Capsules are mounted in the agent container: `/capsules/<name>/`.
pub const CAPSULES_DIR: &str = "/capsules";
/// The agent's variable naming [`CAPSULES_DIR`].
pub const CAPSULES_DIR_ENV: &str = "SOMA_CAPSULES_DIR";
/// Where a ConfigMap Capsule's key is mounted in its init container.
const SOURCE_DIR: &str = "/var/run/soma/capsule-source";
/// The pod's Capsule volume.
pub const VOLUME: &str = "capsules";
/// Where the whole Capsule volume is mounted in the init containers and the sidecar.
pub const VOLUME_DIR: &str = "/var/lib/soma-capsules";
/// The volume's folder the agent container sees (its `/capsules`).
pub const VISIBLE: &str = "visible";
/// The volume's folder a revoked Capsule is moved to (the sidecar's only).
pub const WITHHELD: &str = "withheld";

/// Where one Capsule's content comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// An OCI bundle in `registry/repository`.
    Oci {
        /// `registry/repository`.
        repository: String,
    },
    /// Key `key` of ConfigMap `name` in the workload's namespace.
    ConfigMap {
        /// The ConfigMap.
        name: String,
        /// The key.
        key: String,
    },
}

/// A verified Capsule to deliver into a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The Capsule's name (its folder under [`CAPSULES_DIR`]).
    pub name: String,
    /// The verified digest: the only content delivered.
    pub digest: String,
    /// The Capsule's `policyHash` (an OCI bundle's signed one must equal it).
    pub policy_hash: String,
    /// Where the content comes from.
    pub source: Source,
    /// The Qdrant collection holding its vectors (`spec.index: qdrant`): the sidecar searches
    /// it instead of building an index.
    pub collection: Option<String>,
}

/// The delivery of `capsule`, when it is verified and has content a pod can receive: its
/// `status.verifiedDigest` must be the digest its spec pins (a status written for an older
/// spec is not trusted).
pub fn delivery(capsule: &Capsule) -> Option<Delivery> {
    let verified = capsule.status.as_ref()?.verified_digest.clone()?;
    let name = capsule.metadata.name.clone()?;
    let spec = &capsule.spec;
    let (pinned, source) = if let Some(oci) = &spec.source.oci {
        (
            oci.digest.clone(),
            Source::Oci {
                repository: oci.repository.clone(),
            },
        )
    } else if let Some(cm) = &spec.source.config_map_ref {
        (
            cm.digest.clone(),
            Source::ConfigMap {
                name: cm.name.clone(),
                key: cm.key.clone(),
            },
        )
    } else {
        return None;
    };
    let collection = (spec.index == Some(soma_crds::capsule::RecallIndexKind::Qdrant))
        .then(|| {
            let namespace = capsule.metadata.namespace.as_deref()?;
            soma_capsule::qdrant::collection_name(namespace, &verified).ok()
        })
        .flatten();
    (pinned == verified).then(|| Delivery {
        name,
        digest: verified,
        policy_hash: spec.policy_hash.clone(),
        source,
        collection,
    })
}

/// The folder the agent container reads Capsule `name` from.
pub fn mount_path(name: &str) -> String {
    format!("{CAPSULES_DIR}/{name}")
}

/// The folder an init container fetches Capsule `name` into (the agent's `/capsules/<name>`).
fn fetch_path(name: &str) -> String {
    format!("{VOLUME_DIR}/{VISIBLE}/{name}")
}

/// The init container of delivery `index` (and, for a ConfigMap, its source volume's prefix).
fn volume_name(index: usize) -> String {
    format!("capsule-{index}")
}

/// The registry host of `registry/repository`.
fn registry_of(repository: &str) -> &str {
    repository.split_once('/').map_or(repository, |(r, _)| r)
}

/// The init container filling delivery `index`'s volume.
fn fetch_container(index: usize, d: &Delivery, config: &OperatorConfig) -> Container {
    let into = fetch_path(&d.name);
    let mut args = vec!["capsule".to_owned(), "fetch".to_owned()];
    let mut mounts = vec![mount(VOLUME, VOLUME_DIR, false)];
    match &d.source {
        Source::Oci { repository } => {
            args.extend(["--repository".to_owned(), repository.clone()]);
            args.extend(["--policy-hash".to_owned(), d.policy_hash.clone()]);
            let registry = registry_of(repository);
            if config.insecure_registries.iter().any(|r| r == registry) {
                args.extend(["--insecure-registry".to_owned(), registry.to_owned()]);
            }
        }
        Source::ConfigMap { key, .. } => {
            args.extend([
                "--file".to_owned(),
                format!("{SOURCE_DIR}/{key}"),
                "--name".to_owned(),
                key.clone(),
            ]);
            mounts.push(mount(
                &format!("{}-source", volume_name(index)),
                SOURCE_DIR,
                true,
            ));
        }
    }
    args.extend([
        "--digest".to_owned(),
        d.digest.clone(),
        "--into".to_owned(),
        into,
    ]);
    Container {
        name: volume_name(index),
        image: Some(config.jobs.cli_image.clone()),
        args: Some(args),
        security_context: Some(container_security()),
        // Fetch holds a bundle in memory while checking it (up to the format's limit).
        resources: Some(resources("10m", "32Mi", "500m", "512Mi")),
        volume_mounts: Some(mounts),
        ..Container::default()
    }
}

/// The ConfigMap volume a ConfigMap delivery's init container reads, if it is one.
fn source_volume(index: usize, d: &Delivery) -> Option<Volume> {
    let Source::ConfigMap { name, key } = &d.source else {
        return None;
    };
    Some(Volume {
        name: format!("{}-source", volume_name(index)),
        config_map: Some(ConfigMapVolumeSource {
            name: name.clone(),
            items: Some(vec![KeyToPath {
                key: key.clone(),
                path: key.clone(),
                mode: None,
            }]),
            optional: Some(false),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    })
}

/// Adds `deliveries` to the pod: the Capsule volume (and a ConfigMap Capsule's source), the
/// fetching init containers (before the sidecar, so nothing in the pod starts before its
/// Capsules are in place), the agent container's read-only mount of `visible/` at
/// `/capsules` with `SOMA_CAPSULES_DIR`, and the sidecar's mount of the whole volume.
pub fn deliver(template: &mut PodTemplateSpec, deliveries: &[Delivery], config: &OperatorConfig) {
    if deliveries.is_empty() {
        return;
    }
    let Some(pod) = template.spec.as_mut() else {
        return;
    };
    let fetches: Vec<Container> = deliveries
        .iter()
        .enumerate()
        .map(|(i, d)| fetch_container(i, d, config))
        .collect();
    let mut init = fetches;
    init.extend(pod.init_containers.take().unwrap_or_default());
    // The metering sidecar reads the folders for recall and moves a revoked one out of the
    // agent's view: it mounts the whole volume, writable.
    for c in init.iter_mut().filter(|c| c.name == SIDECAR_NAME) {
        c.volume_mounts
            .get_or_insert_with(Vec::new)
            .push(mount(VOLUME, VOLUME_DIR, false));
    }
    pod.init_containers = Some(init);
    let volumes = pod.volumes.get_or_insert_with(Vec::new);
    volumes.push(Volume {
        name: VOLUME.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    });
    volumes.extend(
        deliveries
            .iter()
            .enumerate()
            .filter_map(|(i, d)| source_volume(i, d)),
    );
    for c in pod
        .containers
        .iter_mut()
        .filter(|c| c.name == AGENT_CONTAINER)
    {
        // Only `visible/`: what the sidecar withholds is outside the agent's mount.
        c.volume_mounts
            .get_or_insert_with(Vec::new)
            .push(VolumeMount {
                sub_path: Some(VISIBLE.to_owned()),
                ..mount(VOLUME, CAPSULES_DIR, true)
            });
        let vars = c.env.get_or_insert_with(Vec::new);
        vars.retain(|v| v.name != CAPSULES_DIR_ENV);
        vars.push(env(CAPSULES_DIR_ENV, CAPSULES_DIR));
    }
}

/// Gives the sidecar's configuration the verified digest of each Capsule delivered, so the
/// sidecar checks the delivered folder against it before serving recall (an OCI bundle) and
/// withdraws it on revocation (any), and the volume's folders (`recall.capsulesDir`,
/// `recall.withheldDir`). A ConfigMap Capsule is a single blob, not a bundle: its entry also
/// names its one file (`file`, the ConfigMap key), which recall does not serve and the
/// sidecar checks against the digest before putting it back after a revocation.
/// A Capsule kept in Qdrant also gets its collection, and the sidecar the server's address
/// (`recall.qdrantUrl`, from `--qdrant-url`). Part of the pod template's hash: other content
/// rolls the pods.
pub fn sidecar_capsules(
    settings: &mut soma_contract::SidecarConfig,
    deliveries: &[Delivery],
    config: &OperatorConfig,
) {
    if !deliveries.is_empty() {
        settings.recall.capsules_dir = format!("{VOLUME_DIR}/{VISIBLE}").into();
        settings.recall.withheld_dir = Some(format!("{VOLUME_DIR}/{WITHHELD}").into());
    }
    for c in &mut settings.capsules {
        let delivered = deliveries.iter().find(|d| d.name == c.name);
        c.digest = delivered.map(|d| d.digest.clone());
        c.collection = delivered.and_then(|d| d.collection.clone());
        c.file = delivered.and_then(|d| match &d.source {
            Source::ConfigMap { key, .. } => Some(key.clone()),
            Source::Oci { .. } => None,
        });
    }
    if deliveries.iter().any(|d| d.collection.is_some()) {
        settings.recall.qdrant_url = config.qdrant.as_ref().map(|q| q.url.clone());
    }
}

/// Opens egress to the registries the deliveries fetch from (their port, any address: a
/// registry may live inside the cluster), and to the Qdrant server's port when a delivery is
/// searched there. NetworkPolicy applies to the whole pod, so the agent container may reach
/// those ports too; it holds no credentials for them (the fetch is anonymous; Qdrant is
/// reached without an API key, see docs/capsules.md).
pub fn capsule_egress(
    policy: &mut NetworkPolicy,
    deliveries: &[Delivery],
    config: &OperatorConfig,
) {
    let mut ports: Vec<i32> = deliveries
        .iter()
        .filter_map(|d| match &d.source {
            Source::Oci { repository } => Some(upstream_port(&format!(
                "https://{}",
                registry_of(repository)
            ))),
            Source::ConfigMap { .. } => None,
        })
        .collect();
    if let Some(q) = &config.qdrant
        && deliveries.iter().any(|d| d.collection.is_some())
    {
        ports.push(upstream_port(&q.url));
    }
    ports.sort_unstable();
    ports.dedup();
    if ports.is_empty() {
        return;
    }
    if let Some(spec) = policy.spec.as_mut() {
        spec.egress
            .get_or_insert_with(Vec::new)
            .push(NetworkPolicyEgressRule {
                to: Some(vec![NetworkPolicyPeer {
                    ip_block: Some(IPBlock {
                        cidr: "0.0.0.0/0".to_owned(),
                        except: None,
                    }),
                    ..NetworkPolicyPeer::default()
                }]),
                ports: Some(ports.into_iter().map(tcp).collect()),
            });
    }
}

#[cfg(test)]
mod tests;
