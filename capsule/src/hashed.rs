//! `soma-hash-<d>`: a deterministic, dependency-free text embedder (feature hashing of word
//! unigrams and bigrams into `d` signed buckets, sublinear term frequency, L2-normalised).
//!
//! It is **lexical, not semantic**: two texts are close when they share words, not when they
//! mean the same. It exists so that tests and `bench/capsule-recall` have real vectors that
//! both sides agree on without model weights: the fake upstream answers `/v1/embeddings` for a
//! model named `soma-hash-<d>` with it, and the benchmark embeds its corpus with the same
//! function. A production Capsule is embedded by a real model (`--embedding-model`), and the
//! sidecar embeds queries through the provider with that model.

/// The model name for `dims` dimensions.
pub fn model_name(dims: usize) -> String {
    format!("soma-hash-{dims}")
}

/// The dimension a `soma-hash-<d>` model name asks for.
pub fn dims_of(model: &str) -> Option<usize> {
    model
        .strip_prefix("soma-hash-")?
        .parse()
        .ok()
        .filter(|d| (1..=4096).contains(d))
}

fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The embedding of `text` in `dims` dimensions (all zero for text without words).
pub fn embed(text: &str, dims: usize) -> Vec<f32> {
    let mut v = vec![0f32; dims];
    if dims == 0 {
        return v;
    }
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let mut counts: std::collections::BTreeMap<u64, f32> = std::collections::BTreeMap::new();
    for w in &words {
        *counts.entry(fnv1a(w.as_bytes(), 0)).or_default() += 1.0;
    }
    for pair in words.windows(2) {
        let joined = format!("{} {}", pair[0], pair[1]);
        // Bigrams weigh half a word: they sharpen, words carry.
        *counts.entry(fnv1a(joined.as_bytes(), 1)).or_default() += 0.5;
    }
    for (h, tf) in counts {
        let bucket = (h % dims as u64) as usize;
        let sign = if (h >> 63) == 1 { -1.0 } else { 1.0 };
        v[bucket] += sign * (1.0 + tf.ln().max(0.0));
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut v {
            *x /= norm;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn deterministic_normalised_and_lexical() {
        let a = embed("The quick brown fox", 64);
        assert_eq!(a, embed("the QUICK brown fox!", 64));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f32>();
        let near = embed("a quick brown fox jumps", 64);
        let far = embed("ledger outbox settlement", 64);
        assert!(dot(&a, &near) > dot(&a, &far));
        assert!(embed("  ...  ", 8).iter().all(|x| *x == 0.0));
        assert_eq!(dims_of(&model_name(384)), Some(384));
        assert_eq!(dims_of("text-embedding-3-small"), None);
        assert_eq!(dims_of("soma-hash-0"), None);
    }
}
