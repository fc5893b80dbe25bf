//! The one recall interface over a Capsule's chunk vectors: exact search for small Capsules,
//! an HNSW graph (approximate nearest neighbours, the `hnsw_rs` crate) above a row threshold.
//!
//! ```text
//!  vectors ──Index::build(params)──► rows ≤ approximate_above_rows ─► Exact (full cosine scan)
//!                                   rows >  approximate_above_rows ─► Approximate (ExactIndex + HNSW graph)
//!  query ──Index::search(k)──► Approximate: graph walk (ef) → candidate rows → exact cosine re-score
//! ```
//!
//! Why both. A full scan costs about 40 ns per row at 256 dimensions on one core (so ~0.8 ms at
//! 20,000 rows), needs no build and is always right; a graph answers in tens of microseconds at
//! any size but costs a build at load (seconds for tens of thousands of rows, on one thread),
//! twice the vectors' memory, and misses some true neighbours (`bench/capsule-recall` measures
//! how many). So Capsules up to `approximate_above_rows` rows are scanned.
//!
//! The approximate index keeps the exact rows: the graph only proposes candidates, every hit is
//! re-scored by the same cosine as the exact index, so a hit's score never depends on which
//! index found it, and results are ordered alike (higher score, then lower row). The graph is
//! built on one thread with `hnsw_rs`'s fixed layer seed, so two sidecars holding the same
//! Capsule build the same graph and answer alike.

use std::fmt;

use hnsw_rs::anndists::dist::Distance;
use hnsw_rs::hnsw::Hnsw;

use crate::recall::{ExactIndex, Hit, IndexError, dot, sort_hits};

/// How an index is built and searched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexParams {
    /// A Capsule with more rows than this gets the graph; up to it, exact search.
    pub approximate_above_rows: usize,
    /// Links kept per node and layer (HNSW's `M`; the bottom layer keeps twice as many).
    pub connections: usize,
    /// Candidates examined per insertion (`efConstruction`).
    pub ef_construction: usize,
    /// Candidates examined per query (`ef`; at least `k` is used).
    pub ef_search: usize,
}

/// Capsules with more chunks than this are searched through the graph (see the module docs).
pub const APPROXIMATE_ABOVE_ROWS: usize = 20_000;
/// Default `ef` per query.
pub const EF_SEARCH: usize = 64;

impl Default for IndexParams {
    fn default() -> Self {
        IndexParams {
            approximate_above_rows: APPROXIMATE_ABOVE_ROWS,
            connections: 16,
            ef_construction: 100,
            ef_search: EF_SEARCH,
        }
    }
}

/// `1 - cos` of two unit vectors, never negative (rounding can make a dot product of a vector
/// with itself exceed 1; `anndists`' own `DistDot` asserts on that).
#[derive(Clone, Copy, Default)]
struct UnitCosine;

impl Distance<f32> for UnitCosine {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

/// Exact rows plus an HNSW graph over them.
pub struct ApproximateIndex {
    exact: ExactIndex,
    graph: Hnsw<'static, f32, UnitCosine>,
    ef_search: usize,
}

impl fmt::Debug for ApproximateIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApproximateIndex")
            .field("rows", &self.exact.len())
            .field("dims", &self.exact.dims())
            .field("connections", &self.graph.get_max_nb_connection())
            .field("ef_construction", &self.graph.get_ef_construction())
            .field("ef_search", &self.ef_search)
            .finish()
    }
}

/// Layers the graph may use (`hnsw_rs` caps it at 16; at `M` = 16 that is far more than
/// any Capsule needs).
const MAX_LAYERS: usize = 16;

impl ApproximateIndex {
    /// Builds the graph over the (already checked and normalised) rows of `exact`.
    pub fn build(exact: ExactIndex, params: &IndexParams) -> ApproximateIndex {
        let graph = Hnsw::new(
            params.connections.clamp(2, 255),
            exact.len(),
            MAX_LAYERS,
            params.ef_construction.max(params.connections),
            UnitCosine,
        );
        for row in 0..exact.len() {
            if let Some(v) = exact.row(row) {
                graph.insert_slice((v, row));
            }
        }
        ApproximateIndex {
            exact,
            graph,
            ef_search: params.ef_search.max(1),
        }
    }

    /// The `k` rows the graph finds nearest to `query`, best first (ties: lower row first),
    /// each scored by exact cosine. `ef` overrides the index's `ef_search` (benchmarks tune it).
    pub fn search_with(
        &self,
        query: &[f32],
        k: usize,
        ef: Option<usize>,
    ) -> Result<Vec<Hit>, IndexError> {
        let q = self.exact.normalised_query(query)?;
        if k == 0 || self.exact.is_empty() {
            return Ok(Vec::new());
        }
        if k >= self.exact.len() {
            // Every row is asked for: the scan is the answer, and cheaper than the walk.
            return self.exact.search(query, k);
        }
        let ef = ef.unwrap_or(self.ef_search).max(k);
        let mut hits: Vec<Hit> = self
            .graph
            .search(&q, k, ef)
            .into_iter()
            .filter_map(|n| {
                Some(Hit {
                    row: n.d_id,
                    score: dot(&q, self.exact.row(n.d_id)?),
                })
            })
            .collect();
        sort_hits(&mut hits);
        hits.truncate(k);
        Ok(hits)
    }
}

/// A Capsule's index: exact or approximate, chosen by size at build.
#[derive(Debug)]
pub enum Index {
    /// Full cosine scan.
    Exact(ExactIndex),
    /// HNSW graph, candidates re-scored exactly.
    Approximate(ApproximateIndex),
}

impl Index {
    /// Builds the index of `vectors` (all of length `dims`, finite): exact up to
    /// `params.approximate_above_rows` rows, the graph above.
    pub fn build<'a>(
        dims: usize,
        vectors: impl IntoIterator<Item = &'a [f32]>,
        params: &IndexParams,
    ) -> Result<Index, IndexError> {
        let exact = ExactIndex::build(dims, vectors)?;
        // Zero-length vectors have no neighbourhood to walk.
        Ok(if exact.len() > params.approximate_above_rows && dims > 0 {
            Index::Approximate(ApproximateIndex::build(exact, params))
        } else {
            Index::Exact(exact)
        })
    }

    fn exact(&self) -> &ExactIndex {
        match self {
            Index::Exact(e) => e,
            Index::Approximate(a) => &a.exact,
        }
    }

    /// `"exact"` or `"hnsw"`, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Index::Exact(_) => "exact",
            Index::Approximate(_) => "hnsw",
        }
    }

    /// The vectors' dimension.
    pub fn dims(&self) -> usize {
        self.exact().dims()
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.exact().len()
    }

    /// Whether it holds no row.
    pub fn is_empty(&self) -> bool {
        self.exact().is_empty()
    }

    /// The `k` rows most similar to `query` (approximately, for the graph), best first.
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>, IndexError> {
        match self {
            Index::Exact(e) => e.search(query, k),
            Index::Approximate(a) => a.search_with(query, k, None),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn corpus(n: usize, dims: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| {
                crate::hashed::embed(
                    &format!(
                        "chunk {i} about topic {} near {} and {} of {}",
                        i % 37,
                        i % 11,
                        i % 5,
                        i / 50
                    ),
                    dims,
                )
            })
            .collect()
    }

    fn rows(hits: &[Hit]) -> Vec<usize> {
        hits.iter().map(|h| h.row).collect()
    }

    #[test]
    fn the_threshold_picks_the_index() {
        let v = corpus(50, 16);
        let build = |above| {
            Index::build(
                16,
                v.iter().map(Vec::as_slice),
                &IndexParams {
                    approximate_above_rows: above,
                    ..IndexParams::default()
                },
            )
            .unwrap()
        };
        assert_eq!(build(50).kind(), "exact");
        assert_eq!(build(49).kind(), "hnsw");
        let empty = Index::build(16, std::iter::empty(), &IndexParams::default()).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.kind(), "exact");
        let none = IndexParams {
            approximate_above_rows: 0,
            ..IndexParams::default()
        };
        assert!(
            Index::build(16, std::iter::empty(), &none)
                .unwrap()
                .search(&[0.5; 16], 3)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn the_graph_finds_what_the_scan_finds_and_scores_alike() {
        let dims = 64;
        let v = corpus(2_000, dims);
        let exact = ExactIndex::build(dims, v.iter().map(Vec::as_slice)).unwrap();
        let params = IndexParams {
            approximate_above_rows: 0,
            ..IndexParams::default()
        };
        let graph = Index::build(dims, v.iter().map(Vec::as_slice), &params).unwrap();
        assert_eq!(
            (graph.kind(), graph.len(), graph.dims()),
            ("hnsw", 2_000, dims)
        );
        let (mut found, mut asked) = (0, 0);
        for q in 0..100 {
            let qv = crate::hashed::embed(&format!("topic {} near {}", q % 37, q % 11), dims);
            let want = exact.search(&qv, 10).unwrap();
            let got = graph.search(&qv, 10).unwrap();
            assert_eq!(got.len(), 10);
            assert!(got.windows(2).all(|w| w[0].score >= w[1].score));
            // A hit found by both carries the same score: the graph only proposes rows.
            for h in &got {
                if let Some(w) = want.iter().find(|w| w.row == h.row) {
                    assert_eq!(w.score, h.score);
                }
            }
            found += rows(&got)
                .iter()
                .filter(|r| rows(&want).contains(r))
                .count();
            asked += 10;
        }
        // Not exact by design; on this small corpus it should lose almost nothing.
        assert!(found * 100 >= asked * 95, "recall@10 {found}/{asked}");
        // Asking for every row scans.
        let all = graph.search(&v[7], 2_000).unwrap();
        assert_eq!(rows(&all), rows(&exact.search(&v[7], 2_000).unwrap()));
    }

    #[test]
    fn two_builds_answer_alike_and_bad_queries_are_refused() {
        let dims = 32;
        let v = corpus(600, dims);
        let params = IndexParams {
            approximate_above_rows: 10,
            ..IndexParams::default()
        };
        let a = Index::build(dims, v.iter().map(Vec::as_slice), &params).unwrap();
        let b = Index::build(dims, v.iter().map(Vec::as_slice), &params).unwrap();
        for q in v.iter().step_by(37) {
            assert_eq!(a.search(q, 10).unwrap(), b.search(q, 10).unwrap());
            // A vector is its own nearest neighbour (score 1 despite rounding, no panic).
            let hits = a.search(q, 1).unwrap();
            assert!((hits[0].score - 1.0).abs() < 1e-5);
        }
        assert_eq!(
            a.search(&[1.0; 31], 3).unwrap_err(),
            IndexError::Dimensions { want: 32, got: 31 }
        );
        let mut nan = vec![0.0; 32];
        nan[3] = f32::NAN;
        assert_eq!(a.search(&nan, 3).unwrap_err(), IndexError::NotFinite);
        assert!(a.search(&v[0], 0).unwrap().is_empty());
        assert_eq!(
            Index::build(dims, [[1.0f32; 4].as_slice()], &params).unwrap_err(),
            IndexError::Dimensions { want: 32, got: 4 }
        );
    }
}
