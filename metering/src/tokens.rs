//! Pre-call token estimates with a real BPE tokenizer (tiktoken's o200k and cl100k
//! vocabularies, shipped inside `tiktoken-rs`).
//!
//! The estimate feeds the worst-case reservation, so it leans high: every string in the
//! request's prompt-bearing fields is tokenised and each message adds a small framing overhead.
//! Anthropic's tokenizer is not public; its models are estimated with cl100k, which is close for
//! English text. Images and audio are not counted (their size is not in the JSON); the settled
//! usage always comes from the provider.

use serde_json::Value;
use tiktoken_rs::CoreBPE;

/// Tokens a chat message's framing costs (role, separators), per OpenAI's cookbook.
const PER_MESSAGE: u64 = 4;
/// Tokens priming the reply.
const PER_REPLY: u64 = 3;

/// The tokenizer for `model`: o200k for current OpenAI models, cl100k for older ones and for
/// models whose tokenizer is not public.
pub fn bpe_for(model: &str) -> &'static CoreBPE {
    tiktoken_rs::bpe_for_model(model).unwrap_or_else(|_| {
        if model.starts_with("claude") {
            tiktoken_rs::cl100k_base_singleton()
        } else {
            tiktoken_rs::o200k_base_singleton()
        }
    })
}

/// Loads both vocabularies now (a few hundred milliseconds), so that the first request does
/// not pay for it.
pub fn warm() {
    let _ = tiktoken_rs::o200k_base_singleton().encode_ordinary("warm");
    let _ = tiktoken_rs::cl100k_base_singleton().encode_ordinary("warm");
}

/// Tokens in `text` for `model`.
pub fn count_text(model: &str, text: &str) -> u64 {
    bpe_for(model).encode_ordinary(text).len() as u64
}

/// Prompt tokens of a request body (chat completions, completions, embeddings, responses,
/// Anthropic messages and count_tokens).
pub fn estimate_prompt(model: &str, body: &Value) -> u64 {
    let bpe = bpe_for(model);
    let mut total = 0u64;
    let mut count = |v: &Value| total += strings(bpe, v);
    // Fields that carry prompt text, across both providers' request formats.
    for field in [
        "messages",
        "prompt",
        "input",
        "system",
        "instructions",
        "tools",
        "functions",
    ] {
        if let Some(v) = body.get(field) {
            count(v);
        }
    }
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, |m| m.len() as u64);
    total + messages * PER_MESSAGE + if messages > 0 { PER_REPLY } else { 0 }
}

fn strings(bpe: &CoreBPE, v: &Value) -> u64 {
    match v {
        Value::String(s) => bpe.encode_ordinary(s).len() as u64,
        Value::Array(a) => a.iter().map(|x| strings(bpe, x)).sum(),
        // Object keys count too: tool schemas are sent to the model as text.
        Value::Object(o) => o
            .iter()
            .map(|(k, x)| bpe.encode_ordinary(k).len() as u64 + strings(bpe, x))
            .sum(),
        // Token-id prompts (`"prompt": [1, 2, 3]`) are one token per number.
        Value::Number(_) => 1,
        Value::Bool(_) | Value::Null => 0,
    }
}

/// The output cap a request asks for, by whichever name its API uses.
pub fn max_output_tokens(body: &Value) -> Option<u64> {
    ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn known_counts() {
        // Counts from tiktoken itself.
        assert_eq!(count_text("gpt-4o", "hello world"), 2);
        assert_eq!(count_text("gpt-4", "hello world"), 2);
        assert_eq!(count_text("gpt-4o", ""), 0);
    }

    #[test]
    fn prompt_estimates_cover_every_format() {
        let cases = [
            (
                json!({"model":"gpt-4o","messages":[{"role":"user","content":"hello world"}]}),
                2,
            ),
            (json!({"model":"gpt-4o","prompt":"hello world"}), 2),
            (
                json!({"model":"text-embedding-3-small","input":["hello world","hello world"]}),
                4,
            ),
            (
                json!({"model":"claude-sonnet-4","system":"hello world","messages":[{"role":"user","content":[{"type":"text","text":"hello world"}]}]}),
                4,
            ),
            (json!({"model":"gpt-4o","prompt":[15339, 1917]}), 2),
        ];
        for (body, text_tokens) in cases {
            let model = body["model"].as_str().unwrap();
            let est = estimate_prompt(model, &body);
            assert!(est >= text_tokens, "{body}: {est} < {text_tokens}");
            assert!(est <= text_tokens + 20, "{body}: {est} is far too high");
        }
    }

    #[test]
    fn output_caps_by_any_name() {
        assert_eq!(max_output_tokens(&json!({"max_tokens": 5})), Some(5));
        assert_eq!(
            max_output_tokens(&json!({"max_completion_tokens": 6, "max_tokens": 5})),
            Some(6)
        );
        assert_eq!(max_output_tokens(&json!({"max_output_tokens": 7})), Some(7));
        assert_eq!(max_output_tokens(&json!({"max_tokens": -1})), None);
        assert_eq!(max_output_tokens(&json!({})), None);
    }
}
