//! Token usage as the provider reports it, normalised across OpenAI and Anthropic.

use serde::{Deserialize, Serialize};

/// What one call used.
///
/// `input_tokens` counts every prompt token, cached or not; `cached_input_tokens` and
/// `cache_write_input_tokens` are the parts of it read from or written to the provider's
/// prompt cache, and `cache_write_1h_input_tokens` is the part of the writes kept for an hour
/// (Anthropic's dearer cache TTL). `reasoning_tokens` is the part of `output_tokens` spent on
/// hidden reasoning (billed as output, so it is informational). `web_search_requests` and
/// `web_fetch_requests` count server-tool uses the provider bills per use, on top of tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// All prompt tokens.
    pub input_tokens: u64,
    /// Prompt tokens served from the provider's cache.
    pub cached_input_tokens: u64,
    /// Prompt tokens written to the provider's cache (Anthropic `cache_creation_input_tokens`,
    /// OpenAI responses `cache_write_tokens`).
    pub cache_write_input_tokens: u64,
    /// The part of `cache_write_input_tokens` written with a one-hour lifetime.
    #[serde(default)]
    pub cache_write_1h_input_tokens: u64,
    /// Generated tokens, reasoning included.
    pub output_tokens: u64,
    /// Generated tokens spent on reasoning (part of `output_tokens`).
    pub reasoning_tokens: u64,
    /// Web searches the provider ran for the call (Anthropic `server_tool_use`, OpenAI
    /// `web_search_call` items).
    #[serde(default)]
    pub web_search_requests: u64,
    /// Web pages the provider fetched for the call (Anthropic `web_fetch` server tool).
    #[serde(default)]
    pub web_fetch_requests: u64,
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

    /// Cache writes with the default (short) lifetime.
    pub fn cache_write_short_input_tokens(&self) -> u64 {
        self.cache_write_input_tokens
            .saturating_sub(self.cache_write_1h_input_tokens)
    }

    /// The sum of two calls' usage (Anthropic compaction bills each iteration).
    pub fn plus(&self, o: &Usage) -> Usage {
        Usage {
            input_tokens: self.input_tokens.saturating_add(o.input_tokens),
            cached_input_tokens: self
                .cached_input_tokens
                .saturating_add(o.cached_input_tokens),
            cache_write_input_tokens: self
                .cache_write_input_tokens
                .saturating_add(o.cache_write_input_tokens),
            cache_write_1h_input_tokens: self
                .cache_write_1h_input_tokens
                .saturating_add(o.cache_write_1h_input_tokens),
            output_tokens: self.output_tokens.saturating_add(o.output_tokens),
            reasoning_tokens: self.reasoning_tokens.saturating_add(o.reasoning_tokens),
            web_search_requests: self
                .web_search_requests
                .saturating_add(o.web_search_requests),
            web_fetch_requests: self.web_fetch_requests.saturating_add(o.web_fetch_requests),
        }
    }
}
