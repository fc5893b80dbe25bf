//! Exact cosine search over one Capsule's chunk vectors: the index of small Capsules, the
//! rows (and the re-scoring) of the approximate one, and the peer `bench/capsule-recall`
//! measures the approximate index against. `crate::index::Index` chooses between them.
//!
//! Vectors are L2-normalised once at build and kept in one contiguous row-major `f32` array,
//! so a query is one normalisation and a dot product per row, then a bounded top-k selection:
//! recall@k is 1 by construction, the index builds in one pass with no parameters to tune, and
//! two sidecars always answer alike.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// One result: a row of the index and its cosine similarity to the query.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    /// The row (the chunk's position in the Capsule's chunk order).
    pub row: usize,
    /// Cosine similarity, in `[-1, 1]`.
    pub score: f32,
}

/// Why a query or a build was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// A vector of another length than the index's.
    #[error("the vector has {got} dimensions, the index {want}")]
    Dimensions {
        /// The index's dimension.
        want: usize,
        /// The vector's.
        got: usize,
    },
    /// NaN or infinity.
    #[error("the vector holds a number that is not finite")]
    NotFinite,
}

/// Exact cosine index over fixed-length vectors.
#[derive(Clone, Debug, Default)]
pub struct ExactIndex {
    dims: usize,
    rows: usize,
    data: Vec<f32>,
}

fn normalised(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter().map(|x| x / norm).collect()
    } else {
        v.to_vec()
    }
}

/// Dot product of two slices of one length.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight lanes the compiler vectorises; the tail is summed plainly.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Heap entry ordered so that the heap's top is the worst hit kept (lowest score; among equal
/// scores, the highest row), which a better candidate replaces.
#[derive(Clone, Copy, PartialEq)]
struct Kept(Hit);

impl Eq for Kept {}
impl Ord for Kept {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .0
            .score
            .total_cmp(&self.0.score)
            .then(self.0.row.cmp(&other.0.row))
    }
}
impl PartialOrd for Kept {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl ExactIndex {
    /// Builds the index of `vectors` (all of length `dims`, finite).
    pub fn build<'a>(
        dims: usize,
        vectors: impl IntoIterator<Item = &'a [f32]>,
    ) -> Result<ExactIndex, IndexError> {
        let mut data = Vec::new();
        let mut rows = 0;
        for v in vectors {
            check(dims, v)?;
            data.extend(normalised(v));
            rows += 1;
        }
        Ok(ExactIndex { dims, rows, data })
    }

    /// The vectors' dimension.
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether it holds no row.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Row `row`, normalised.
    pub(crate) fn row(&self, row: usize) -> Option<&[f32]> {
        self.data
            .get(row.checked_mul(self.dims)?..(row + 1).checked_mul(self.dims)?)
    }

    /// `query` checked against the index's dimension and normalised.
    pub(crate) fn normalised_query(&self, query: &[f32]) -> Result<Vec<f32>, IndexError> {
        check(self.dims, query)?;
        Ok(normalised(query))
    }

    /// The `k` rows most similar to `query`, best first (ties: lower row first).
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>, IndexError> {
        let q = self.normalised_query(query)?;
        let mut heap: BinaryHeap<Kept> = BinaryHeap::with_capacity(k + 1);
        if k == 0 || self.dims == 0 {
            return Ok(Vec::new());
        }
        for (row, v) in self.data.chunks_exact(self.dims).enumerate() {
            let hit = Kept(Hit {
                row,
                score: dot(&q, v),
            });
            if heap.len() < k {
                heap.push(hit);
            } else if let Some(worst) = heap.peek()
                && hit < *worst
            {
                heap.pop();
                heap.push(hit);
            }
        }
        let mut out: Vec<Hit> = heap.into_iter().map(|k| k.0).collect();
        sort_hits(&mut out);
        Ok(out)
    }
}

/// Sorts hits best first: higher score, then lower row.
pub fn sort_hits(hits: &mut [Hit]) {
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.row.cmp(&b.row)));
}

fn check(dims: usize, v: &[f32]) -> Result<(), IndexError> {
    if v.len() != dims {
        return Err(IndexError::Dimensions {
            want: dims,
            got: v.len(),
        });
    }
    if !v.iter().all(|x| x.is_finite()) {
        return Err(IndexError::NotFinite);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The top-k by sorting every score: what the heap must agree with.
    fn brute(vectors: &[Vec<f32>], q: &[f32], k: usize) -> Vec<usize> {
        let q = normalised(q);
        let mut hits: Vec<Hit> = vectors
            .iter()
            .enumerate()
            .map(|(row, v)| Hit {
                row,
                score: dot(&q, &normalised(v)),
            })
            .collect();
        sort_hits(&mut hits);
        hits.into_iter().take(k).map(|h| h.row).collect()
    }

    #[test]
    fn top_k_is_the_sorted_prefix() {
        let texts: Vec<String> = (0..300)
            .map(|i| format!("chunk {} about topic {} and {}", i, i % 17, i % 5))
            .collect();
        let vectors: Vec<Vec<f32>> = texts.iter().map(|t| crate::hashed::embed(t, 32)).collect();
        let index = ExactIndex::build(32, vectors.iter().map(Vec::as_slice)).unwrap();
        assert_eq!(index.len(), 300);
        for q in ["topic 3", "chunk 42", "and 4", "nothing in common"] {
            let qv = crate::hashed::embed(q, 32);
            for k in [1, 10, 299, 300, 1000] {
                let got: Vec<usize> = index
                    .search(&qv, k)
                    .unwrap()
                    .iter()
                    .map(|h| h.row)
                    .collect();
                assert_eq!(got, brute(&vectors, &qv, k), "{q} k={k}");
            }
        }
        let hits = index
            .search(&crate::hashed::embed("chunk 42 about", 32), 3)
            .unwrap();
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    }

    #[test]
    fn wrong_vectors_are_refused() {
        assert_eq!(
            ExactIndex::build(3, [[1.0f32, 0.0].as_slice()]).unwrap_err(),
            IndexError::Dimensions { want: 3, got: 2 }
        );
        assert_eq!(
            ExactIndex::build(2, [[f32::NAN, 0.0].as_slice()]).unwrap_err(),
            IndexError::NotFinite
        );
        let index = ExactIndex::build(2, [[1.0f32, 0.0].as_slice()]).unwrap();
        assert!(index.search(&[1.0, 0.0, 0.0], 1).is_err());
        assert!(index.search(&[1.0, f32::INFINITY], 1).is_err());
        assert!(index.search(&[0.0, 1.0], 0).unwrap().is_empty());
    }
}
