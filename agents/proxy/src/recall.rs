//! `POST /v1/recall`: the top-k chunks of the pod's Capsules for a query, each with its score
//! and provenance (Capsule, version, digest, chunk id, document).
//!
//! ```text
//!  start:  <recall.capsulesDir>/<name>/ ──open_delivered(verified digest)──► Shelf (a dyn RecallIndex per
//!          Capsule: exact, or HNSW above recall.approximateAboveRows chunks; or, for a Capsule
//!          with a Qdrant collection, its manifest only and the collection at recall.qdrantUrl)
//!  live:   revokedCapsules (file, ledger soma_capsule_revocations) ──► Shelf::set_revoked ──► 410
//!  request: admit ─► authenticate ─► read and check ─► pick Capsules (unknown 404, revoked 410)
//!           ─► query vector: given, or embedded through the metered /v1/embeddings call
//!              (reserved on the Budget, recorded in the outbox like any call)
//!           ─► search each index ─► merge top-k ─► answer
//! ```
//!
//! Every index answers through [`soma_capsule::recall_index::RecallIndex`], so a hit from a
//! Qdrant collection carries the same provenance, is refused by the same revocation (410,
//! decided here before any index is asked) and is queried with the same metered embedding.
//!
//! A Capsule whose folder fails the check at load (another digest, a changed file, no
//! embeddings, another embedding model than `recall.embeddingModel`) is not served: recall
//! names it with the reason (409). Nothing about it stops the sidecar's other work.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use soma_capsule::delivered::{Delivered, open_delivered, open_manifest};
use soma_capsule::index::{Index, IndexParams};
use soma_capsule::qdrant::{QdrantIndex, QdrantSettings};
use soma_capsule::recall_index::{Embedded, RecallIndex, Recalled, SearchError};
use soma_contract::recall::{RecallSettings, RevokedCapsule, SidecarCapsule};
use soma_metering::wire::Dialect;

use crate::endpoint::Endpoint;
use crate::error::ProxyError;
use crate::request::Call;
use crate::state::{AppState, InFlight};
use crate::{forward, reserve};

/// The path.
pub const PATH: &str = "/v1/recall";

/// Above this many rows in all the Capsules searched, the search runs on the blocking pool.
const SEARCH_INLINE_ROWS: usize = 4_096;

/// Why a recall was refused.
#[derive(Debug, thiserror::Error)]
pub enum RecallError {
    /// The request breaks a rule of the API (the message says which).
    #[error("{0}")]
    Invalid(String),
    /// The query is longer than `recall.maxQueryBytes`.
    #[error("the query is {got} bytes; at most {limit} are accepted (recall.maxQueryBytes)")]
    QueryTooLarge {
        /// The limit.
        limit: usize,
        /// The query's length.
        got: usize,
    },
    /// A Capsule this pod does not hold.
    #[error("this pod holds no Capsule {0:?}")]
    UnknownCapsule(String),
    /// A revoked Capsule.
    #[error("Capsule {capsule:?} ({digest}) is revoked: {reason}")]
    Revoked {
        /// Its name.
        capsule: String,
        /// The digest no longer served.
        digest: String,
        /// Why.
        reason: String,
    },
    /// A Capsule held but not served (the load check failed, or it has no embeddings).
    #[error("Capsule {capsule:?} is not served: {reason}")]
    Unavailable {
        /// Its name.
        capsule: String,
        /// Why.
        reason: String,
    },
    /// A query vector of another dimension than a Capsule's.
    #[error("the query vector has {got} dimensions, Capsule {capsule:?} ({model}) has {want}")]
    Dimensions {
        /// The Capsule.
        capsule: String,
        /// Its embedding model.
        model: String,
        /// Its dimension.
        want: usize,
        /// The vector's.
        got: usize,
    },
    /// The provider's embeddings answer has no usable vector.
    #[error("the provider's embedding of the query is unusable: {0}")]
    Embedding(String),
    /// A Budget browned the call out to another model, which cannot embed for these Capsules.
    #[error(
        "a Budget is exhausted and browns out to model {0:?}; a query embedding cannot change model, so it was not sent"
    )]
    BrownOut(String),
}

impl RecallError {
    /// Label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            RecallError::Invalid(_) | RecallError::Dimensions { .. } => "recall_invalid",
            RecallError::QueryTooLarge { .. } => "recall_query_too_large",
            RecallError::UnknownCapsule(_) => "capsule_not_found",
            RecallError::Revoked { .. } => "capsule_revoked",
            RecallError::Unavailable { .. } => "capsule_unavailable",
            RecallError::Embedding(_) => "recall_embedding",
            RecallError::BrownOut(_) => "budget",
        }
    }

    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            RecallError::Invalid(_)
            | RecallError::QueryTooLarge { .. }
            | RecallError::Dimensions { .. } => StatusCode::BAD_REQUEST,
            RecallError::UnknownCapsule(_) => StatusCode::NOT_FOUND,
            RecallError::Revoked { .. } => StatusCode::GONE,
            RecallError::Unavailable { .. } => StatusCode::CONFLICT,
            RecallError::Embedding(_) => StatusCode::BAD_GATEWAY,
            RecallError::BrownOut(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// (OpenAI error type, code).
    pub fn kinds(&self) -> (&'static str, &'static str) {
        match self {
            RecallError::Invalid(_) => ("invalid_request_error", "invalid_request"),
            RecallError::QueryTooLarge { .. } => ("invalid_request_error", "query_too_large"),
            RecallError::Dimensions { .. } => ("invalid_request_error", "dimension_mismatch"),
            RecallError::UnknownCapsule(_) => ("invalid_request_error", "capsule_not_found"),
            RecallError::Revoked { .. } => ("invalid_request_error", "capsule_revoked"),
            RecallError::Unavailable { .. } => ("invalid_request_error", "capsule_unavailable"),
            RecallError::Embedding(_) => ("api_error", "upstream_unavailable"),
            RecallError::BrownOut(_) => ("insufficient_quota", "budget_exceeded"),
        }
    }
}

/// A Capsule loaded for recall.
#[derive(Debug)]
pub struct Served {
    /// Name.
    pub name: String,
    /// `version` of its bundle.
    pub version: String,
    /// Its verified digest.
    pub digest: String,
    /// The model its vectors were made by (queries are embedded by it).
    pub model: String,
    /// Its chunks' vectors: the embedded index, or its Qdrant collection.
    pub index: Box<dyn RecallIndex>,
}

/// One of the pod's Capsules.
#[derive(Debug)]
pub enum Held {
    /// Loaded and checked.
    Served(Arc<Served>),
    /// Held, not served, and why.
    Unavailable {
        /// Name.
        name: String,
        /// Digest, when known.
        digest: Option<String>,
        /// Why.
        reason: String,
    },
}

impl Held {
    fn name(&self) -> &str {
        match self {
            Held::Served(s) => &s.name,
            Held::Unavailable { name, .. } => name,
        }
    }

    fn digest(&self) -> Option<&str> {
        match self {
            Held::Served(s) => Some(&s.digest),
            Held::Unavailable { digest, .. } => digest.as_deref(),
        }
    }
}

/// The pod's Capsules and the revocations in force.
#[derive(Debug, Default)]
pub struct Shelf {
    held: Vec<Held>,
    /// name → the one file of a ConfigMap Capsule's folder (its digest is the file's).
    files: BTreeMap<String, String>,
    /// (name, digest) → reason.
    revoked: RwLock<BTreeMap<(String, String), String>>,
    /// name → why its withheld folder could not be put back (`crate::withdraw`).
    withheld_problems: RwLock<BTreeMap<String, String>>,
}

/// The index parameters `recall` sets (the graph's shape stays the crate's default).
pub fn index_params(settings: &RecallSettings) -> IndexParams {
    IndexParams {
        approximate_above_rows: settings.approximate_above_rows,
        ef_search: settings.approximate_ef,
        ..IndexParams::default()
    }
}

/// Loads one delivered Capsule (blocking: reads and hashes files; builds its index).
pub fn load_one(settings: &RecallSettings, capsule: &SidecarCapsule) -> Held {
    let unavailable = |reason: String| Held::Unavailable {
        name: capsule.name.clone(),
        digest: capsule.digest.clone(),
        reason,
    };
    let Some(digest) = &capsule.digest else {
        return unavailable(
            "delivered without a verified digest (an operator without recall)".to_owned(),
        );
    };
    if let Some(file) = &capsule.file {
        return unavailable(format!(
            "a ConfigMap Capsule is one file ({file}), not a bundle with embeddings: recall does not serve it (the agent reads it at /capsules/{}/{file})",
            capsule.name
        ));
    }
    let dir = crate::withdraw::Folders::locate(settings, &capsule.name);
    if let Some(collection) = &capsule.collection {
        return load_qdrant(settings, capsule, &dir, digest, collection)
            .unwrap_or_else(unavailable);
    }
    let delivered: Delivered = match open_delivered(&dir, digest) {
        Ok(d) => d,
        Err(e) => {
            return unavailable(format!(
                "its folder does not hold the verified content ({}): {e}",
                e.reason()
            ));
        }
    };
    let (Some(model), Some(records)) = (&delivered.manifest.embedding, &delivered.embeddings)
    else {
        return unavailable(
            "the bundle carries no embeddings (pack it with --embeddings and --embedding-model)"
                .to_owned(),
        );
    };
    if let Some(want) = &settings.embedding_model
        && *want != model.model
    {
        return unavailable(format!(
            "its chunks were embedded by {:?}, this sidecar embeds queries with {want:?} (recall.embeddingModel)",
            model.model
        ));
    }
    let index = match Index::build(
        model.dimensions,
        records.iter().map(|r| r.vector.as_slice()),
        &index_params(settings),
    ) {
        Ok(i) => i,
        Err(e) => return unavailable(format!("its embeddings do not index: {e}")),
    };
    let index = match Embedded::new(index, delivered.chunks) {
        Ok(i) => i,
        Err(e) => return unavailable(format!("its embeddings do not index: {e}")),
    };
    Held::Served(Arc::new(Served {
        name: capsule.name.clone(),
        version: delivered.manifest.version.clone(),
        digest: delivered.digest,
        model: model.model.clone(),
        index: Box::new(index),
    }))
}

/// A Capsule whose vectors live in Qdrant collection `collection`: only its manifest is read
/// from the folder (checked against the verified digest: version, model, dimension, chunk
/// count); no request is made until a recall (the collection may still be loading).
fn load_qdrant(
    settings: &RecallSettings,
    capsule: &SidecarCapsule,
    dir: &std::path::Path,
    digest: &str,
    collection: &str,
) -> Result<Held, String> {
    let url = settings.qdrant_url.as_deref().ok_or_else(|| {
        format!(
            "its vectors are in Qdrant collection {collection:?}, but this sidecar has no recall.qdrantUrl (the operator's --qdrant-url)"
        )
    })?;
    let manifest = open_manifest(dir, digest).map_err(|e| {
        format!(
            "its folder does not hold the verified content ({}): {e}",
            e.reason()
        )
    })?;
    let model = manifest.embedding.as_ref().ok_or_else(|| {
        "the bundle carries no embeddings (pack it with --embeddings and --embedding-model)"
            .to_owned()
    })?;
    if let Some(want) = &settings.embedding_model
        && *want != model.model
    {
        return Err(format!(
            "its chunks were embedded by {:?}, this sidecar embeds queries with {want:?} (recall.embeddingModel)",
            model.model
        ));
    }
    let index = QdrantSettings::new(url)
        .and_then(|s| QdrantIndex::new(&s, collection, digest, model.dimensions, manifest.chunks))
        .map_err(|e| e.to_string())?;
    Ok(Held::Served(Arc::new(Served {
        name: capsule.name.clone(),
        version: manifest.version.clone(),
        digest: digest.to_owned(),
        model: model.model.clone(),
        index: Box::new(index),
    })))
}

impl Shelf {
    /// Loads every Capsule of the configuration and takes its revocations.
    pub fn load(capsules: &[SidecarCapsule], settings: &RecallSettings) -> Shelf {
        let held: Vec<Held> = capsules.iter().map(|c| load_one(settings, c)).collect();
        for h in &held {
            match h {
                Held::Served(s) => {
                    tracing::info!(capsule = %s.name, digest = %s.digest, rows = s.index.local_rows(), model = %s.model, index = s.index.kind(), "Capsule loaded for recall")
                }
                Held::Unavailable { name, reason, .. } => {
                    tracing::warn!(capsule = %name, reason = %reason, "Capsule not served by recall");
                }
            }
        }
        Shelf {
            held,
            files: capsules
                .iter()
                .filter_map(|c| Some((c.name.clone(), c.file.clone()?)))
                .collect(),
            revoked: RwLock::default(),
            withheld_problems: RwLock::default(),
        }
    }

    /// Replaces the revocations in force; returns whether they changed.
    pub fn set_revoked(&self, revoked: &[RevokedCapsule]) -> bool {
        let next: BTreeMap<(String, String), String> = revoked
            .iter()
            .map(|r| ((r.name.clone(), r.digest.clone()), r.reason.clone()))
            .collect();
        let mut current = self.revoked.write().unwrap_or_else(PoisonError::into_inner);
        if *current == next {
            return false;
        }
        for ((name, digest), reason) in &next {
            if !current.contains_key(&(name.clone(), digest.clone()))
                && self
                    .held
                    .iter()
                    .any(|h| h.name() == name && h.digest() == Some(digest))
            {
                tracing::warn!(capsule = %name, digest = %digest, reason = %reason, "Capsule revoked: recall stops serving it");
            }
        }
        *current = next;
        true
    }

    /// Why Capsule `name` at `digest` is revoked, if it is.
    pub fn revocation(&self, name: &str, digest: &str) -> Option<String> {
        let revoked = self.revoked.read().unwrap_or_else(PoisonError::into_inner);
        revoked.get(&(name.to_owned(), digest.to_owned())).cloned()
    }

    /// Records why Capsule `name`'s withheld folder could not be put back (recall refuses it
    /// while it is), or clears it.
    pub fn set_withheld_problem(&self, name: &str, problem: Option<String>) {
        let mut problems = self
            .withheld_problems
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        match problem {
            Some(p) => problems.insert(name.to_owned(), p),
            None => problems.remove(name),
        };
    }

    /// The one file of ConfigMap Capsule `name`'s folder, when it is one (not a bundle).
    pub fn single_file(&self, name: &str) -> Option<&str> {
        self.files.get(name).map(String::as_str)
    }

    /// The (name, digest) pairs of the Capsules held, for the ledger's revocation rows.
    pub fn held(&self) -> Vec<(String, String)> {
        self.held
            .iter()
            .filter_map(|h| Some((h.name().to_owned(), h.digest()?.to_owned())))
            .collect()
    }

    /// Why `held` may not be served now, if it may not.
    fn refusal(&self, held: &Held) -> Option<RecallError> {
        let digest = held.digest()?;
        if let Some(reason) = self.revocation(held.name(), digest) {
            return Some(RecallError::Revoked {
                capsule: held.name().to_owned(),
                digest: digest.to_owned(),
                reason,
            });
        }
        let problems = self
            .withheld_problems
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        problems
            .get(held.name())
            .map(|reason| RecallError::Unavailable {
                capsule: held.name().to_owned(),
                reason: reason.clone(),
            })
    }

    /// The Capsules a request searches: those it names (each must be held and servable), or
    /// every servable one (revoked and unavailable ones are reported as skipped). Nothing
    /// servable at all is an error: the first revocation, else the first unavailability.
    fn pick(
        &self,
        names: Option<&[String]>,
    ) -> Result<(Vec<Arc<Served>>, Vec<Value>), RecallError> {
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        let mut first_refusal = None;
        let chosen: Vec<&Held> = match names {
            Some(names) => {
                let mut v = Vec::new();
                for n in names {
                    let h = self
                        .held
                        .iter()
                        .find(|h| h.name() == n)
                        .ok_or_else(|| RecallError::UnknownCapsule(n.clone()))?;
                    v.push(h);
                }
                v
            }
            None => self.held.iter().collect(),
        };
        for h in chosen {
            let refusal = self.refusal(h).or_else(|| match h {
                Held::Unavailable { name, reason, .. } => Some(RecallError::Unavailable {
                    capsule: name.clone(),
                    reason: reason.clone(),
                }),
                Held::Served(_) => None,
            });
            match (refusal, h) {
                (Some(r), _) if names.is_some() => return Err(r),
                (Some(r), _) => {
                    skipped.push(
                        json!({"capsule": h.name(), "code": r.kinds().1, "reason": r.to_string()}),
                    );
                    first_refusal.get_or_insert(r);
                }
                (None, Held::Served(s)) => out.push(s.clone()),
                (None, Held::Unavailable { .. }) => {}
            }
        }
        if out.is_empty() {
            return Err(first_refusal.unwrap_or_else(|| {
                RecallError::Invalid("this pod holds no Capsule to recall from".to_owned())
            }));
        }
        Ok((out, skipped))
    }
}

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecallRequest {
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    vector: Option<Vec<f32>>,
    #[serde(default)]
    k: Option<usize>,
    #[serde(default)]
    capsules: Option<Vec<String>>,
}

/// What was asked, checked.
struct Asked {
    query: Query,
    k: usize,
    capsules: Option<Vec<String>>,
}

enum Query {
    Text(String),
    Vector(Vec<f32>),
}

fn check(body: &[u8], settings: &RecallSettings) -> Result<Asked, ProxyError> {
    let req: RecallRequest =
        serde_json::from_slice(body).map_err(|e| ProxyError::Json(e.to_string()))?;
    let invalid = |m: String| ProxyError::Recall(RecallError::Invalid(m));
    let k = req.k.unwrap_or(5);
    if k == 0 || k > settings.max_k {
        return Err(invalid(format!(
            "k is {k}; it must be between 1 and {} (recall.maxK)",
            settings.max_k
        )));
    }
    let query = match (req.query, req.vector) {
        (Some(q), None) => {
            if q.len() > settings.max_query_bytes {
                return Err(ProxyError::Recall(RecallError::QueryTooLarge {
                    limit: settings.max_query_bytes,
                    got: q.len(),
                }));
            }
            if q.trim().is_empty() {
                return Err(invalid("the query is empty".to_owned()));
            }
            Query::Text(q)
        }
        (None, Some(v)) => {
            if v.is_empty() || !v.iter().all(|x| x.is_finite()) {
                return Err(invalid(
                    "vector must be a non-empty list of finite numbers".to_owned(),
                ));
            }
            Query::Vector(v)
        }
        _ => {
            return Err(invalid(
                "give exactly one of \"query\" (text, embedded by the sidecar) or \"vector\""
                    .to_owned(),
            ));
        }
    };
    if let Some(c) = &req.capsules
        && c.is_empty()
    {
        return Err(invalid(
            "capsules, when given, must name at least one Capsule".to_owned(),
        ));
    }
    Ok(Asked {
        query,
        k,
        capsules: req.capsules,
    })
}

/// Embeds `text` with `model` through the sidecar's metered embeddings call: estimated,
/// reserved on the Budget chain, recorded in the outbox and settled from the provider's usage,
/// exactly as an agent's own `/v1/embeddings` call. Returns the vector and prompt tokens, or
/// the provider's error response to pass on.
async fn embed(
    state: &Arc<AppState>,
    model: &str,
    text: &str,
    permit: InFlight,
    t0: Instant,
) -> Result<Result<(Vec<f32>, u64), Response>, ProxyError> {
    let body = json!({"model": model, "input": text});
    let bytes = Bytes::from(body.to_string());
    let (parts, ()) = axum::http::Request::builder()
        .method(Method::POST)
        .uri(Endpoint::Embeddings.path())
        .header(header::CONTENT_TYPE, "application/json")
        .body(())
        .map_err(|e| ProxyError::Internal(e.to_string()))?
        .into_parts();
    let mut call = Call::new(
        state,
        bytes,
        body,
        model.to_owned(),
        false,
        0,
        soma_contract::load::Priority::Normal,
    );
    let charge = reserve::reserve(state, Endpoint::Embeddings, &mut call, permit).await?;
    if call.model != model {
        let browned = call.model.clone();
        charge.settle(
            state,
            soma_metering::wire::Metered::default(),
            false,
            "brown_out",
            429,
        );
        return Err(ProxyError::Recall(RecallError::BrownOut(browned)));
    }
    let response = forward::metered(state, Endpoint::Embeddings, &parts, call, charge, t0).await?;
    if !response.status().is_success() {
        return Ok(Err(response));
    }
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .map_err(|e| ProxyError::Recall(RecallError::Embedding(e.to_string())))?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ProxyError::Recall(RecallError::Embedding(format!("not JSON: {e}"))))?;
    let vector: Vec<f32> = v
        .pointer("/data/0/embedding")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_f64)
                .map(|x| x as f32)
                .collect()
        })
        .filter(|v: &Vec<f32>| !v.is_empty() && v.iter().all(|x| x.is_finite()))
        .ok_or_else(|| {
            ProxyError::Recall(RecallError::Embedding(
                "no data[0].embedding of finite numbers".to_owned(),
            ))
        })?;
    let tokens = v
        .pointer("/usage/prompt_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Ok(Ok((vector, tokens)))
}

/// Every searched Capsule's hits, merged: best first across Capsules; ties by Capsule
/// order, then row. An index that cannot answer (a Qdrant collection not loaded or not
/// reachable) fails the recall with the reason (409), as an unavailable Capsule does.
async fn search_all(
    capsules: &[(Arc<Served>, Arc<Vec<f32>>)],
    k: usize,
) -> Result<Vec<(Arc<Served>, Recalled)>, RecallError> {
    let searches = capsules.iter().map(|(c, q)| async move {
        let hits = c.index.search(q, k).await.map_err(|e| match e {
            SearchError::Query(_) => RecallError::Dimensions {
                capsule: c.name.clone(),
                model: c.model.clone(),
                want: c.index.dims(),
                got: q.len(),
            },
            SearchError::Unavailable(reason) => RecallError::Unavailable {
                capsule: c.name.clone(),
                reason,
            },
        })?;
        Ok::<_, RecallError>(hits.into_iter().map(|h| (c.clone(), h)).collect::<Vec<_>>())
    });
    let mut all: Vec<(Arc<Served>, Recalled)> = Vec::new();
    for hits in futures::future::join_all(searches).await {
        all.extend(hits?);
    }
    let order: Vec<String> = capsules.iter().map(|(c, _)| c.name.clone()).collect();
    all.sort_by(|(ca, a), (cb, b)| {
        b.score.total_cmp(&a.score).then_with(|| {
            let ia = order.iter().position(|n| *n == ca.name);
            let ib = order.iter().position(|n| *n == cb.name);
            ia.cmp(&ib).then(a.row.cmp(&b.row))
        })
    });
    all.truncate(k);
    Ok(all)
}

/// What a recall is asked with.
#[derive(Debug)]
pub enum Asking {
    /// `POST /v1/recall`, still to authenticate and read.
    Http(Box<Request>),
    /// The arguments of the MCP tool `capsule_recall` (the recall request body), from a
    /// request [`crate::mcp`] has authenticated.
    Tool(Bytes),
}

/// Serves `POST /v1/recall`.
pub async fn handle(State(state): State<Arc<AppState>>, req: Request) -> Response {
    answer(&state, Asking::Http(Box::new(req))).await
}

/// The one path of a recall, for `POST /v1/recall` and the MCP tool alike: admission, the
/// checks, the metered query embedding, the search, the errors in OpenAI's format, and the
/// metrics (`endpoint="recall"`).
pub async fn answer(state: &Arc<AppState>, asking: Asking) -> Response {
    let t0 = Instant::now();
    let result = match state.admit() {
        None => Err(ProxyError::Overloaded {
            limit: state.config.max_in_flight.get(),
        }),
        Some(permit) => serve(state, asking, permit, t0).await,
    };
    let response = match result {
        Ok(r) => r,
        Err(e) => {
            let label = match &e {
                ProxyError::Recall(r) => r.label(),
                other => other.label(),
            };
            state.metrics.error(label);
            tracing::warn!(endpoint = "recall", reason = label, error = %e, "recall failed");
            e.into_wire(Dialect::OpenAi)
        }
    };
    state
        .metrics
        .request("recall", "", response.status().as_u16());
    response
}

async fn serve(
    state: &Arc<AppState>,
    asking: Asking,
    permit: InFlight,
    t0: Instant,
) -> Result<Response, ProxyError> {
    let bytes = match asking {
        Asking::Http(req) => {
            crate::handler::authenticate(state, req.headers())?;
            let (parts, body) = (*req).into_parts();
            if parts.method != Method::POST {
                return Err(ProxyError::NotFound(format!("{} {PATH}", parts.method)));
            }
            crate::request::read_json_body(state, &parts, body).await?
        }
        Asking::Tool(bytes) => bytes,
    };
    let asked = check(&bytes, &state.config.recall)?;
    let (capsules, skipped) = state
        .capsules
        .pick(asked.capsules.as_deref())
        .map_err(ProxyError::Recall)?;
    // One query vector per embedding model among the Capsules searched.
    let mut vectors: BTreeMap<String, Arc<Vec<f32>>> = BTreeMap::new();
    let mut usage_tokens = 0u64;
    match asked.query {
        Query::Vector(v) => {
            let v = Arc::new(v);
            for c in &capsules {
                if c.index.dims() != v.len() {
                    return Err(ProxyError::Recall(RecallError::Dimensions {
                        capsule: c.name.clone(),
                        model: c.model.clone(),
                        want: c.index.dims(),
                        got: v.len(),
                    }));
                }
                vectors.insert(c.model.clone(), v.clone());
            }
        }
        Query::Text(text) => {
            if state.config.provider.kind == soma_contract::ProviderKind::Anthropic {
                return Err(ProxyError::Recall(RecallError::Invalid(
                    "this sidecar's provider is Anthropic, which has no embeddings API: send a precomputed \"vector\" instead of \"query\"".to_owned(),
                )));
            }
            let mut models: Vec<&str> = capsules.iter().map(|c| c.model.as_str()).collect();
            models.dedup();
            models.sort_unstable();
            models.dedup();
            let mut permit = Some(permit);
            for model in models {
                let p = match permit.take() {
                    Some(p) => p,
                    None => state.admit().ok_or(ProxyError::Overloaded {
                        limit: state.config.max_in_flight.get(),
                    })?,
                };
                match embed(state, model, &text, p, t0).await? {
                    Ok((v, tokens)) => {
                        usage_tokens += tokens;
                        vectors.insert(model.to_owned(), Arc::new(v));
                    }
                    Err(provider_error) => return Ok(provider_error),
                }
            }
        }
    }
    let searched: Vec<(Arc<Served>, Arc<Vec<f32>>)> = capsules
        .iter()
        .filter_map(|c| Some((c.clone(), vectors.get(&c.model)?.clone())))
        .collect();
    // Rows scanned in this process (an index held by Qdrant scans none here).
    let rows: usize = searched.iter().map(|(c, _)| c.index.local_rows()).sum();
    let k = asked.k;
    let hits = if rows > SEARCH_INLINE_ROWS {
        let span = tracing::Span::current();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            handle.block_on(search_all(&searched, k))
        })
        .await
        .map_err(|e| ProxyError::Internal(e.to_string()))?
    } else {
        search_all(&searched, k).await
    }
    .map_err(ProxyError::Recall)?;
    let data: Vec<Value> = hits
        .iter()
        .map(|(c, h)| {
            let chunk = &h.chunk;
            json!({
                "score": h.score,
                "text": chunk.text,
                "capsule": c.name,
                "version": c.version,
                "digest": c.digest,
                "chunk": chunk.id,
                "document": chunk.document,
                "start": chunk.start,
                "end": chunk.end,
            })
        })
        .collect();
    let mut body = json!({"object": "list", "data": data});
    if !skipped.is_empty() {
        body["skipped"] = Value::Array(skipped);
    }
    if usage_tokens > 0 {
        body["usage"] = json!({"prompt_tokens": usage_tokens, "total_tokens": usage_tokens});
    }
    Ok((StatusCode::OK, axum::Json(body)).into_response())
}
