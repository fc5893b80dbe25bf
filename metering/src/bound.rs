//! The most a request can use before it is sent: what a Budget reserves for it.
//!
//! A plain call uses at most its prompt (estimated by the model's BPE) plus its output cap.
//! Two features make a call use more than that, and are bounded here from what the request
//! declares:
//!
//! - **Server tools** (Anthropic `web_search_*` / `web_fetch_*` tools, OpenAI `web_search*`
//!   tools and `web_search_options`): each use is billed on its own and feeds its results back
//!   as input. A tool's `max_uses` bounds the uses (else [`ToolAllowance::max_uses`]); each
//!   use adds `max_content_tokens` of input for a fetch that sets it, else
//!   [`ToolAllowance::input_tokens_per_use`].
//! - **Compaction** (an Anthropic `context_management` edit of type `compact_*`): the provider
//!   first summarises the context in an iteration of its own, so the input and output bounds
//!   are counted twice.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::usage::Usage;

/// What a request that declares server tools may use per tool, where it does not say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolAllowance {
    /// Uses of a tool whose declaration sets no `max_uses`.
    pub max_uses: u64,
    /// Input tokens each use may add (search results, a fetched page).
    pub input_tokens_per_use: u64,
}

impl Default for ToolAllowance {
    fn default() -> Self {
        ToolAllowance {
            max_uses: 10,
            input_tokens_per_use: 20_000,
        }
    }
}

/// The worst case of a request: `prompt_tokens` and `max_output_tokens` as estimated, widened
/// by the server tools and compaction `request` declares.
pub fn worst_usage(
    request: &Value,
    prompt_tokens: u64,
    max_output_tokens: u64,
    allowance: &ToolAllowance,
) -> Usage {
    let mut worst = Usage {
        input_tokens: prompt_tokens,
        output_tokens: max_output_tokens,
        ..Usage::default()
    };
    if compacts(request) {
        worst.input_tokens = worst.input_tokens.saturating_mul(2);
        worst.output_tokens = worst.output_tokens.saturating_mul(2);
    }
    let uses = |tool: &Value| {
        tool.get("max_uses")
            .and_then(Value::as_u64)
            .unwrap_or(allowance.max_uses)
    };
    let tools = request.get("tools").and_then(Value::as_array);
    for tool in tools.into_iter().flatten() {
        let kind = tool.get("type").and_then(Value::as_str).unwrap_or("");
        if kind.starts_with("web_search") {
            let n = uses(tool);
            worst.web_search_requests = worst.web_search_requests.saturating_add(n);
            worst.input_tokens = worst
                .input_tokens
                .saturating_add(n.saturating_mul(allowance.input_tokens_per_use));
        } else if kind.starts_with("web_fetch") {
            let n = uses(tool);
            let per_use = tool
                .get("max_content_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(allowance.input_tokens_per_use);
            worst.web_fetch_requests = worst.web_fetch_requests.saturating_add(n);
            worst.input_tokens = worst.input_tokens.saturating_add(n.saturating_mul(per_use));
        }
    }
    // OpenAI's search models search on every call of chat completions that asks for it.
    if request.get("web_search_options").is_some() {
        worst.web_search_requests = worst.web_search_requests.saturating_add(allowance.max_uses);
        worst.input_tokens = worst.input_tokens.saturating_add(
            allowance
                .max_uses
                .saturating_mul(allowance.input_tokens_per_use),
        );
    }
    worst
}

/// Whether the request asks the provider to compact its context first.
fn compacts(request: &Value) -> bool {
    request
        .get("context_management")
        .and_then(|c| c.get("edits"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|e| {
            e.get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.starts_with("compact"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ALLOW: ToolAllowance = ToolAllowance {
        max_uses: 10,
        input_tokens_per_use: 20_000,
    };

    #[test]
    fn a_plain_call_is_its_prompt_and_output_cap() {
        let w = worst_usage(&json!({"model": "m", "messages": []}), 100, 50, &ALLOW);
        assert_eq!(
            w,
            Usage {
                input_tokens: 100,
                output_tokens: 50,
                ..Usage::default()
            }
        );
    }

    #[test]
    fn server_tools_add_their_uses_and_what_each_use_reads() {
        let req = json!({"tools": [
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
            {"type": "web_fetch_20250910", "name": "web_fetch", "max_content_tokens": 5000},
            {"name": "get_weather", "input_schema": {}},
        ]});
        let w = worst_usage(&req, 100, 50, &ALLOW);
        assert_eq!((w.web_search_requests, w.web_fetch_requests), (3, 10));
        assert_eq!(w.input_tokens, 100 + 3 * 20_000 + 10 * 5_000);
        let openai = json!({"tools": [{"type": "web_search_preview"}]});
        assert_eq!(worst_usage(&openai, 1, 1, &ALLOW).web_search_requests, 10);
        let chat = json!({"web_search_options": {}});
        assert_eq!(worst_usage(&chat, 1, 1, &ALLOW).web_search_requests, 10);
    }

    #[test]
    fn compaction_counts_the_call_twice() {
        let req = json!({"context_management": {"edits": [{"type": "compact_20260112"}]}});
        let w = worst_usage(&req, 1_000, 200, &ALLOW);
        assert_eq!((w.input_tokens, w.output_tokens), (2_000, 400));
    }
}
