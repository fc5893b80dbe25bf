//! The delivery of verified Capsules into the pod: only the verified digest, read-only in the
//! agent container, fetched by an init container that runs before anything else.

use super::*;
use k8s_openapi::api::core::v1::PodSpec;
use soma_crds::Agent;
use soma_crds::agent::AgentSpec;
use soma_crds::capsule::CapsuleStatus;

use crate::agent::children::{Resolved, children};

const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
const PH: &str = "sha256:9999999999999999999999999999999999999999999999999999999999999999";

fn capsule(name: &str, source: serde_json::Value, verified: Option<&str>) -> Capsule {
    let mut c: Capsule = serde_json::from_value(serde_json::json!({
        "apiVersion": "soma.dev/v1alpha1", "kind": "Capsule",
        "metadata": {"name": name, "namespace": "team"},
        "spec": {"version": "1.0.0", "policyHash": PH, "source": source,
                 "signature": {"publicKeyRef": {"name": "signers", "key": "cosign.pub"}}}
    }))
    .expect("capsule");
    c.status = Some(CapsuleStatus {
        verified_digest: verified.map(str::to_owned),
        ..CapsuleStatus::default()
    });
    c
}

fn oci(digest: &str) -> serde_json::Value {
    serde_json::json!({"oci": {"repository": "127.0.0.1:5000/capsules/kb", "digest": digest}})
}

fn config_map() -> serde_json::Value {
    serde_json::json!({"configMapRef": {"name": "faq", "key": "faq.jsonl", "digest": D2}})
}

#[test]
fn only_the_verified_digest_of_the_pinned_content_is_delivered() {
    let d = delivery(&capsule("kb", oci(D1), Some(D1))).expect("verified");
    assert_eq!(
        d,
        Delivery {
            name: "kb".into(),
            digest: D1.into(),
            policy_hash: PH.into(),
            source: Source::Oci {
                repository: "127.0.0.1:5000/capsules/kb".into()
            },
            collection: None,
        }
    );
    assert_eq!(
        delivery(&capsule("kb", oci(D1), None)),
        None,
        "not verified"
    );
    assert_eq!(
        delivery(&capsule("kb", oci(D1), Some(D2))),
        None,
        "a status for other content is not trusted"
    );
    let inline = serde_json::json!({"inline": {"blocks": [{"id": "a", "text": "a"}]}});
    assert_eq!(delivery(&capsule("notes", inline, Some(D1))), None);
    let faq = delivery(&capsule("faq", config_map(), Some(D2))).expect("verified");
    assert_eq!(
        faq.source,
        Source::ConfigMap {
            name: "faq".into(),
            key: "faq.jsonl".into()
        }
    );
}

fn agent() -> Agent {
    let spec: AgentSpec = serde_json::from_value(serde_json::json!({
        "image": "registry.example.com/a@sha256:0d7c",
        "model": {"provider": "openai", "name": "gpt-4o"},
        "capsules": [{"name": "kb"}, {"name": "faq"}]
    }))
    .expect("spec");
    let mut a = Agent::new("helper", spec);
    a.metadata.namespace = Some("team".into());
    a.metadata.uid = Some("uid-1".into());
    a
}

fn pod(config: &OperatorConfig, capsules: Vec<Delivery>) -> (PodSpec, NetworkPolicy) {
    let c = children(
        &agent(),
        &Resolved {
            replicas: 1,
            budgets: Vec::new(),
            capsules,
            ..Resolved::default()
        },
        config,
    )
    .expect("children");
    let pod = c
        .deployment
        .spec
        .and_then(|s| s.template.spec)
        .expect("pod spec");
    (pod, c.network_policy)
}

fn args(c: &Container) -> Vec<&str> {
    c.args.iter().flatten().map(String::as_str).collect()
}

#[test]
fn the_agent_pod_fetches_each_capsule_by_digest_and_mounts_it_read_only() {
    let config = OperatorConfig {
        insecure_registries: vec!["127.0.0.1:5000".into()],
        ..OperatorConfig::default()
    };
    let deliveries = vec![
        delivery(&capsule("kb", oci(D1), Some(D1))).expect("kb"),
        delivery(&capsule("faq", config_map(), Some(D2))).expect("faq"),
    ];
    let (pod, np) = pod(&config, deliveries);

    let init = pod.init_containers.as_ref().expect("init containers");
    let names: Vec<&str> = init.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["capsule-0", "capsule-1", "soma-proxy"],
        "Capsules are in place before anything starts"
    );
    assert_eq!(
        args(&init[0]),
        [
            "capsule",
            "fetch",
            "--repository",
            "127.0.0.1:5000/capsules/kb",
            "--policy-hash",
            PH,
            "--insecure-registry",
            "127.0.0.1:5000",
            "--digest",
            D1,
            "--into",
            "/var/lib/soma-capsules/visible/kb"
        ]
    );
    assert_eq!(
        args(&init[1]),
        [
            "capsule",
            "fetch",
            "--file",
            "/var/run/soma/capsule-source/faq.jsonl",
            "--name",
            "faq.jsonl",
            "--digest",
            D2,
            "--into",
            "/var/lib/soma-capsules/visible/faq"
        ]
    );
    for c in &init[..2] {
        assert_eq!(c.image.as_deref(), Some(config.jobs.cli_image.as_str()));
        assert_eq!(c.security_context, Some(container_security()));
        assert!(
            c.resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .is_some()
        );
        let m = c.volume_mounts.iter().flatten().find(|m| m.name == VOLUME);
        assert_eq!(
            m.map(|m| (m.mount_path.as_str(), m.read_only, m.sub_path.as_deref())),
            Some(("/var/lib/soma-capsules", Some(false), None)),
            "a fetch writes into the volume"
        );
    }
    // The sidecar mounts the whole volume, writable: it moves a revoked Capsule's folder
    // from visible/ to withheld/.
    let sidecar = &init[2];
    let m: Vec<_> = sidecar
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| m.name == VOLUME)
        .map(|m| (m.mount_path.as_str(), m.read_only, m.sub_path.as_deref()))
        .collect();
    assert_eq!(m, [("/var/lib/soma-capsules", Some(false), None)]);

    let agent = pod
        .containers
        .iter()
        .find(|c| c.name == AGENT_CONTAINER)
        .expect("agent");
    let mounts: Vec<(&str, &str, Option<bool>, Option<&str>)> = agent
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| m.name == VOLUME || m.mount_path.starts_with(CAPSULES_DIR))
        .map(|m| {
            (
                m.name.as_str(),
                m.mount_path.as_str(),
                m.read_only,
                m.sub_path.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        mounts,
        [("capsules", "/capsules", Some(true), Some("visible"))],
        "the agent reads visible/ (its /capsules/<name>/), never writes it, never sees withheld/"
    );
    assert!(
        agent
            .volume_mounts
            .iter()
            .flatten()
            .all(|m| !m.name.ends_with("-source")),
        "the ConfigMap itself (which may change) never reaches the agent"
    );
    assert!(
        agent
            .env
            .iter()
            .flatten()
            .any(|v| v.name == CAPSULES_DIR_ENV && v.value.as_deref() == Some("/capsules"))
    );
    let volumes = pod.volumes.as_ref().expect("volumes");
    let vol = |n: &str| volumes.iter().find(|v| v.name == n).expect(n);
    assert!(vol("capsules").empty_dir.is_some());
    assert_eq!(
        volumes
            .iter()
            .filter(|v| v.name.starts_with("capsule"))
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>(),
        ["capsules", "capsule-1-source"],
        "one volume for every Capsule, and the ConfigMap's source"
    );
    let source = vol("capsule-1-source")
        .config_map
        .as_ref()
        .expect("configMap");
    assert_eq!(source.name, "faq");
    assert_eq!(source.items.as_ref().map(Vec::len), Some(1));

    // The sidecar knows the volume's two folders (to load from, and to withdraw into).
    let settings = crate::agent::children::sidecar_config(
        &self::agent(),
        &Resolved {
            replicas: 1,
            capsules: vec![delivery(&capsule("kb", oci(D1), Some(D1))).expect("kb")],
            ..Resolved::default()
        },
        &config,
    );
    assert_eq!(
        settings.recall.capsules_dir,
        std::path::PathBuf::from("/var/lib/soma-capsules/visible")
    );
    assert_eq!(
        settings.recall.withheld_dir,
        Some("/var/lib/soma-capsules/withheld".into())
    );
    // The registry's port is open for the fetch.
    let egress = np.spec.and_then(|s| s.egress).expect("egress");
    let last = egress.last().expect("a rule");
    assert_eq!(last.ports, Some(vec![tcp(5000)]));
}

#[test]
fn without_capsules_the_pod_is_unchanged_and_a_registry_port_is_opened_once() {
    let (plain, np) = pod(&OperatorConfig::default(), Vec::new());
    assert_eq!(
        plain.init_containers.as_ref().map(Vec::len),
        Some(1),
        "only the sidecar"
    );
    let (_, with) = pod(
        &OperatorConfig::default(),
        vec![delivery(&capsule("kb", oci(D1), Some(D1))).expect("kb")],
    );
    let rules = |p: &NetworkPolicy| {
        p.spec
            .as_ref()
            .and_then(|s| s.egress.as_ref())
            .map_or(0, Vec::len)
    };
    assert_eq!(rules(&with), rules(&np) + 1);
    // A registry not listed as insecure is fetched over HTTPS (no --insecure-registry).
    let (pod, _) = pod(
        &OperatorConfig::default(),
        vec![delivery(&capsule("kb", oci(D1), Some(D1))).expect("kb")],
    );
    let init = pod.init_containers.expect("init");
    assert!(!args(&init[0]).contains(&"--insecure-registry"));
}

#[test]
fn a_capsule_kept_in_qdrant_reaches_the_sidecar_with_its_collection_and_the_servers_port() {
    let mut kb = capsule("kb", oci(D1), Some(D1));
    kb.spec.index = Some(soma_crds::capsule::RecallIndexKind::Qdrant);
    let d = delivery(&kb).expect("kb");
    let collection = format!("soma_team_sha256_{}", "1".repeat(64));
    assert_eq!(d.collection.as_deref(), Some(collection.as_str()));
    // Still delivered into the pod like any bundle (the agent reads its documents).
    assert!(matches!(d.source, Source::Oci { .. }));

    let config = OperatorConfig {
        qdrant: Some(
            soma_capsule::qdrant::QdrantSettings::new("http://qdrant.soma-system:6334")
                .expect("url"),
        ),
        ..OperatorConfig::default()
    };
    let resolved = Resolved {
        replicas: 1,
        capsules: vec![d.clone()],
        ..Resolved::default()
    };
    let settings = crate::agent::children::sidecar_config(&agent(), &resolved, &config);
    let entry = settings
        .capsules
        .iter()
        .find(|c| c.name == "kb")
        .expect("kb");
    assert_eq!(entry.digest.as_deref(), Some(D1));
    assert_eq!(entry.collection.as_deref(), Some(collection.as_str()));
    assert_eq!(
        settings.recall.qdrant_url.as_deref(),
        Some("http://qdrant.soma-system:6334")
    );
    let (_, np) = pod(&config, vec![d]);
    let egress = np.spec.and_then(|s| s.egress).expect("egress");
    assert_eq!(
        egress.last().and_then(|r| r.ports.clone()),
        Some(vec![tcp(5000), tcp(6334)]),
        "the registry's port for the fetch, Qdrant's for recall"
    );

    // An embedded Capsule: no collection, no server address, no Qdrant port.
    let plain = Resolved {
        replicas: 1,
        capsules: vec![delivery(&capsule("kb", oci(D1), Some(D1))).expect("kb")],
        ..Resolved::default()
    };
    let settings = crate::agent::children::sidecar_config(&agent(), &plain, &config);
    assert!(settings.capsules.iter().all(|c| c.collection.is_none()));
    assert_eq!(settings.recall.qdrant_url, None);
    let (_, np) = pod(&config, plain.capsules.clone());
    let egress = np.spec.and_then(|s| s.egress).expect("egress");
    assert_eq!(
        egress.last().and_then(|r| r.ports.clone()),
        Some(vec![tcp(5000)])
    );
}
