//! The Qdrant scale path: a large shared Capsule's chunk vectors held in a Qdrant collection
//! instead of an index built in every sidecar. The operator loads the collection from the
//! verified bundle ([`load`]); each sidecar searches it through the same
//! [`RecallIndex`](crate::recall_index::RecallIndex) interface as the embedded index
//! ([`QdrantIndex`]), and adds the same provenance to every hit.
//!
//! ```text
//!  operator: verified bundle (fetched by digest) ─► points (pure: id from chunk id, vector,
//!            payload = chunk + digest + version + row) ─► create collection (cosine, dims)
//!            ─► upsert in batches (wait) ─► exact count == chunks ─► loaded
//!  sidecar:  query vector ─► QdrantIndex::search ─► query (limit k, with payload)
//!            ─► payload checked (this digest, a chunk) ─► Recalled {row, score, chunk}
//! ```
//!
//! **Collections are per namespace and digest** ([`collection_name`]:
//! `soma_<namespace>_sha256_<hex>`). Two namespaces holding the same digest hold the same
//! bytes, so one collection could serve both; it is not shared because a collection has a
//! life of its own (created, filled, later deleted or re-created) and one namespace's Capsule
//! must not be able to change, empty or remove what another namespace's pods search, nor
//! learn through the collection that another namespace holds that content. The cost is one
//! copy of the vectors per namespace that opts in.
//!
//! A collection is served only once it is complete: [`QdrantIndex`] checks the exact point
//! count against the bundle's chunk count before its first search (a load still in progress
//! answers "not loaded yet"), and every hit's payload must name this collection's digest.
//! Point ids are derived from the digest and the chunk id ([`point_id`]), so loading again
//! writes the same points (idempotent).
//!
//! Untested against a server on the machines this project is built on (no Qdrant server
//! installs there): the pure parts are unit-tested here; the server round trip only in the
//! real-cluster suite (`e2e/cluster`, `SOMA_E2E_QDRANT=1`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use qdrant_client::Qdrant;
use qdrant_client::qdrant::{
    CountPointsBuilder, CreateCollectionBuilder, Distance, PointStruct, QueryPointsBuilder,
    ScoredPoint, UpsertPointsBuilder, Value as QdrantValue, VectorParamsBuilder, vectors_config,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bundle::{Contents, is_sha256_digest};
use crate::format::{Chunk, EmbeddingModel};
use crate::recall::IndexError;
use crate::recall_index::{RecallIndex, Recalled, Search, SearchError};

/// Why a Qdrant step failed.
#[derive(Debug, thiserror::Error)]
pub enum QdrantError {
    /// A collection name cannot be made from these parts.
    #[error(
        "no Qdrant collection name for namespace {namespace:?} and digest {digest:?}: {reason}"
    )]
    Name {
        /// The namespace given.
        namespace: String,
        /// The digest given.
        digest: String,
        /// Why.
        reason: &'static str,
    },
    /// The server's address is unusable.
    #[error("Qdrant URL {url:?} is not usable: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// Why.
        reason: &'static str,
    },
    /// The bundle cannot be loaded (no embeddings, a vector that does not fit).
    #[error("the bundle cannot be loaded into Qdrant: {0}")]
    Bundle(String),
    /// The collection exists with other vectors than the bundle's.
    #[error(
        "Qdrant collection {collection:?} holds {got}-dimensional vectors; the bundle's are {want}-dimensional"
    )]
    Dimensions {
        /// The collection.
        collection: String,
        /// The bundle's dimension.
        want: usize,
        /// The collection's.
        got: u64,
    },
    /// After the upserts, the collection does not hold one point per chunk.
    #[error("Qdrant collection {collection:?} holds {got} points after loading {want} chunks")]
    Count {
        /// The collection.
        collection: String,
        /// Chunks loaded.
        want: usize,
        /// Points counted.
        got: u64,
    },
    /// A point's payload is not a chunk of this collection's digest.
    #[error("a point of Qdrant collection {collection:?} is not a chunk of {digest}: {reason}")]
    Payload {
        /// The collection.
        collection: String,
        /// The digest it must hold.
        digest: String,
        /// Why.
        reason: String,
    },
    /// The server refused or did not answer.
    #[error("Qdrant {step} failed: {source}")]
    Server {
        /// What was asked (`create collection`, `upsert`, `count`, `query`, ...).
        step: &'static str,
        /// The client's error.
        #[source]
        source: Box<qdrant_client::QdrantError>,
    },
}

impl QdrantError {
    /// Short label for metrics, Events and conditions.
    pub fn reason(&self) -> &'static str {
        match self {
            QdrantError::Name { .. } => "QdrantName",
            QdrantError::Url { .. } => "QdrantUrl",
            QdrantError::Bundle(_) => "QdrantBundle",
            QdrantError::Dimensions { .. } => "QdrantDimensions",
            QdrantError::Count { .. } => "QdrantIncomplete",
            QdrantError::Payload { .. } => "QdrantPayload",
            QdrantError::Server { .. } => "QdrantUnavailable",
        }
    }

    /// Whether trying again later may succeed (the server; an incomplete load).
    pub fn transient(&self) -> bool {
        matches!(self, QdrantError::Server { .. } | QdrantError::Count { .. })
    }

    fn server(step: &'static str) -> impl FnOnce(qdrant_client::QdrantError) -> QdrantError {
        move |e| QdrantError::Server {
            step,
            source: Box::new(e),
        }
    }
}

/// Prefix of every collection Soma makes.
pub const COLLECTION_PREFIX: &str = "soma";

/// Whether `s` is a Kubernetes namespace name (an RFC 1123 label: at most 63 lowercase
/// letters, digits and `-`, starting and ending with a letter or digit).
fn is_namespace(s: &str) -> bool {
    let b = s.as_bytes();
    let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && b.first().is_some_and(edge)
        && b.last().is_some_and(edge)
        && b.iter().all(|c| edge(c) || *c == b'-')
}

/// The collection of Capsule content `digest` in `namespace`: `soma_<namespace>_sha256_<hex>`
/// (at most 140 characters; `_` never occurs in a namespace, so the name reads back
/// unambiguously). See the module docs for why it carries the namespace.
pub fn collection_name(namespace: &str, digest: &str) -> Result<String, QdrantError> {
    let fail = |reason| QdrantError::Name {
        namespace: namespace.to_owned(),
        digest: digest.to_owned(),
        reason,
    };
    if !is_namespace(namespace) {
        return Err(fail("the namespace is not a Kubernetes namespace name"));
    }
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|_| is_sha256_digest(digest))
        .ok_or_else(|| fail("the digest is not sha256:<64 lowercase hex>"))?;
    Ok(format!("{COLLECTION_PREFIX}_{namespace}_sha256_{hex}"))
}

/// The point id of chunk `chunk_id` of content `digest`: the first 16 bytes of
/// `sha256(len(digest) as u64 LE ‖ digest ‖ chunk_id)` as a UUID (version 8, RFC 9562
/// variant), which Qdrant takes as a point id (the length prefix keeps two different pairs
/// from hashing the same bytes). Stable, so a second load overwrites the same points.
pub fn point_id(digest: &str, chunk_id: &str) -> String {
    let mut h = Sha256::new();
    h.update((digest.len() as u64).to_le_bytes());
    h.update(digest.as_bytes());
    h.update(chunk_id.as_bytes());
    let mut b: [u8; 16] = [0; 16];
    b.copy_from_slice(&h.finalize()[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// What each point carries besides its vector: the chunk and its provenance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkPayload {
    /// The Capsule content's digest (the collection's).
    pub digest: String,
    /// The bundle's `version`.
    pub version: String,
    /// The chunk's place in the bundle's chunk order.
    pub row: usize,
    /// The chunk's id.
    pub chunk: String,
    /// Its document.
    pub document: String,
    /// Byte offset of its first byte in the document.
    pub start: usize,
    /// One past its last byte.
    pub end: usize,
    /// Its text.
    pub text: String,
}

impl ChunkPayload {
    /// The payload of `chunk` at `row`.
    pub fn of(digest: &str, version: &str, row: usize, chunk: &Chunk) -> ChunkPayload {
        ChunkPayload {
            digest: digest.to_owned(),
            version: version.to_owned(),
            row,
            chunk: chunk.id.clone(),
            document: chunk.document.clone(),
            start: chunk.start,
            end: chunk.end,
            text: chunk.text.clone(),
        }
    }

    /// The chunk it carries.
    pub fn into_chunk(self) -> Chunk {
        Chunk {
            id: self.chunk,
            document: self.document,
            start: self.start,
            end: self.end,
            text: self.text,
        }
    }
}

/// The points of a verified bundle's contents: one per chunk, in chunk order, with its id,
/// vector and payload. Refuses a bundle without embeddings, or whose vectors are not one per
/// chunk, of the model's dimension, finite.
pub fn points(contents: &Contents) -> Result<(EmbeddingModel, Vec<PointStruct>), QdrantError> {
    let (Some(model), Some((_, records))) = (&contents.manifest.embedding, &contents.embeddings)
    else {
        return Err(QdrantError::Bundle(
            "it carries no embeddings (pack it with --embeddings and --embedding-model)".to_owned(),
        ));
    };
    if records.len() != contents.chunks.len() {
        return Err(QdrantError::Bundle(format!(
            "{} embeddings for {} chunks",
            records.len(),
            contents.chunks.len()
        )));
    }
    let mut out = Vec::with_capacity(records.len());
    for (row, (chunk, record)) in contents.chunks.iter().zip(records).enumerate() {
        if record.id != chunk.id {
            return Err(QdrantError::Bundle(format!(
                "embedding {row} is of chunk {:?}, the chunk there is {:?}",
                record.id, chunk.id
            )));
        }
        if record.vector.len() != model.dimensions || !record.vector.iter().all(|x| x.is_finite()) {
            return Err(QdrantError::Bundle(format!(
                "the vector of chunk {:?} is not {} finite numbers",
                chunk.id, model.dimensions
            )));
        }
        let payload = serde_json::to_value(ChunkPayload::of(
            &contents.digest,
            &contents.manifest.version,
            row,
            chunk,
        ))
        .map_err(|e| QdrantError::Bundle(e.to_string()))?;
        let payload = qdrant_client::Payload::try_from(payload)
            .map_err(|e| QdrantError::Bundle(e.to_string()))?;
        out.push(PointStruct::new(
            point_id(&contents.digest, &chunk.id),
            record.vector.clone(),
            payload,
        ));
    }
    Ok((model.clone(), out))
}

/// The chunk a query hit carries, checked to be one of `digest` in `collection`.
pub fn recalled(
    collection: &str,
    digest: &str,
    point: ScoredPoint,
) -> Result<Recalled, QdrantError> {
    let fail = |reason: String| QdrantError::Payload {
        collection: collection.to_owned(),
        digest: digest.to_owned(),
        reason,
    };
    let payload: HashMap<String, QdrantValue> = point.payload;
    let json = serde_json::Value::from(qdrant_client::Payload::from(payload));
    let p: ChunkPayload =
        serde_json::from_value(json).map_err(|e| fail(format!("its payload: {e}")))?;
    if p.digest != digest {
        return Err(fail(format!("it is of {}", p.digest)));
    }
    if !point.score.is_finite() {
        return Err(fail("its score is not a finite number".to_owned()));
    }
    Ok(Recalled {
        row: p.row,
        score: point.score,
        chunk: p.into_chunk(),
    })
}

/// How the operator and the sidecar reach Qdrant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QdrantSettings {
    /// The server's gRPC endpoint (`http://qdrant.soma-system:6334`).
    pub url: String,
    /// Per request.
    pub timeout: Duration,
    /// Points per upsert request when loading.
    pub batch: usize,
}

/// Default points per upsert.
pub const UPSERT_BATCH: usize = 256;

impl QdrantSettings {
    /// Settings for `url` with the default timeout (10 s) and batch, the URL checked.
    pub fn new(url: &str) -> Result<QdrantSettings, QdrantError> {
        check_url(url)?;
        Ok(QdrantSettings {
            url: url.to_owned(),
            timeout: Duration::from_secs(10),
            batch: UPSERT_BATCH,
        })
    }

    /// A client (no request is made until one is asked).
    pub fn client(&self) -> Result<Qdrant, QdrantError> {
        Qdrant::from_url(&self.url)
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .skip_compatibility_check()
            .build()
            .map_err(QdrantError::server("client"))
    }
}

/// Checks a Qdrant URL: `http://` or `https://`, a host, no credentials, path, query or
/// fragment (the client speaks gRPC to the server's root; an API key is not taken from a URL).
pub fn check_url(url: &str) -> Result<(), QdrantError> {
    let fail = |reason| {
        Err(QdrantError::Url {
            url: url.to_owned(),
            reason,
        })
    };
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        return fail("it must start with http:// or https://");
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() {
        return fail("it names no host");
    }
    if authority.contains(['/', '?', '#']) {
        return fail("it must be the server's root (no path, query or fragment)");
    }
    if authority.contains('@') {
        return fail("it must not carry credentials");
    }
    if authority
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return fail("it holds whitespace");
    }
    if let Some((host, port)) = authority.rsplit_once(':')
        && !host.ends_with(']')
        && !authority.starts_with('[')
        && (host.is_empty() || port.parse::<u16>().is_err())
    {
        return fail("its port is not a number from 0 to 65535");
    }
    Ok(())
}

/// What a load found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// The collection.
    pub collection: String,
    /// Points it holds (one per chunk).
    pub points: u64,
    /// Whether this load wrote them (false: the collection was already complete).
    pub wrote: bool,
}

/// The vector size of an existing collection, if it has a single unnamed vector.
async fn collection_dims(client: &Qdrant, collection: &str) -> Result<Option<u64>, QdrantError> {
    let info = client
        .collection_info(collection)
        .await
        .map_err(QdrantError::server("collection info"))?;
    Ok(info
        .result
        .and_then(|r| r.config)
        .and_then(|c| c.params)
        .and_then(|p| p.vectors_config)
        .and_then(|v| v.config)
        .and_then(|c| match c {
            vectors_config::Config::Params(p) => Some(p.size),
            vectors_config::Config::ParamsMap(_) => None,
        }))
}

/// The exact number of points in `collection`.
pub async fn count(client: &Qdrant, collection: &str) -> Result<u64, QdrantError> {
    Ok(client
        .count(CountPointsBuilder::new(collection).exact(true))
        .await
        .map_err(QdrantError::server("count"))?
        .result
        .map(|r| r.count)
        .unwrap_or(0))
}

/// Loads a verified bundle's chunks into `collection`, idempotently: creates it (cosine, the
/// model's dimension) unless it exists with that dimension, leaves it alone when it already
/// holds one point per chunk, otherwise upserts every point (same ids, same payloads) in
/// batches and checks the exact count. A collection of another dimension is an error, never
/// overwritten.
pub async fn load(
    client: &Qdrant,
    settings: &QdrantSettings,
    collection: &str,
    contents: &Contents,
) -> Result<Loaded, QdrantError> {
    let (model, points) = points(contents)?;
    let want = points.len();
    let exists = client
        .collection_exists(collection)
        .await
        .map_err(QdrantError::server("collection exists"))?;
    if exists {
        match collection_dims(client, collection).await? {
            Some(d) if d == model.dimensions as u64 => {}
            got => {
                return Err(QdrantError::Dimensions {
                    collection: collection.to_owned(),
                    want: model.dimensions,
                    got: got.unwrap_or(0),
                });
            }
        }
        let have = count(client, collection).await?;
        if have == want as u64 {
            return Ok(Loaded {
                collection: collection.to_owned(),
                points: have,
                wrote: false,
            });
        }
    } else {
        client
            .create_collection(CreateCollectionBuilder::new(collection).vectors_config(
                VectorParamsBuilder::new(model.dimensions as u64, Distance::Cosine),
            ))
            .await
            .map_err(QdrantError::server("create collection"))?;
    }
    for batch in upserts(collection, points, settings.batch) {
        client
            .upsert_points(batch)
            .await
            .map_err(QdrantError::server("upsert"))?;
    }
    let got = count(client, collection).await?;
    if got != want as u64 {
        return Err(QdrantError::Count {
            collection: collection.to_owned(),
            want,
            got,
        });
    }
    Ok(Loaded {
        collection: collection.to_owned(),
        points: got,
        wrote: true,
    })
}

/// The upsert requests of `points`, `batch` at a time (at least one per request), each
/// waiting until the server has applied it.
pub fn upserts(
    collection: &str,
    points: Vec<PointStruct>,
    batch: usize,
) -> Vec<qdrant_client::qdrant::UpsertPoints> {
    let batch = batch.max(1);
    let mut out = Vec::new();
    let mut rest = points.into_iter().peekable();
    while rest.peek().is_some() {
        let chunk: Vec<PointStruct> = rest.by_ref().take(batch).collect();
        out.push(
            UpsertPointsBuilder::new(collection, chunk)
                .wait(true)
                .build(),
        );
    }
    out
}

/// The query of the `k` points nearest `vector`, with their payloads, without their vectors.
pub fn query(collection: &str, vector: &[f32], k: usize) -> qdrant_client::qdrant::QueryPoints {
    QueryPointsBuilder::new(collection)
        .query(vector.to_vec())
        .limit(k as u64)
        .with_payload(true)
        .with_vectors(false)
        .build()
}

/// A Capsule's collection, searched by a sidecar.
pub struct QdrantIndex {
    client: Qdrant,
    collection: String,
    digest: String,
    dims: usize,
    chunks: usize,
    /// Set once the exact count has matched `chunks` (a loaded collection only grows by a
    /// reload of the same points).
    complete: AtomicBool,
}

impl std::fmt::Debug for QdrantIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QdrantIndex")
            .field("collection", &self.collection)
            .field("digest", &self.digest)
            .field("dims", &self.dims)
            .field("chunks", &self.chunks)
            .finish()
    }
}

impl QdrantIndex {
    /// The index of content `digest` (`chunks` chunks of `dims` dimensions) in `collection`.
    /// No request is made until the first search.
    pub fn new(
        settings: &QdrantSettings,
        collection: &str,
        digest: &str,
        dims: usize,
        chunks: usize,
    ) -> Result<QdrantIndex, QdrantError> {
        Ok(QdrantIndex {
            client: settings.client()?,
            collection: collection.to_owned(),
            digest: digest.to_owned(),
            dims,
            chunks,
            complete: AtomicBool::new(false),
        })
    }

    /// The collection.
    pub fn collection(&self) -> &str {
        &self.collection
    }

    async fn search_remote(&self, query: &[f32], k: usize) -> Result<Vec<Recalled>, SearchError> {
        if query.len() != self.dims {
            return Err(SearchError::Query(IndexError::Dimensions {
                want: self.dims,
                got: query.len(),
            }));
        }
        if !query.iter().all(|x| x.is_finite()) {
            return Err(SearchError::Query(IndexError::NotFinite));
        }
        if k == 0 {
            return Ok(Vec::new());
        }
        let unavailable = |e: QdrantError| SearchError::Unavailable(e.to_string());
        if !self.complete.load(Ordering::Acquire) {
            let got = match count(&self.client, &self.collection).await {
                Ok(n) => n,
                Err(e) => {
                    return Err(SearchError::Unavailable(format!(
                        "its Qdrant collection {:?} is not loaded yet or cannot be read: {e}",
                        self.collection
                    )));
                }
            };
            if got != self.chunks as u64 {
                return Err(SearchError::Unavailable(format!(
                    "its Qdrant collection {:?} holds {got} of {} chunks (the operator has not finished loading it)",
                    self.collection, self.chunks
                )));
            }
            self.complete.store(true, Ordering::Release);
        }
        let answer = self
            .client
            .query(self::query(&self.collection, query, k))
            .await
            .map_err(|e| unavailable(QdrantError::server("query")(e)))?;
        let mut hits = answer
            .result
            .into_iter()
            .map(|p| recalled(&self.collection, &self.digest, p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(unavailable)?;
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.row.cmp(&b.row)));
        hits.truncate(k);
        Ok(hits)
    }
}

impl RecallIndex for QdrantIndex {
    fn kind(&self) -> &'static str {
        "qdrant"
    }

    fn dims(&self) -> usize {
        self.dims
    }

    fn local_rows(&self) -> usize {
        0
    }

    fn search<'a>(&'a self, query: &'a [f32], k: usize) -> Search<'a> {
        Box::pin(self.search_remote(query, k))
    }
}

#[cfg(test)]
mod tests;
