//! The providers' own usage numbers, read from response bodies and from SSE streams.
//!
//! | source | where usage is |
//! | --- | --- |
//! | OpenAI chat/completions, completions, embeddings | `usage.prompt_tokens`, `completion_tokens`, `prompt_tokens_details.cached_tokens`, `completion_tokens_details.reasoning_tokens` |
//! | OpenAI responses | `usage.input_tokens`, `output_tokens`, `input_tokens_details.cached_tokens`, `output_tokens_details.reasoning_tokens` |
//! | OpenAI streams | the final chunk's `usage` (needs `stream_options.include_usage`); responses: `response.completed` |
//! | Anthropic messages | `usage.input_tokens` (uncached only), `cache_read_input_tokens`, `cache_creation_input_tokens`, `output_tokens` |
//! | Anthropic streams | `message_start.message.usage`, then `message_delta.usage` (cumulative) |
//!
//! A stream that ends without its usage (client gone, upstream cut) is metered from what was
//! delivered: the prompt estimate plus the tokenised text that reached the client, flagged
//! `estimated`.

use serde_json::Value;

use crate::sse::Event;
use crate::tokens;
use crate::usage::Usage;

/// Which provider's wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI and OpenAI-compatible.
    OpenAi,
    /// Anthropic.
    Anthropic,
}

fn n(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(v, |v, k| v.get(*k))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// Usage from a `usage` object in `dialect`'s shape; None when `u` is not an object.
pub fn usage_object(dialect: Dialect, u: &Value) -> Option<Usage> {
    if !u.is_object() {
        return None;
    }
    Some(match dialect {
        Dialect::OpenAi if u.get("prompt_tokens").is_some() => Usage {
            input_tokens: n(u, &["prompt_tokens"]),
            cached_input_tokens: n(u, &["prompt_tokens_details", "cached_tokens"]),
            cache_write_input_tokens: 0,
            output_tokens: n(u, &["completion_tokens"]),
            reasoning_tokens: n(u, &["completion_tokens_details", "reasoning_tokens"]),
        },
        Dialect::OpenAi => Usage {
            input_tokens: n(u, &["input_tokens"]),
            cached_input_tokens: n(u, &["input_tokens_details", "cached_tokens"]),
            cache_write_input_tokens: 0,
            output_tokens: n(u, &["output_tokens"]),
            reasoning_tokens: n(u, &["output_tokens_details", "reasoning_tokens"]),
        },
        Dialect::Anthropic => {
            let read = n(u, &["cache_read_input_tokens"]);
            let write = n(u, &["cache_creation_input_tokens"]);
            Usage {
                input_tokens: n(u, &["input_tokens"]) + read + write,
                cached_input_tokens: read,
                cache_write_input_tokens: write,
                output_tokens: n(u, &["output_tokens"]),
                reasoning_tokens: 0,
            }
        }
    })
}

/// Usage from a complete (non-streaming) response body.
pub fn usage_from_body(dialect: Dialect, body: &Value) -> Option<Usage> {
    usage_object(dialect, body.get("usage")?)
}

/// What a response says about itself, for traces: the provider's id for it, the model that
/// answered, and why generation stopped (one reason per choice). Never any generated text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseInfo {
    /// `id` (OpenAI `chatcmpl-…`/`resp_…`, Anthropic `msg_…`).
    pub id: Option<String>,
    /// `model`, as the provider reports it.
    pub model: Option<String>,
    /// OpenAI `choices[].finish_reason`, Anthropic `stop_reason`.
    pub finish_reasons: Vec<String>,
}

impl ResponseInfo {
    /// From a complete (non-streaming) response body.
    pub fn from_body(body: &Value) -> ResponseInfo {
        let mut info = ResponseInfo::default();
        info.take_ids(body);
        info.take_finish_reasons(body);
        if let Some(r) = body.get("stop_reason").and_then(Value::as_str) {
            info.finish_reasons.push(r.to_owned());
        }
        info
    }

    /// Keeps the first `id` and `model` seen in `v`.
    fn take_ids(&mut self, v: &Value) {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        if self.id.is_none() {
            self.id = s("id");
        }
        if self.model.is_none() {
            self.model = s("model");
        }
    }

    /// OpenAI's per-choice reasons (set on a stream's last chunk of each choice).
    fn take_finish_reasons(&mut self, v: &Value) {
        for choice in v
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(r) = choice.get("finish_reason").and_then(Value::as_str) {
                self.finish_reasons.push(r.to_owned());
            }
        }
    }
}

/// What the relay should do with one stream event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Forward as is.
    Forward,
    /// OpenAI's usage-only chunk (`"choices": []` with `usage`): forward it unless the sidecar
    /// itself asked for it.
    UsageOnly,
}

/// Follows one stream and keeps what it needs to meter it.
#[derive(Clone, Debug)]
pub struct StreamMeter {
    dialect: Dialect,
    /// Usage the provider reported (final for OpenAI; running for Anthropic).
    reported: Option<Usage>,
    /// Whether the provider's closing usage arrived (OpenAI usage chunk, Anthropic
    /// `message_delta`, responses `response.completed`).
    complete: bool,
    /// Text delivered to the client, for estimates.
    delivered: String,
    /// Response id, model and finish reasons, for traces.
    info: ResponseInfo,
}

impl StreamMeter {
    /// A meter for one stream.
    pub fn new(dialect: Dialect) -> Self {
        StreamMeter {
            dialect,
            reported: None,
            complete: false,
            delivered: String::new(),
            info: ResponseInfo::default(),
        }
    }

    /// Reads one event.
    pub fn observe(&mut self, ev: &Event) -> Disposition {
        let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
            return Disposition::Forward; // `[DONE]`, pings, or garbage: nothing to meter
        };
        match self.dialect {
            Dialect::OpenAi => self.openai(&v),
            Dialect::Anthropic => {
                self.anthropic(ev.event.as_deref(), &v);
                Disposition::Forward
            }
        }
    }

    fn openai(&mut self, v: &Value) -> Disposition {
        // Responses API events carry a `type`.
        if let Some(kind) = v.get("type").and_then(Value::as_str) {
            if let Some(r) = v.get("response") {
                self.info.take_ids(r);
            }
            match kind {
                "response.completed" | "response.incomplete" | "response.failed" => {
                    if let Some(u) = v.pointer("/response/usage") {
                        self.reported = usage_object(Dialect::OpenAi, u);
                        self.complete = self.reported.is_some();
                    }
                }
                k if k.ends_with(".delta") => {
                    if let Some(d) = v.get("delta").and_then(Value::as_str) {
                        self.delivered.push_str(d);
                    }
                }
                _ => {}
            }
            return Disposition::Forward;
        }
        self.info.take_ids(v);
        self.info.take_finish_reasons(v);
        for choice in v
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for p in [
                "/delta/content",
                "/delta/reasoning_content",
                "/delta/refusal",
                "/text",
            ] {
                if let Some(t) = choice.pointer(p).and_then(Value::as_str) {
                    self.delivered.push_str(t);
                }
            }
            for call in choice
                .pointer("/delta/tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(a) = call.pointer("/function/arguments").and_then(Value::as_str) {
                    self.delivered.push_str(a);
                }
            }
        }
        match v
            .get("usage")
            .and_then(|u| usage_object(Dialect::OpenAi, u))
        {
            Some(u) => {
                self.reported = Some(u);
                self.complete = true;
                let no_choices = v
                    .get("choices")
                    .and_then(Value::as_array)
                    .is_some_and(Vec::is_empty);
                if no_choices {
                    Disposition::UsageOnly
                } else {
                    Disposition::Forward
                }
            }
            None => Disposition::Forward,
        }
    }

    fn anthropic(&mut self, event: Option<&str>, v: &Value) {
        let kind = event.or_else(|| v.get("type").and_then(Value::as_str));
        match kind {
            Some("message_start") => {
                if let Some(m) = v.get("message") {
                    self.info.take_ids(m);
                }
                self.reported = v
                    .pointer("/message/usage")
                    .and_then(|u| usage_object(Dialect::Anthropic, u));
            }
            Some("message_delta") => {
                if let Some(r) = v.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.info.finish_reasons.push(r.to_owned());
                }
                if let Some(u) = v.get("usage") {
                    let mut r = self.reported.unwrap_or_default();
                    // Cumulative counts; input fields appear here only in newer API versions.
                    r.output_tokens = n(u, &["output_tokens"]).max(r.output_tokens);
                    if u.get("input_tokens").is_some() {
                        let d = usage_object(Dialect::Anthropic, u).unwrap_or_default();
                        r.input_tokens = d.input_tokens.max(r.input_tokens);
                        r.cached_input_tokens = d.cached_input_tokens.max(r.cached_input_tokens);
                        r.cache_write_input_tokens =
                            d.cache_write_input_tokens.max(r.cache_write_input_tokens);
                    }
                    self.reported = Some(r);
                    self.complete = true;
                }
            }
            Some("content_block_delta") => {
                for p in ["/delta/text", "/delta/partial_json", "/delta/thinking"] {
                    if let Some(t) = v.pointer(p).and_then(Value::as_str) {
                        self.delivered.push_str(t);
                    }
                }
            }
            _ => {}
        }
    }

    /// The response's id, model and finish reasons seen so far.
    pub fn response(&self) -> &ResponseInfo {
        &self.info
    }

    /// Whether the provider's closing usage arrived.
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// The stream's usage, and whether it is an estimate. `prompt_estimate` is the pre-call
    /// count, used when the provider never said how long the prompt was.
    pub fn finish(&self, model: &str, prompt_estimate: u64) -> (Usage, bool) {
        if self.complete
            && let Some(u) = self.reported
        {
            return (u, false);
        }
        let delivered = tokens::count_text(model, &self.delivered);
        let mut u = self.reported.unwrap_or(Usage {
            input_tokens: prompt_estimate,
            ..Usage::default()
        });
        u.output_tokens = u.output_tokens.max(delivered);
        (u, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::{Framer, parse};
    use serde_json::json;

    fn run(dialect: Dialect, stream: &str) -> (StreamMeter, Vec<Disposition>) {
        let mut m = StreamMeter::new(dialect);
        let mut f = Framer::default();
        let d = f
            .push(stream.as_bytes())
            .iter()
            .map(|raw| m.observe(&parse(raw)))
            .collect();
        (m, d)
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
                    cache_write_input_tokens: 0,
                    output_tokens: 20,
                    reasoning_tokens: 8,
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
                json!({"object":"response","usage":{"input_tokens":50,"input_tokens_details":{"cached_tokens":10},
                    "output_tokens":30,"output_tokens_details":{"reasoning_tokens":12},"total_tokens":80}}),
                Usage {
                    input_tokens: 50,
                    cached_input_tokens: 10,
                    cache_write_input_tokens: 0,
                    output_tokens: 30,
                    reasoning_tokens: 12,
                },
            ),
            (
                Dialect::Anthropic,
                json!({"type":"message","usage":{"input_tokens":20,"cache_read_input_tokens":100,
                    "cache_creation_input_tokens":50,"output_tokens":7}}),
                Usage {
                    input_tokens: 170,
                    cached_input_tokens: 100,
                    cache_write_input_tokens: 50,
                    output_tokens: 7,
                    reasoning_tokens: 0,
                },
            ),
        ];
        for (d, body, want) in cases {
            assert_eq!(usage_from_body(d, &body), Some(want), "{body}");
        }
        assert_eq!(
            usage_from_body(Dialect::OpenAi, &json!({"usage": null})),
            None
        );
        assert_eq!(usage_from_body(Dialect::OpenAi, &json!({})), None);
    }

    const OPENAI: &str = concat!(
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hello world\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn openai_stream_with_usage_chunk() {
        let (m, d) = run(Dialect::OpenAi, OPENAI);
        assert_eq!(d[3], Disposition::UsageOnly);
        assert!(
            d.iter()
                .enumerate()
                .all(|(i, x)| i == 3 || *x == Disposition::Forward)
        );
        let (u, est) = m.finish("gpt-4o", 999);
        assert!(!est);
        assert_eq!(
            (u.input_tokens, u.cached_input_tokens, u.output_tokens),
            (12, 4, 2)
        );
    }

    #[test]
    fn openai_stream_cut_before_usage_is_estimated_from_delivered_text() {
        let cut = &OPENAI[..OPENAI.find("\"choices\":[],").unwrap()];
        let (m, _) = run(Dialect::OpenAi, cut);
        let (u, est) = m.finish("gpt-4o", 12);
        assert!(est);
        assert_eq!((u.input_tokens, u.output_tokens), (12, 2)); // "hello world" = 2 tokens
    }

    const ANTHROPIC: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":100,\"cache_creation_input_tokens\":0,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\ndata: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hello world\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    #[test]
    fn anthropic_stream() {
        let (m, d) = run(Dialect::Anthropic, ANTHROPIC);
        assert!(d.iter().all(|x| *x == Disposition::Forward));
        let (u, est) = m.finish("claude-sonnet-4", 0);
        assert!(!est);
        assert_eq!(
            (u.input_tokens, u.cached_input_tokens, u.output_tokens),
            (125, 100, 15)
        );
    }

    #[test]
    fn anthropic_stream_cut_after_start_keeps_provider_input_and_estimates_output() {
        let cut = &ANTHROPIC[..ANTHROPIC.find("event: content_block_stop").unwrap()];
        let (m, _) = run(Dialect::Anthropic, cut);
        let (u, est) = m.finish("claude-sonnet-4", 999);
        assert!(est);
        assert_eq!((u.input_tokens, u.cached_input_tokens), (125, 100));
        assert_eq!(u.output_tokens, 2);
    }

    #[test]
    fn stream_cut_before_anything_estimates_the_prompt() {
        let (m, _) = run(Dialect::Anthropic, "");
        assert_eq!(
            m.finish("claude-sonnet-4", 40),
            (
                Usage {
                    input_tokens: 40,
                    ..Usage::default()
                },
                true
            )
        );
    }

    #[test]
    fn responses_stream() {
        let s = concat!(
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hello world\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":2,\"output_tokens_details\":{\"reasoning_tokens\":1}}}}\n\n",
        );
        let (m, d) = run(Dialect::OpenAi, s);
        assert!(d.iter().all(|x| *x == Disposition::Forward));
        let (u, est) = m.finish("gpt-4o", 0);
        assert!(!est);
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.reasoning_tokens),
            (5, 2, 1)
        );
    }

    #[test]
    fn response_info_from_bodies_and_streams() {
        let info = |id: &str, model: Option<&str>, reasons: &[&str]| ResponseInfo {
            id: Some(id.to_owned()),
            model: model.map(str::to_owned),
            finish_reasons: reasons.iter().map(|r| (*r).to_owned()).collect(),
        };
        let bodies = [
            (
                json!({"id": "chatcmpl-1", "model": "gpt-4o-2024-08-06", "choices": [
                    {"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"},
                    {"index": 1, "message": {"content": "ho"}, "finish_reason": "length"}]}),
                info("chatcmpl-1", Some("gpt-4o-2024-08-06"), &["stop", "length"]),
            ),
            (
                json!({"id": "msg_1", "type": "message", "model": "claude-sonnet-4",
                    "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn"}),
                info("msg_1", Some("claude-sonnet-4"), &["end_turn"]),
            ),
            (
                json!({"object": "list", "data": [], "model": "text-embedding-3-small"}),
                ResponseInfo {
                    model: Some("text-embedding-3-small".into()),
                    ..ResponseInfo::default()
                },
            ),
        ];
        for (body, want) in bodies {
            assert_eq!(ResponseInfo::from_body(&body), want, "{body}");
        }
        let (m, _) = run(Dialect::OpenAi, OPENAI);
        assert_eq!(m.response(), &info("c", None, &["stop"]));
        let (m, _) = run(Dialect::Anthropic, ANTHROPIC);
        assert_eq!(m.response(), &info("m", None, &["end_turn"]));
        let created = "data: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"model\":\"gpt-4o\"}}\n\n";
        let (m, _) = run(Dialect::OpenAi, created);
        assert_eq!(m.response(), &info("resp_1", Some("gpt-4o"), &[]));
    }

    #[test]
    fn garbage_events_are_forwarded_and_ignored() {
        let (m, d) = run(
            Dialect::OpenAi,
            "data: {not json\n\n: keep-alive\n\ndata: [DONE]\n\n",
        );
        assert!(d.iter().all(|x| *x == Disposition::Forward));
        assert!(!m.complete());
    }
}
