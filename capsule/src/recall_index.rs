//! The one interface recall searches a Capsule through, whatever holds its vectors: the
//! embedded index built in the sidecar at load ([`Embedded`]: exact, or HNSW when large), or a
//! Qdrant collection the operator loaded (`crate::qdrant::QdrantIndex`, feature `qdrant`).
//!
//! ```text
//!  sidecar recall ─► dyn RecallIndex::search(query, k) ─► Vec<Recalled {row, score, chunk}>
//!                       ├─ Embedded: Index (exact / HNSW) over the delivered folder's vectors
//!                       └─ QdrantIndex: a query to the Capsule's collection (payload = chunk)
//! ```
//!
//! Every hit carries its chunk (id, document, offsets, text) and its row (the chunk's place
//! in the bundle's chunk order), so the caller adds the same provenance (Capsule, version,
//! digest) to every result, and orders ties alike, whichever index answered.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use crate::format::Chunk;
use crate::index::Index;
use crate::recall::IndexError;

/// One result of a search.
#[derive(Clone, Debug, PartialEq)]
pub struct Recalled {
    /// The chunk's place in the bundle's chunk order.
    pub row: usize,
    /// Cosine similarity to the query, in `[-1, 1]`.
    pub score: f32,
    /// The chunk.
    pub chunk: Chunk,
}

/// Why a search gave no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SearchError {
    /// The query vector does not fit the index (dimension, non-finite number).
    #[error(transparent)]
    Query(#[from] IndexError),
    /// The index cannot answer now (a collection not loaded yet, a server that did not
    /// answer, points that are not this Capsule's): the message says which.
    #[error("{0}")]
    Unavailable(String),
}

/// A search in progress.
pub type Search<'a> = Pin<Box<dyn Future<Output = Result<Vec<Recalled>, SearchError>> + Send + 'a>>;

/// A Capsule's searchable vectors.
pub trait RecallIndex: fmt::Debug + Send + Sync {
    /// `"exact"`, `"hnsw"` or `"qdrant"`, for logs and metrics.
    fn kind(&self) -> &'static str;
    /// The vectors' dimension (a query vector must have it).
    fn dims(&self) -> usize;
    /// The rows this process scans when searching (0 for an index held by a server): the
    /// caller moves large local searches off its async threads.
    fn local_rows(&self) -> usize;
    /// The `k` chunks most similar to `query`, best first (ties: lower row first).
    fn search<'a>(&'a self, query: &'a [f32], k: usize) -> Search<'a>;
}

/// The embedded index and the chunks its rows are.
#[derive(Debug)]
pub struct Embedded {
    index: Index,
    chunks: Vec<Chunk>,
}

impl Embedded {
    /// Pairs an index with its chunks (one per row, in row order).
    pub fn new(index: Index, chunks: Vec<Chunk>) -> Result<Embedded, SearchError> {
        if index.len() != chunks.len() {
            return Err(SearchError::Unavailable(format!(
                "the index has {} rows for {} chunks",
                index.len(),
                chunks.len()
            )));
        }
        Ok(Embedded { index, chunks })
    }

    /// The index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The search, done now on this thread.
    pub fn search_now(&self, query: &[f32], k: usize) -> Result<Vec<Recalled>, SearchError> {
        Ok(self
            .index
            .search(query, k)?
            .into_iter()
            .filter_map(|h| {
                Some(Recalled {
                    row: h.row,
                    score: h.score,
                    chunk: self.chunks.get(h.row)?.clone(),
                })
            })
            .collect())
    }
}

impl RecallIndex for Embedded {
    fn kind(&self) -> &'static str {
        self.index.kind()
    }

    fn dims(&self) -> usize {
        self.index.dims()
    }

    fn local_rows(&self) -> usize {
        self.index.len()
    }

    fn search<'a>(&'a self, query: &'a [f32], k: usize) -> Search<'a> {
        Box::pin(std::future::ready(self.search_now(query, k)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::index::IndexParams;

    fn chunk(i: usize) -> Chunk {
        Chunk {
            id: format!("doc.md#{i}"),
            document: "doc.md".to_owned(),
            start: i * 10,
            end: i * 10 + 10,
            text: format!("chunk {i} about topic {}", i % 7),
        }
    }

    #[test]
    fn the_embedded_index_answers_with_the_chunks_of_its_rows() {
        let chunks: Vec<Chunk> = (0..40).map(chunk).collect();
        let vectors: Vec<Vec<f32>> = chunks
            .iter()
            .map(|c| crate::hashed::embed(&c.text, 32))
            .collect();
        let index = Index::build(
            32,
            vectors.iter().map(Vec::as_slice),
            &IndexParams::default(),
        )
        .unwrap();
        let embedded = Embedded::new(index, chunks.clone()).unwrap();
        let dynamic: &dyn RecallIndex = &embedded;
        assert_eq!(
            (dynamic.kind(), dynamic.dims(), dynamic.local_rows()),
            ("exact", 32, 40)
        );
        let hits = embedded.search_now(&vectors[12], 3).unwrap();
        assert_eq!(hits[0].row, 12);
        assert_eq!(hits[0].chunk, chunks[12]);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        assert_eq!(
            embedded.search_now(&[1.0; 31], 3).unwrap_err(),
            SearchError::Query(IndexError::Dimensions { want: 32, got: 31 })
        );
        let short = Index::build(
            32,
            vectors[..3].iter().map(Vec::as_slice),
            &IndexParams::default(),
        )
        .unwrap();
        assert!(Embedded::new(short, chunks).is_err());
    }
}
