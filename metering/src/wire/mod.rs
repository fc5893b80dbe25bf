//! The providers' own usage numbers, read from response bodies and from SSE streams, and what
//! of them the sidecar does not meter.
//!
//! | source | where usage is |
//! | --- | --- |
//! | OpenAI chat/completions, completions, embeddings | `usage.prompt_tokens`, `completion_tokens`, `prompt_tokens_details.cached_tokens`, `completion_tokens_details.reasoning_tokens`; OpenAI-compatible `prompt_cache_hit_tokens` when `cached_tokens` is absent |
//! | OpenAI responses | `usage.input_tokens`, `output_tokens`, `input_tokens_details.cached_tokens` and `.cache_write_tokens`, `output_tokens_details.reasoning_tokens`; web searches from `tool_usage.web_search.num_requests` or the `web_search_call` output items |
//! | OpenAI streams | the chunk carrying `usage` (the extra `choices: []` chunk with `stream_options.include_usage`, or the finish chunk of some compatible providers); responses: `response.completed` (also `.incomplete`, `.failed`) |
//! | Anthropic messages | `usage.input_tokens` (uncached only), `cache_read_input_tokens`, `cache_creation_input_tokens` (its one-hour part in `cache_creation.ephemeral_1h_input_tokens`), `output_tokens`, `server_tool_use.web_search_requests` / `web_fetch_requests`; with compaction, the sum of `usage.iterations[]` |
//! | Anthropic streams | `message_start.message.usage`, then `message_delta.usage` (cumulative; a field it carries replaces the start's) |
//!
//! A stream that ends without its usage (client gone, upstream cut) is metered from what was
//! delivered: the prompt estimate plus the tokenised text that reached the client, flagged
//! `estimated`.

mod info;
mod stream;
mod usage;

pub use info::ResponseInfo;
pub use stream::{Disposition, StreamMeter};
pub use usage::{Metered, metered_from_body, metered_from_bytes, usage_object};

/// Which provider's wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI and OpenAI-compatible.
    OpenAi,
    /// Anthropic.
    Anthropic,
}
