//! A verified Capsule with `spec.index: qdrant` loaded into its Qdrant collection (the scale
//! path of recall; `soma_capsule::qdrant` holds the naming, the points and the load itself).
//!
//! ```text
//!  Capsule verified, spec.index qdrant ─► --qdrant-url? ─► collection_name(namespace, digest)
//!    ─► status already names it for this digest and the exact count still matches? done
//!    ─► fetch the bundle by digest (every byte checked) ─► qdrant::load (idempotent)
//!    ─► status.qdrant {collection, digest, points}, condition QdrantLoaded
//! ```
//!
//! Only a verified Capsule is loaded, and only the verified digest's content (fetched again
//! by that digest, so nothing between the signature check and the load can swap it). A
//! failure to load leaves the Capsule Ready (its signature stands) with `QdrantLoaded` False
//! and the reason; sidecars answer recall from it with 409 until the collection is complete.
//! Untested against a server here: see `soma_capsule::qdrant`.

use soma_capsule::qdrant::{QdrantError, QdrantSettings, collection_name, count, load};
use soma_crds::Capsule;
use soma_crds::capsule::{CapsuleStatus, QdrantCollectionStatus, RecallIndexKind};

use super::verify::{Rejection, Verified};
use crate::config::OperatorConfig;

/// Whether the Capsule keeps its vectors in Qdrant.
pub fn opted_in(capsule: &Capsule) -> bool {
    capsule.spec.index == Some(RecallIndexKind::Qdrant)
}

fn from_error(e: &QdrantError) -> Rejection {
    Rejection::new(e.reason(), e.to_string(), e.transient())
}

/// Pure: the collection of a verified Capsule, or why it has none (an operator without
/// `--qdrant-url`, a name that cannot be made).
pub fn target(
    capsule: &Capsule,
    namespace: &str,
    verified: &Verified,
    config: &OperatorConfig,
) -> Result<(QdrantSettings, String), Rejection> {
    let Some(settings) = &config.qdrant else {
        return Err(Rejection::new(
            "QdrantNotConfigured",
            format!(
                "spec.index is qdrant, but the operator runs without --qdrant-url; Capsule {namespace}/{} cannot be loaded (remove spec.index to use the embedded index)",
                capsule.metadata.name.as_deref().unwrap_or_default()
            ),
            false,
        ));
    };
    let collection = collection_name(namespace, &verified.digest).map_err(|e| from_error(&e))?;
    Ok((settings.clone(), collection))
}

/// Loads the verified content of `capsule` into its collection, unless the status already
/// names that collection for this digest and it still holds that many points.
pub async fn observe(
    capsule: &Capsule,
    namespace: &str,
    verified: &Verified,
    config: &OperatorConfig,
) -> Result<QdrantCollectionStatus, Rejection> {
    let (settings, collection) = target(capsule, namespace, verified, config)?;
    let client = settings.client().map_err(|e| from_error(&e))?;
    let known = capsule
        .status
        .as_ref()
        .and_then(|s: &CapsuleStatus| s.qdrant.as_ref())
        .filter(|q| q.collection == collection && q.digest == verified.digest);
    if let Some(known) = known
        && count(&client, &collection).await.ok() == Some(known.points)
    {
        return Ok(known.clone());
    }
    let Some(oci) = &capsule.spec.source.oci else {
        return Err(Rejection::new(
            "QdrantNeedsBundle",
            "spec.index qdrant needs an OCI source (a bundle with embeddings)".to_owned(),
            false,
        ));
    };
    let registry = soma_capsule::Registry::new(config.insecure_registries.clone());
    let contents = registry
        .fetch(&oci.repository, &verified.digest)
        .await
        .and_then(|bundle| bundle.open())
        .map_err(|e| {
            Rejection::new(
                "QdrantBundleUnavailable",
                format!(
                    "fetching {}@{} to load into Qdrant: {e}",
                    oci.repository, verified.digest
                ),
                true,
            )
        })?;
    let loaded = load(&client, &settings, &collection, &contents)
        .await
        .map_err(|e| from_error(&e))?;
    tracing::info!(collection = %loaded.collection, points = loaded.points, wrote = loaded.wrote, "Capsule loaded into Qdrant");
    Ok(QdrantCollectionStatus {
        collection: loaded.collection,
        digest: verified.digest.clone(),
        points: loaded.points,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capsule(index: Option<&str>) -> Capsule {
        let mut spec = serde_json::json!({
            "version": "1.0.0", "policyHash": format!("sha256:{}", "9".repeat(64)),
            "source": {"oci": {"repository": "127.0.0.1:5000/capsules/kb", "digest": format!("sha256:{}", "a".repeat(64))}},
            "signature": {"publicKeyRef": {"name": "signers", "key": "cosign.pub"}}
        });
        if let Some(i) = index {
            spec["index"] = i.into();
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "soma.dev/v1alpha1", "kind": "Capsule",
            "metadata": {"name": "kb", "namespace": "team"}, "spec": spec
        }))
        .expect("capsule")
    }

    fn verified() -> Verified {
        Verified {
            digest: format!("sha256:{}", "a".repeat(64)),
            signer: "key".into(),
        }
    }

    #[test]
    fn only_a_capsule_that_asks_is_loaded_and_only_with_a_server() {
        assert!(!opted_in(&capsule(None)));
        assert!(!opted_in(&capsule(Some("embedded"))));
        assert!(opted_in(&capsule(Some("qdrant"))));
        assert!(serde_json::from_value::<RecallIndexKind>(serde_json::json!("pinecone")).is_err());

        let c = capsule(Some("qdrant"));
        let none = target(&c, "team", &verified(), &OperatorConfig::default()).expect_err("no url");
        assert_eq!(none.reason, "QdrantNotConfigured");
        assert!(!none.transient && none.message.contains("--qdrant-url"));

        let config = OperatorConfig {
            qdrant: Some(QdrantSettings::new("http://qdrant.soma-system:6334").expect("url")),
            ..OperatorConfig::default()
        };
        let (settings, collection) = target(&c, "team", &verified(), &config).expect("target");
        assert_eq!(settings.url, "http://qdrant.soma-system:6334");
        assert_eq!(collection, format!("soma_team_sha256_{}", "a".repeat(64)));
        // The namespace is part of the name: another tenant's pods never search this one.
        let (_, other) = target(&c, "team-b", &verified(), &config).expect("target");
        assert_ne!(collection, other);

        let bad = Verified {
            digest: "sha256:short".into(),
            signer: "key".into(),
        };
        assert_eq!(
            target(&c, "team", &bad, &config)
                .expect_err("bad digest")
                .reason,
            "QdrantName"
        );
    }
}
