//! The Capsule reconcile: revoked? → policies → content digest → public key → verify (cached)
//! → status (pure) → patch status only if changed → requeue on purpose.
//!
//! A missing ConfigMap (content or public key) is retried with backoff (and the ConfigMaps a
//! Capsule references are watched, so one created or edited is seen at once); a transient
//! verification failure too; a rejection for what a registry holds (unsigned, wrong key,
//! replayed) is looked up again after `capsule_recheck`, since no watch reports a signature
//! pushed later; any other rejection waits for a change to the Capsule or what it references
//! (a policy reload re-checks every Capsule).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Client, Resource, ResourceExt};
use soma_crds::Capsule;
use tracing::{Span, field, info, instrument};

use super::content::{check_declared, inline_digest};
use super::status::{CapsuleObserved, capsule_status};
use super::verify::{BlobContent, Rejection, Request, Verified, verify_cached};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::reconciler;

/// Name of this controller in metrics and logs.
pub const CONTROLLER: &str = "capsule";

/// Safety-net requeue after a verification; watches drive everything else.
const RESYNC: Duration = Duration::from_secs(3600);

/// The bytes of `key` in ConfigMap `name`, or why there are none (a transient rejection:
/// the ConfigMap may yet be created).
async fn config_map_key(
    client: &Client,
    namespace: &str,
    name: &str,
    key: &str,
    what: &str,
    reason: &str,
) -> Result<Result<Vec<u8>, Rejection>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = api.get_opt(name).await.map_err(|source| Error::Read {
        what: format!("ConfigMap {namespace}/{name}"),
        source,
    })?;
    let bytes = cm.and_then(|cm| {
        cm.data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|s| s.as_bytes().to_vec())
            .or_else(|| {
                cm.binary_data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|b| b.0.clone())
            })
    });
    Ok(bytes.ok_or_else(|| {
        Rejection::new(
            reason,
            format!("{what}: ConfigMap {namespace}/{name} has no key {key:?}; create it or correct the reference"),
            true,
        )
    }))
}

/// A Capsule's content as the verifier needs it.
struct Content {
    /// `sha256:<hex>`.
    digest: String,
    /// For a ConfigMap source: the bytes and the detached signature stored beside them.
    blob: Option<(Vec<u8>, String)>,
}

/// The key holding the detached signature of ConfigMap content stored under `key`.
pub fn signature_key(key: &str) -> String {
    format!("{key}.sig")
}

/// The Capsule's content: its digest, checked where the operator can read the bytes, and
/// for a ConfigMap source the bytes and their signature.
async fn content(
    client: &Client,
    capsule: &Capsule,
    namespace: &str,
) -> Result<Result<Content, Rejection>> {
    let source = &capsule.spec.source;
    if let Some(oci) = &source.oci {
        return Ok(Ok(Content {
            digest: oci.digest.clone(),
            blob: None,
        }));
    }
    if let Some(inline) = &source.inline {
        let digest = inline_digest(&inline.blocks).map_err(|source| Error::Serialize {
            what: "inline Capsule blocks",
            source,
        })?;
        return Ok(Ok(Content { digest, blob: None }));
    }
    if let Some(cm) = &source.config_map_ref {
        let bytes = match config_map_key(
            client,
            namespace,
            &cm.name,
            &cm.key,
            "spec.source.configMapRef",
            "ContentNotFound",
        )
        .await?
        {
            Ok(b) => b,
            Err(r) => return Ok(Err(r)),
        };
        let digest = match check_declared(&cm.digest, &bytes) {
            Ok(d) => d,
            Err(m) => return Ok(Err(Rejection::new("DigestMismatch", m, false))),
        };
        let sig_key = signature_key(&cm.key);
        let signature = match config_map_key(
            client,
            namespace,
            &cm.name,
            &sig_key,
            "the content's signature (cosign sign-blob output)",
            "SignatureNotFound",
        )
        .await?
        {
            Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
            Err(r) => return Ok(Err(r)),
        };
        return Ok(Ok(Content {
            digest,
            blob: Some((bytes, signature)),
        }));
    }
    Ok(Err(Rejection::new(
        "InvalidSource",
        "spec.source needs exactly one of oci, inline or configMapRef".to_owned(),
        false,
    )))
}

/// Everything up to the verifier's answer, and whether the outcome is the signature check's
/// (not a revocation or a policy's).
async fn observe(
    capsule: &Capsule,
    ctx: &Context,
    namespace: &str,
) -> Result<(CapsuleObserved, bool)> {
    let policy = ctx
        .policy
        .check(capsule)
        .await
        .map_err(|source| Error::Serialize {
            what: "the Capsule for policy evaluation",
            source,
        })?;
    let mut checked = false;
    let outcome = if capsule.spec.revoked {
        Err(Rejection::new(
            "Revoked",
            "the Capsule is revoked (spec.revoked); no Agent may use it".to_owned(),
            false,
        ))
    } else if policy.blocks {
        Err(Rejection::new(
            if policy.is_error() {
                "PolicyError"
            } else {
                "PolicyDenied"
            },
            policy.condition.message.clone(),
            policy.is_error(),
        ))
    } else {
        checked = true;
        verify(capsule, ctx, namespace).await?
    };
    Ok((
        CapsuleObserved {
            generation: capsule.metadata.generation,
            outcome,
            policy: Some(policy),
            qdrant: None,
        },
        checked,
    ))
}

async fn verify(
    capsule: &Capsule,
    ctx: &Context,
    namespace: &str,
) -> Result<Result<Verified, Rejection>> {
    let content = match content(&ctx.client, capsule, namespace).await? {
        Ok(c) => c,
        Err(r) => return Ok(Err(r)),
    };
    let key = match &capsule.spec.signature.public_key_ref {
        Some(r) => match config_map_key(
            &ctx.client,
            namespace,
            &r.name,
            &r.key,
            "spec.signature.publicKeyRef",
            "PublicKeyNotFound",
        )
        .await?
        {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(pem) => Some(pem),
                Err(_) => {
                    return Ok(Err(Rejection::new(
                        "PublicKeyInvalid",
                        format!(
                            "ConfigMap {}/{} key {:?} is not PEM text",
                            namespace, r.name, r.key
                        ),
                        false,
                    )));
                }
            },
            Err(r) => return Ok(Err(r)),
        },
        None => None,
    };
    let request = Request {
        capsule,
        digest: &content.digest,
        key_pem: key.as_deref(),
        blob: content
            .blob
            .as_ref()
            .map(|(bytes, signature)| BlobContent { bytes, signature }),
    };
    Ok(verify_cached(ctx.verifier.as_ref(), &ctx.verified, request).await)
}

/// Reconciles one Capsule.
#[instrument(skip(capsule, ctx), fields(namespace = field::Empty, capsule = %capsule.name_any()))]
pub async fn reconcile(capsule: Arc<Capsule>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let namespace = capsule
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    Span::current().record("namespace", namespace.as_str());
    if capsule.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let key = reconciler::key(&*capsule);
    let (mut observed, checked) = observe(&capsule, &ctx, &namespace).await?;
    if let Ok(verified) = &observed.outcome
        && super::qdrant::opted_in(&capsule)
    {
        observed.qdrant =
            Some(super::qdrant::observe(&capsule, &namespace, verified, &ctx.config).await);
    }
    write_status(&capsule, &ctx, &observed).await?;
    // Held back by its signature or content (not a revocation, a policy or a registry that
    // did not answer): `soma_signature_rejected`, which the signature alert watches.
    let rejected = match &observed.outcome {
        Err(r) if checked && !r.transient => Some(r.reason.as_str()),
        _ => None,
    };
    ctx.metrics
        .signature_state(CONTROLLER, &namespace, &capsule.name_any(), rejected);
    if let (Some(ledger), Some(p)) = (
        &ctx.ledger,
        super::revocation::decide(&capsule, &observed.outcome, checked),
    ) {
        // A revocation that did not reach the ledger is retried: running sidecars would
        // otherwise keep serving the Capsule.
        let written = match ledger.pool().await {
            Ok(pool) => super::revocation::publish(pool, &namespace, &capsule.name_any(), &p)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match written {
            Ok(true) => info!(publish = ?p, "Capsule revocation published to the sidecars"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "publishing the Capsule's revocation to the ledger failed; retrying");
                ctx.metrics.ledger_error("revocation");
                return Ok(Action::requeue(ctx.backoff(&key)));
            }
        }
    }
    Ok(match &observed.outcome {
        // Verified, but its Qdrant collection could not be loaded yet: try again.
        Ok(_) if matches!(&observed.qdrant, Some(Err(r)) if r.transient) => {
            Action::requeue(ctx.backoff(&key))
        }
        Ok(_) => {
            ctx.succeeded(&key);
            Action::requeue(RESYNC)
        }
        Err(r) if r.transient => Action::requeue(ctx.backoff(&key)),
        Err(r) if r.recheck => {
            // Stalled until the registry holds a signature the policy accepts, which no watch
            // reports: look again later (a cache hit costs no registry request).
            ctx.succeeded(&key);
            Action::requeue(ctx.config.capsule_recheck)
        }
        Err(_) => {
            ctx.succeeded(&key);
            Action::await_change()
        }
    })
}

/// Writes the status if it changed (decided on the live object), with a Warning Event when
/// the Capsule stops or fails to be Ready for a new reason.
async fn write_status(capsule: &Capsule, ctx: &Context, observed: &CapsuleObserved) -> Result<()> {
    let now = Time(ctx.clock.now());
    let Some(written) =
        reconciler::write_status(ctx, capsule, |old| capsule_status(old, observed, &now)).await?
    else {
        return Ok(());
    };
    if let Err(r) = &observed.outcome
        && reconciler::ready_reason_changed::<Capsule>(&written).is_some()
    {
        reconciler::publish(
            ctx,
            capsule,
            EventType::Warning,
            &r.reason,
            &r.message,
            "Verify",
        )
        .await;
    }
    info!(ready = observed.outcome.is_ok(), "capsule status updated");
    Ok(())
}

/// The Capsule controller's error policy (the shared one).
pub fn error_policy(capsule: Arc<Capsule>, error: &Error, ctx: Arc<Context>) -> Action {
    reconciler::error_policy(capsule, error, ctx)
}
