//! A provider's `usage` object normalised to [`Usage`], and the fields of it the sidecar does
//! not meter.
//!
//! Every numeric field of a usage object is either *metered* (it feeds a [`Usage`] field),
//! *known but unpriced* (audio tokens, image-generation tokens: listed in
//! [`Metered::unmetered`] when not zero) or *unknown* (listed whatever its value, so a shape a
//! provider starts sending is visible the day it appears). Text fields (`service_tier`,
//! `inference_geo`, an iteration's `type`) carry no usage and are not checked.

use serde_json::Value;

use super::Dialect;
use crate::usage::Usage;

/// A call's usage, and the usage fields that were not metered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metered {
    /// What the call used.
    pub usage: Usage,
    /// Dotted paths of fields not metered (`usage.prompt_tokens_details.audio_tokens`), sorted.
    pub unmetered: Vec<String>,
}

impl From<Usage> for Metered {
    fn from(usage: Usage) -> Metered {
        Metered {
            usage,
            unmetered: Vec::new(),
        }
    }
}

/// Fields read into [`Usage`], by dialect (`[]` marks each element of an array).
const OPENAI_METERED: &[&str] = &[
    "usage.prompt_tokens",
    "usage.completion_tokens",
    "usage.total_tokens",
    "usage.prompt_tokens_details.cached_tokens",
    "usage.completion_tokens_details.reasoning_tokens",
    // Billed inside completion_tokens (OpenAI's predicted outputs).
    "usage.completion_tokens_details.accepted_prediction_tokens",
    "usage.completion_tokens_details.rejected_prediction_tokens",
    // OpenAI-compatible providers (DeepSeek) name cache hits and misses their own way.
    "usage.prompt_cache_hit_tokens",
    "usage.prompt_cache_miss_tokens",
    "usage.input_tokens",
    "usage.output_tokens",
    "usage.input_tokens_details.cached_tokens",
    "usage.input_tokens_details.cache_write_tokens",
    "usage.output_tokens_details.reasoning_tokens",
    "tool_usage.web_search.num_requests",
];

/// Fields known and billed by the provider that no price of the sidecar's covers: listed
/// when not zero. A path ending in `.` covers everything under it.
const OPENAI_UNPRICED: &[&str] = &[
    "usage.prompt_tokens_details.audio_tokens",
    "usage.completion_tokens_details.audio_tokens",
    "tool_usage.image_gen.",
];

const ANTHROPIC_METERED: &[&str] = &[
    "usage.input_tokens",
    "usage.output_tokens",
    "usage.cache_creation_input_tokens",
    "usage.cache_read_input_tokens",
    "usage.cache_creation.ephemeral_5m_input_tokens",
    "usage.cache_creation.ephemeral_1h_input_tokens",
    "usage.server_tool_use.web_search_requests",
    "usage.server_tool_use.web_fetch_requests",
    "usage.iterations[].input_tokens",
    "usage.iterations[].output_tokens",
    "usage.iterations[].cache_creation_input_tokens",
    "usage.iterations[].cache_read_input_tokens",
    "usage.iterations[].cache_creation.ephemeral_5m_input_tokens",
    "usage.iterations[].cache_creation.ephemeral_1h_input_tokens",
];

fn n(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(v, |v, k| v.get(*k))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// Usage from one `usage` object in `dialect`'s shape (Anthropic compaction iterations
/// summed); None when `u` is not an object. Per-use counts that live outside the usage
/// object (OpenAI's `tool_usage`, `web_search_call` items) come from [`metered_from_body`].
pub fn usage_object(dialect: Dialect, u: &Value) -> Option<Usage> {
    if !u.is_object() {
        return None;
    }
    Some(match dialect {
        Dialect::OpenAi if u.get("prompt_tokens").is_some() => Usage {
            input_tokens: n(u, &["prompt_tokens"]),
            cached_input_tokens: match u
                .get("prompt_tokens_details")
                .and_then(|d| d.get("cached_tokens"))
            {
                Some(c) => c.as_u64().unwrap_or(0),
                None => n(u, &["prompt_cache_hit_tokens"]),
            },
            output_tokens: n(u, &["completion_tokens"]),
            reasoning_tokens: n(u, &["completion_tokens_details", "reasoning_tokens"]),
            ..Usage::default()
        },
        Dialect::OpenAi => Usage {
            input_tokens: n(u, &["input_tokens"]),
            cached_input_tokens: n(u, &["input_tokens_details", "cached_tokens"]),
            cache_write_input_tokens: n(u, &["input_tokens_details", "cache_write_tokens"]),
            output_tokens: n(u, &["output_tokens"]),
            reasoning_tokens: n(u, &["output_tokens_details", "reasoning_tokens"]),
            ..Usage::default()
        },
        Dialect::Anthropic => {
            // With compaction the top level is the last iteration only; the bill is the sum.
            let iterations = u
                .get("iterations")
                .and_then(Value::as_array)
                .filter(|i| !i.is_empty());
            let tokens = match iterations {
                Some(its) => its
                    .iter()
                    .map(anthropic_tokens)
                    .fold(Usage::default(), |a, b| a.plus(&b)),
                None => anthropic_tokens(u),
            };
            Usage {
                web_search_requests: n(u, &["server_tool_use", "web_search_requests"]),
                web_fetch_requests: n(u, &["server_tool_use", "web_fetch_requests"]),
                ..tokens
            }
        }
    })
}

/// The tokens of one Anthropic usage object (or one compaction iteration).
fn anthropic_tokens(u: &Value) -> Usage {
    let read = n(u, &["cache_read_input_tokens"]);
    let write = n(u, &["cache_creation_input_tokens"]);
    Usage {
        input_tokens: n(u, &["input_tokens"]) + read + write,
        cached_input_tokens: read,
        cache_write_input_tokens: write,
        cache_write_1h_input_tokens: n(u, &["cache_creation", "ephemeral_1h_input_tokens"])
            .min(write),
        output_tokens: n(u, &["output_tokens"]),
        ..Usage::default()
    }
}

/// Usage from a complete response body (or a stream's usage carrier in the same shape), with
/// what was not metered; None when the body has no usage object.
pub fn metered_from_body(dialect: Dialect, body: &Value) -> Option<Metered> {
    metered_from_parts(
        dialect,
        body.get("usage")?,
        body.get("tool_usage"),
        body.get("output"),
    )
}

/// [`metered_from_body`] from the body's members that carry usage.
fn metered_from_parts(
    dialect: Dialect,
    usage: &Value,
    tool_usage: Option<&Value>,
    output: Option<&Value>,
) -> Option<Metered> {
    let mut metered = usage_object(dialect, usage)?;
    if dialect == Dialect::OpenAi {
        let calls = output
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|item| item.get("type").and_then(Value::as_str) == Some("web_search_call"))
            .count() as u64;
        metered.web_search_requests = tool_usage
            .map_or(0, |t| n(t, &["web_search", "num_requests"]))
            .max(calls);
    }
    Some(Metered {
        usage: metered,
        unmetered: unmetered(
            dialect,
            [("usage", Some(usage)), ("tool_usage", tool_usage)],
        ),
    })
}

/// The members of a response body that carry usage; everything else (the generated text) is
/// skipped by the parser without being built into a [`Value`].
#[derive(serde::Deserialize)]
struct Carriers {
    usage: Option<Value>,
    tool_usage: Option<Value>,
    output: Option<Value>,
}

/// [`metered_from_body`] read straight from a complete response's bytes: only the members
/// that carry usage are built, which costs a fraction of parsing the whole body when the text
/// is long. None when the bytes are not a JSON object or it has no usage object.
///
/// A body that is UTF-8 throughout (as JSON must be) is checked once and read as text, so
/// the reader does not check each string it meets again; any other is read as bytes, as
/// before, so a stray byte in a member that is skipped does not lose the usage.
pub fn metered_from_bytes(dialect: Dialect, body: &[u8]) -> Option<Metered> {
    match std::str::from_utf8(body) {
        Ok(text) => metered_from_read(dialect, || serde_json::Deserializer::from_str(text)),
        Err(_) => metered_from_read(dialect, || serde_json::Deserializer::from_slice(body)),
    }
}

/// [`metered_from_bytes`] over a reader made by `de` (made again for the general read).
fn metered_from_read<'de, R: serde_json::de::Read<'de>>(
    dialect: Dialect,
    de: impl Fn() -> serde_json::Deserializer<R>,
) -> Option<Metered> {
    if dialect == Dialect::OpenAi
        && let Some(body) = whole::<ChatBody, R>(de())
    {
        return Some(chat_completion(body));
    }
    let c = whole::<Carriers, R>(de())?;
    metered_from_parts(
        dialect,
        c.usage.as_ref()?,
        c.tool_usage.as_ref(),
        c.output.as_ref(),
    )
}

/// `T` read from the whole of `de`'s input (nothing but whitespace after it), as
/// `serde_json::from_slice` reads; None when it is not a `T`.
fn whole<'de, T: serde::Deserialize<'de>, R: serde_json::de::Read<'de>>(
    mut de: serde_json::Deserializer<R>,
) -> Option<T> {
    let t = T::deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(t)
}

/// A token count that must be a non-negative integer: `null`, a fraction or a string makes the
/// typed read below fail, and the body is read the general way instead.
#[derive(Clone, Copy, Default)]
struct Count(u64);

impl<'de> serde::Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Count, D::Error> {
        u64::deserialize(d).map(Count)
    }
}

/// A member whose presence sends the body to the general read.
struct Absent;

impl<'de> serde::Deserialize<'de> for Absent {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Absent, D::Error> {
        Err(serde::de::Error::custom("read the general way"))
    }
}

/// The usage object of an OpenAI chat completion, exactly as OpenAI sends it; any other member
/// (a provider's own field, a new one) fails the typed read.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatUsage {
    prompt_tokens: Count,
    #[serde(default)]
    completion_tokens: Count,
    // Checked to be a count, not read: the sum of the two above.
    #[serde(default, rename = "total_tokens")]
    _total_tokens: Count,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptDetails {
    cached_tokens: Option<Count>,
    #[serde(default)]
    audio_tokens: Count,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Count,
    #[serde(default)]
    audio_tokens: Count,
    // Billed inside completion_tokens (OpenAI's predicted outputs): checked, not read.
    #[serde(default, rename = "accepted_prediction_tokens")]
    _accepted_prediction_tokens: Count,
    #[serde(default, rename = "rejected_prediction_tokens")]
    _rejected_prediction_tokens: Count,
}

/// A chat completion body whose usage is [`ChatUsage`] and that has no other usage carrier.
#[derive(serde::Deserialize)]
struct ChatBody {
    usage: ChatUsage,
    #[serde(default, rename = "tool_usage")]
    _tool_usage: Option<Absent>,
    #[serde(default, rename = "output")]
    _output: Option<Absent>,
}

/// [`metered_from_bytes`] for the common case, an OpenAI chat completion with the usage object
/// OpenAI documents, read into typed fields in one pass (no JSON tree, no strings). A body
/// that is not a [`ChatBody`] goes to the general read, which decides (it agrees wherever this
/// answers: the tests hold every case to both).
fn chat_completion(body: ChatBody) -> Metered {
    let ChatBody { usage: u, .. } = body;
    let prompt = u.prompt_tokens_details;
    let completion = u.completion_tokens_details;
    let mut unmetered = Vec::new();
    if completion.as_ref().is_some_and(|c| c.audio_tokens.0 > 0) {
        unmetered.push("usage.completion_tokens_details.audio_tokens".to_owned());
    }
    if prompt.as_ref().is_some_and(|p| p.audio_tokens.0 > 0) {
        unmetered.push("usage.prompt_tokens_details.audio_tokens".to_owned());
    }
    Metered {
        usage: Usage {
            input_tokens: u.prompt_tokens.0,
            cached_input_tokens: prompt.and_then(|p| p.cached_tokens).map_or(0, |c| c.0),
            output_tokens: u.completion_tokens.0,
            reasoning_tokens: completion.map_or(0, |c| c.reasoning_tokens.0),
            ..Usage::default()
        },
        unmetered,
    }
}

/// The paths of the usage members (`usage`, and OpenAI's `tool_usage`) that are unknown, or
/// known, unpriced and not zero.
fn unmetered(dialect: Dialect, roots: [(&str, Option<&Value>); 2]) -> Vec<String> {
    let (metered, unpriced): (&[&str], &[&str]) = match dialect {
        Dialect::OpenAi => (OPENAI_METERED, OPENAI_UNPRICED),
        Dialect::Anthropic => (ANTHROPIC_METERED, &[]),
    };
    let covers = |list: &[&str], path: &str| {
        list.iter()
            .any(|k| *k == path || (k.ends_with('.') && path.starts_with(k)))
    };
    // Only the leaves not metered are copied out of the one path buffer.
    let mut keep = |path: &str, value: f64| {
        if covers(metered, path) {
            false
        } else if covers(unpriced, path) {
            value > 0.0
        } else {
            true
        }
    };
    let mut out = Vec::new();
    let mut path = String::with_capacity(64);
    for (root, v) in roots {
        if let Some(v) = v {
            path.clear();
            path.push_str(root);
            numeric_leaves(&mut path, v, &mut keep, &mut out);
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The dotted paths of the numbers under `v` (array elements as `[]`) that `keep` keeps;
/// `path` is `v`'s own, extended and restored on the way down.
fn numeric_leaves(
    path: &mut String,
    v: &Value,
    keep: &mut impl FnMut(&str, f64) -> bool,
    out: &mut Vec<String>,
) {
    let len = path.len();
    match v {
        Value::Number(x) => {
            if keep(path, x.as_f64().unwrap_or(0.0)) {
                out.push(path.clone());
            }
        }
        Value::Object(m) => {
            for (k, v) in m {
                path.push('.');
                path.push_str(k);
                numeric_leaves(path, v, keep, out);
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            path.push_str("[]");
            for v in items {
                numeric_leaves(path, v, keep, out);
            }
            path.truncate(len);
        }
        Value::Null | Value::Bool(_) | Value::String(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Metered from the parsed body, checked to be what [`metered_from_bytes`] reads from its
    /// bytes (with the generated text around the usage, which it skips).
    fn metered(d: Dialect, body: Value) -> Metered {
        let m = metered_from_body(d, &body).unwrap_or_else(|| panic!("no usage in {body}"));
        let mut with_text = body.clone();
        with_text["choices"] =
            json!([{"message": {"content": "some text"}, "finish_reason": "stop"}]);
        let bytes = serde_json::to_vec(&with_text).unwrap();
        assert_eq!(
            metered_from_bytes(d, &bytes).as_ref(),
            Some(&m),
            "{with_text}"
        );
        m
    }

    #[test]
    fn bodies() {
        let cases = [
            (
                Dialect::OpenAi,
                json!({"usage":{"prompt_tokens":100,"completion_tokens":20,"total_tokens":120,
                    "prompt_tokens_details":{"cached_tokens":64},
                    "completion_tokens_details":{"reasoning_tokens":8}}}),
                Usage {
                    input_tokens: 100,
                    cached_input_tokens: 64,
                    output_tokens: 20,
                    reasoning_tokens: 8,
                    ..Usage::default()
                },
            ),
            (
                Dialect::OpenAi,
                json!({"object":"list","usage":{"prompt_tokens":9,"total_tokens":9}}),
                Usage {
                    input_tokens: 9,
                    ..Usage::default()
                },
            ),
            (
                Dialect::OpenAi,
                json!({"object":"response","usage":{"input_tokens":50,"input_tokens_details":{"cached_tokens":10,"cache_write_tokens":5},
                    "output_tokens":30,"output_tokens_details":{"reasoning_tokens":12},"total_tokens":80}}),
                Usage {
                    input_tokens: 50,
                    cached_input_tokens: 10,
                    cache_write_input_tokens: 5,
                    output_tokens: 30,
                    reasoning_tokens: 12,
                    ..Usage::default()
                },
            ),
            (
                Dialect::Anthropic,
                json!({"type":"message","usage":{"input_tokens":20,"cache_read_input_tokens":100,
                    "cache_creation_input_tokens":50,"output_tokens":7,
                    "cache_creation":{"ephemeral_5m_input_tokens":30,"ephemeral_1h_input_tokens":20}}}),
                Usage {
                    input_tokens: 170,
                    cached_input_tokens: 100,
                    cache_write_input_tokens: 50,
                    cache_write_1h_input_tokens: 20,
                    output_tokens: 7,
                    ..Usage::default()
                },
            ),
        ];
        for (d, body, want) in cases {
            let m = metered(d, body.clone());
            assert_eq!(m.usage, want, "{body}");
            assert!(m.unmetered.is_empty(), "{body}: {:?}", m.unmetered);
        }
        assert_eq!(
            metered_from_body(Dialect::OpenAi, &json!({"usage": null})),
            None
        );
        assert_eq!(metered_from_body(Dialect::OpenAi, &json!({})), None);
        for bytes in [
            &b"{}"[..],
            b"{\"usage\": null}",
            b"[1]",
            b"not json",
            b"{\"usage\": {",
        ] {
            assert_eq!(metered_from_bytes(Dialect::OpenAi, bytes), None);
        }
    }

    #[test]
    fn compaction_bills_the_sum_of_its_iterations() {
        // The shape of a recorded compaction response: the top level is the last iteration.
        let body = json!({"usage": {"input_tokens": 180, "output_tokens": 8,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
            "iterations": [
                {"type": "compaction", "input_tokens": 100, "output_tokens": 82,
                 "cache_creation_input_tokens": 55096, "cache_read_input_tokens": 0,
                 "cache_creation": {"ephemeral_5m_input_tokens": 55096, "ephemeral_1h_input_tokens": 0}},
                {"type": "message", "input_tokens": 180, "output_tokens": 8,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}]}});
        let m = metered(Dialect::Anthropic, body);
        assert_eq!(
            m.usage,
            Usage {
                input_tokens: 100 + 55096 + 180,
                cache_write_input_tokens: 55096,
                output_tokens: 90,
                ..Usage::default()
            }
        );
        assert!(m.unmetered.is_empty(), "{:?}", m.unmetered);
    }

    #[test]
    fn server_tool_uses_are_counted() {
        let a = metered(
            Dialect::Anthropic,
            json!({"usage": {"input_tokens": 10387, "output_tokens": 300,
                "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 1}}}),
        );
        assert_eq!(
            (a.usage.web_search_requests, a.usage.web_fetch_requests),
            (2, 1)
        );
        // OpenAI responses: the web_search_call items, or tool_usage when it says more.
        let items = json!({"output": [{"type": "web_search_call"}, {"type": "message"},
            {"type": "web_search_call"}], "usage": {"input_tokens": 1, "output_tokens": 1}});
        assert_eq!(metered(Dialect::OpenAi, items).usage.web_search_requests, 2);
        let counted = json!({"tool_usage": {"web_search": {"num_requests": 3}},
            "usage": {"input_tokens": 1, "output_tokens": 1}});
        assert_eq!(
            metered(Dialect::OpenAi, counted).usage.web_search_requests,
            3
        );
    }

    #[test]
    fn compatible_providers_name_cache_hits_their_own_way() {
        let m = metered(
            Dialect::OpenAi,
            json!({"usage": {"prompt_tokens": 563, "completion_tokens": 70,
                "prompt_cache_hit_tokens": 512, "prompt_cache_miss_tokens": 51,
                "completion_tokens_details": {"reasoning_tokens": 60}}}),
        );
        assert_eq!(
            (
                m.usage.input_tokens,
                m.usage.cached_input_tokens,
                m.usage.reasoning_tokens
            ),
            (563, 512, 60)
        );
    }

    #[test]
    fn fields_not_metered_are_listed() {
        let m = metered(
            Dialect::OpenAi,
            json!({"usage": {"prompt_tokens": 10, "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 7},
                "completion_tokens_details": {"audio_tokens": 0, "reasoning_tokens": 0},
                "surprise_tokens": 0, "service_tier": "default"},
              "tool_usage": {"image_gen": {"input_tokens": 0, "output_tokens": 4},
                "web_search": {"num_requests": 0}}}),
        );
        // Unknown: listed at 0 too. Known and unpriced: only when not zero. Text: never.
        assert_eq!(
            m.unmetered,
            vec![
                "tool_usage.image_gen.output_tokens",
                "usage.prompt_tokens_details.audio_tokens",
                "usage.surprise_tokens",
            ]
        );
        let a = metered(
            Dialect::Anthropic,
            json!({"usage": {"input_tokens": 1, "output_tokens": 1, "inference_geo": "global",
                "server_tool_use": {"code_execution_requests": 1},
                "iterations": [{"type": "message", "input_tokens": 1, "output_tokens": 1,
                    "thinking_tokens": 3}]}}),
        );
        assert_eq!(
            a.unmetered,
            vec![
                "usage.iterations[].thinking_tokens",
                "usage.server_tool_use.code_execution_requests",
            ]
        );
    }

    #[test]
    fn the_typed_read_of_a_chat_completion_agrees_with_the_general_one() {
        let typed = [
            json!({"id": "x", "choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 20,
                "total_tokens": 50,
                "prompt_tokens_details": {"cached_tokens": 8, "audio_tokens": 3},
                "completion_tokens_details": {"reasoning_tokens": 5, "audio_tokens": 2,
                    "accepted_prediction_tokens": 1, "rejected_prediction_tokens": 4}}}),
            json!({"usage": {"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": null}}}),
            json!({"usage": {"prompt_tokens": 1, "prompt_tokens_details": null,
                "completion_tokens_details": null}, "tool_usage": null}),
        ];
        for body in typed {
            let bytes = serde_json::to_vec(&body).unwrap();
            let fast = whole(serde_json::Deserializer::from_slice(&bytes)).map(chat_completion);
            assert!(fast.is_some(), "{body}");
            // metered() holds the bytes' read (typed here) to the general read of the value.
            assert_eq!(fast, Some(metered(Dialect::OpenAi, body)));
        }
        let m = metered(
            Dialect::OpenAi,
            json!({"usage": {"prompt_tokens": 30,
            "completion_tokens": 20, "prompt_tokens_details": {"audio_tokens": 3},
            "completion_tokens_details": {"audio_tokens": 2}}}),
        );
        assert_eq!(
            m.unmetered,
            vec![
                "usage.completion_tokens_details.audio_tokens",
                "usage.prompt_tokens_details.audio_tokens",
            ]
        );
        // Anything else is read the general way (and metered() checks both reads agree).
        let general = [
            json!({"usage": {"prompt_tokens": 1, "completion_tokens": null}}),
            json!({"usage": {"prompt_tokens": 1.5, "completion_tokens": 2}}),
            json!({"usage": {"prompt_tokens": -1, "completion_tokens": 2}}),
            json!({"usage": {"prompt_tokens": 1, "prompt_cache_hit_tokens": 1}}),
            json!({"usage": {"prompt_tokens": 1, "prompt_tokens_details": {"text_tokens": 1}}}),
            json!({"usage": {"prompt_tokens": 1}, "tool_usage": {"web_search": {"num_requests": 2}}}),
            json!({"usage": {"prompt_tokens": 1}, "output": [{"type": "web_search_call"}]}),
            json!({"usage": {"input_tokens": 1, "output_tokens": 2}}),
        ];
        for body in general {
            let bytes = serde_json::to_vec(&body).unwrap();
            let typed = whole(serde_json::Deserializer::from_slice(&bytes)).map(chat_completion);
            assert_eq!(typed, None, "{body}");
            metered(Dialect::OpenAi, body);
        }
    }

    #[test]
    fn a_stray_byte_in_skipped_text_does_not_lose_the_usage() {
        let body = b"{\"choices\": [{\"message\": {\"content\": \"\xff\"}}], \"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 4}}";
        let m = metered_from_bytes(Dialect::OpenAi, body).expect("read as bytes");
        assert_eq!((m.usage.input_tokens, m.usage.output_tokens), (3, 4));
        let trailing = b"{\"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 4}} x";
        assert_eq!(metered_from_bytes(Dialect::OpenAi, trailing), None);
    }
}
