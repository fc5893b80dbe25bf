//! Pre-call token estimates with a real BPE tokenizer (tiktoken's o200k and cl100k
//! vocabularies, shipped inside `tiktoken-rs`).
//!
//! The estimate feeds the worst-case reservation, so it leans high: every string in the
//! request's prompt-bearing fields is tokenised and each message adds a small framing overhead.
//! Anthropic's tokenizer is not public; its models are estimated with cl100k, which is close for
//! English text. An image part counts as a fixed bound ([`DEFAULT_IMAGE_TOKENS`] unless
//! configured), not as the text of its URL or base64 data: the providers charge images by their
//! pixels, and tokenising a megabyte of base64 would both cost milliseconds and reserve a
//! million tokens. Other media (audio, files) are still counted as the text they are sent as,
//! which over-estimates. The settled usage always comes from the provider.
//!
//! Counts are remembered ([`Counts`]): an agent sends the same system prompt, tool schemas,
//! earlier turns and JSON keys on every call, and hashing a string costs a small fraction of
//! tokenising it.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{LazyLock, Mutex, PoisonError};

use serde_json::Value;
use tiktoken_rs::CoreBPE;

/// Tokens a chat message's framing costs (role, separators), per OpenAI's cookbook.
const PER_MESSAGE: u64 = 4;
/// Tokens priming the reply.
const PER_REPLY: u64 = 3;

/// Prompt tokens assumed for one image part when no bound is configured: the most any
/// provider's documented formula charges for one image. OpenAI's gpt-4o-mini at high detail
/// charges 2,833 + 5,667 per 512-px tile, and an image is scaled to at most 768 × 2,048 px
/// (8 tiles): 48,169. gpt-4o charges at most 1,445 and Anthropic about 1,600, so for those
/// models a configured bound (`imageTokens`) reserves far less.
pub const DEFAULT_IMAGE_TOKENS: u64 = 48_169;

/// Content part types that carry an image: OpenAI chat (`image_url`), OpenAI Responses
/// (`input_image`) and Anthropic Messages (`image`).
const IMAGE_PARTS: [&str; 3] = ["image_url", "input_image", "image"];

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
/// Anthropic messages and count_tokens), with [`DEFAULT_IMAGE_TOKENS`] per image.
pub fn estimate_prompt(model: &str, body: &Value) -> u64 {
    estimate_prompt_with(model, body, DEFAULT_IMAGE_TOKENS)
}

/// Token counts of strings already tokenised, by a keyed hash of the vocabulary and the
/// string (SipHash with a random key, so a client cannot aim a collision at another
/// string's count; a collision could only move a pre-call estimate, never a settled bill).
/// Bounded: past [`Counts::LIMIT`] entries it starts again empty.
struct Counts {
    hasher: RandomState,
    seen: Mutex<HashMap<u64, u32>>,
}

impl Counts {
    /// Most counts kept (16 bytes each, about 256 KiB with the table's overhead).
    const LIMIT: usize = 16_384;

    fn new() -> Counts {
        Counts {
            hasher: RandomState::new(),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Tokens in `text` by `bpe`, tokenised only the first time it is seen.
    fn count(&self, bpe: &'static CoreBPE, text: &str) -> u64 {
        let key = self
            .hasher
            .hash_one((std::ptr::from_ref(bpe) as usize, text));
        let lock = || self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = lock().get(&key) {
            return u64::from(*n);
        }
        let n = bpe.encode_ordinary(text).len();
        let mut seen = lock();
        if seen.len() >= Self::LIMIT {
            seen.clear();
        }
        seen.insert(key, u32::try_from(n).unwrap_or(u32::MAX));
        n as u64
    }
}

/// The process's counts.
static COUNTS: LazyLock<Counts> = LazyLock::new(Counts::new);

/// [`estimate_prompt`] with `image_tokens` per image part.
pub fn estimate_prompt_with(model: &str, body: &Value, image_tokens: u64) -> u64 {
    let bpe = bpe_for(model);
    prompt_with(body, image_tokens, &|s| COUNTS.count(bpe, s))
}

/// An upper bound on [`estimate_prompt_with`]'s count, for any model, from the same fields:
/// each string counts as its UTF-8 bytes, since every token of a byte-level BPE (tiktoken's
/// vocabularies among them) stands for at least one byte. It costs a walk of the body and no
/// tokenising, so a caller can reserve on it while a Budget has room for it and count only when
/// the count matters.
pub fn prompt_bound_with(body: &Value, image_tokens: u64) -> u64 {
    prompt_with(body, image_tokens, &|s| s.len() as u64)
}

/// Fields that carry prompt text, across both providers' request formats.
const PROMPT_FIELDS: [&str; 7] = [
    "messages",
    "prompt",
    "input",
    "system",
    "instructions",
    "tools",
    "functions",
];

/// The prompt's tokens with `count` tokens per string: the prompt-bearing fields, and each chat
/// message's framing. One pass over the body's members (a lookup per field would hash each
/// name).
fn prompt_with(body: &Value, image_tokens: u64, count: &dyn Fn(&str) -> u64) -> u64 {
    let (mut total, mut messages) = (0u64, 0u64);
    for (field, v) in body.as_object().into_iter().flatten() {
        if PROMPT_FIELDS.contains(&field.as_str()) {
            total = total.saturating_add(strings(v, image_tokens, count));
            if field == "messages" {
                messages = v.as_array().map_or(0, |m| m.len() as u64);
            }
        }
    }
    total + messages * PER_MESSAGE + if messages > 0 { PER_REPLY } else { 0 }
}

fn strings(v: &Value, image_tokens: u64, count: &dyn Fn(&str) -> u64) -> u64 {
    match v {
        Value::String(s) => count(s),
        Value::Array(a) => a.iter().map(|x| strings(x, image_tokens, count)).sum(),
        Value::Object(o)
            if o.get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| IMAGE_PARTS.contains(&t)) =>
        {
            image_tokens
        }
        // Object keys count too: tool schemas are sent to the model as text.
        Value::Object(o) => o
            .iter()
            .map(|(k, x)| count(k) + strings(x, image_tokens, count))
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
            let bound = prompt_bound_with(&body, DEFAULT_IMAGE_TOKENS);
            assert!(bound >= est, "{body}: bound {bound} < estimate {est}");
        }
    }

    #[test]
    fn images_count_as_the_bound_not_as_their_base64() {
        // 300 KB of base64: tokenised as text it would be well over 100,000 tokens.
        let data = "iVBORw0KGgo".repeat(30_000);
        let text = json!({"type": "text", "text": "hello world"});
        let bodies = [
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": [text.clone(),
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{data}"), "detail": "high"}}]}]}),
            json!({"model": "gpt-4o", "input": [{"role": "user", "content": [
                {"type": "input_text", "text": "hello world"},
                {"type": "input_image", "image_url": format!("data:image/png;base64,{data}")}]}]}),
            json!({"model": "claude-sonnet-4", "messages": [{"role": "user", "content": [text,
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}]}]}),
        ];
        for body in &bodies {
            let model = body["model"].as_str().unwrap();
            let est = estimate_prompt(model, body);
            assert!(
                (DEFAULT_IMAGE_TOKENS..DEFAULT_IMAGE_TOKENS + 40).contains(&est),
                "{model}: {est}"
            );
            let configured = estimate_prompt_with(model, body, 1_600);
            assert!(
                (1_600..1_640).contains(&configured),
                "{model}: {configured}"
            );
        }
        // An image by URL is charged by its pixels too, not by the URL's few tokens.
        let by_url = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/dog.png"}}]}]});
        assert!(estimate_prompt_with("gpt-4o", &by_url, 1_445) >= 2 * 1_445);
    }

    #[test]
    fn the_bound_is_the_bytes_and_never_below_the_count() {
        // "hello world" is 11 bytes: two tokens, bounded by 11; the message's keys and role
        // count by their bytes too, its framing the same as the estimate's.
        let body =
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello world"}]});
        let keys_and_role = ("role".len() + "user".len() + "content".len()) as u64;
        assert_eq!(
            prompt_bound_with(&body, 0),
            11 + keys_and_role + PER_MESSAGE + PER_REPLY
        );
        // Text that tokenises worst (one token per byte or close) is still within the bound,
        // in both vocabularies: digits, punctuation runs, CJK, emoji, whitespace, base64.
        let texts = [
            "0123456789".repeat(50),
            "!?#%&*()[]{}<>".repeat(40),
            "漢字かな交じり文、東京都。".repeat(30),
            "🦀🚀👩‍🚀".repeat(40),
            " \n\t  \r\n".repeat(60),
            "iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB".repeat(30),
        ];
        for text in &texts {
            for model in ["gpt-4o", "gpt-4", "claude-sonnet-4"] {
                let body = json!({"model": model, "system": text, "input": [text, {"k": text}],
                    "messages": [{"role": "user", "content": text}]});
                let (est, bound) = (
                    estimate_prompt(model, &body),
                    prompt_bound_with(&body, DEFAULT_IMAGE_TOKENS),
                );
                assert!(
                    bound >= est,
                    "{model} {text:?}: bound {bound} < estimate {est}"
                );
            }
        }
    }

    #[test]
    fn remembered_counts_are_the_tokenizers() {
        let counts = Counts::new();
        let (o200k, cl100k) = (bpe_for("gpt-4o"), bpe_for("gpt-4"));
        let text = "The quick brown fox jumps over the lazy dog, again and again.";
        let fresh = o200k.encode_ordinary(text).len() as u64;
        assert_eq!(counts.count(o200k, text), fresh);
        assert_eq!(counts.count(o200k, text), fresh, "remembered");
        // The same text in each vocabulary is its own entry.
        let accents = "ééé ééé ûûû";
        for bpe in [cl100k, o200k, cl100k] {
            let want = bpe.encode_ordinary(accents).len() as u64;
            assert_eq!(counts.count(bpe, accents), want);
        }
        // Full: it starts again and still counts.
        for i in 0..Counts::LIMIT {
            counts.count(o200k, &i.to_string());
        }
        assert!(counts.seen.lock().unwrap().len() <= Counts::LIMIT);
        assert_eq!(counts.count(o200k, text), fresh);
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
