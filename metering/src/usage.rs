//! Token usage as the provider reports it, normalised across OpenAI and Anthropic.

use serde::{Deserialize, Serialize};

/// Tokens one call used.
///
/// `input_tokens` counts every prompt token, cached or not; `cached_input_tokens` and
/// `cache_write_input_tokens` are the parts of it read from or written to the provider's
/// prompt cache. `reasoning_tokens` is the part of `output_tokens` spent on hidden reasoning
/// (OpenAI bills it as output, so it is informational).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// All prompt tokens.
    pub input_tokens: u64,
    /// Prompt tokens served from the provider's cache.
    pub cached_input_tokens: u64,
    /// Prompt tokens written to the provider's cache (Anthropic `cache_creation_input_tokens`).
    pub cache_write_input_tokens: u64,
    /// Generated tokens, reasoning included.
    pub output_tokens: u64,
    /// Generated tokens spent on reasoning (part of `output_tokens`).
    pub reasoning_tokens: u64,
}

impl Usage {
    /// Input plus output: what token caps count.
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }

    /// Prompt tokens billed at the plain input price.
    pub fn uncached_input_tokens(&self) -> u64 {
        self.input_tokens
            .saturating_sub(self.cached_input_tokens)
            .saturating_sub(self.cache_write_input_tokens)
    }
}
