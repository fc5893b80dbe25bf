//! Following one SSE stream: what the relay forwards, and the stream's usage once it ends.

use serde_json::Value;

use super::usage::{Metered, metered_from_body};
use super::{Dialect, ResponseInfo};
use crate::sse::Event;
use crate::tokens;
use crate::usage::Usage;

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
    /// The usage so far, in the shape of a response body (`{"usage": …}`, plus OpenAI's
    /// `output` and `tool_usage` for the responses API): OpenAI's chunk that carried usage or
    /// the response of `response.completed`; Anthropic's `message_start` usage with each
    /// `message_delta` usage laid over it.
    carrier: Option<Value>,
    /// Whether the provider's closing usage arrived (OpenAI usage chunk, Anthropic
    /// `message_delta`, responses `response.completed`).
    complete: bool,
    /// Text delivered to the client, for estimates.
    delivered: String,
    /// Response id, model and finish reasons, for traces.
    info: ResponseInfo,
    /// The type of the first error event the provider sent inside the stream.
    error: Option<String>,
}

impl StreamMeter {
    /// A meter for one stream.
    pub fn new(dialect: Dialect) -> Self {
        StreamMeter {
            dialect,
            carrier: None,
            complete: false,
            delivered: String::new(),
            info: ResponseInfo::default(),
            error: None,
        }
    }

    /// Reads one event.
    pub fn observe(&mut self, ev: &Event) -> Disposition {
        let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
            return Disposition::Forward; // `[DONE]`, pings, or garbage: nothing to meter
        };
        if self.error.is_none() {
            self.error = error_type(ev.event.as_deref(), &v);
        }
        match self.dialect {
            Dialect::OpenAi => self.openai(v),
            Dialect::Anthropic => {
                self.anthropic(ev.event.as_deref(), v);
                Disposition::Forward
            }
        }
    }

    fn openai(&mut self, v: Value) -> Disposition {
        // Responses API events carry a `type`.
        if let Some(kind) = v.get("type").and_then(Value::as_str) {
            if let Some(r) = v.get("response") {
                self.info.take_ids(r);
            }
            match kind {
                "response.completed" | "response.incomplete" | "response.failed" => {
                    if let Some(r) = v.get("response").filter(|r| has_usage(r)) {
                        self.carrier = Some(r.clone());
                        self.complete = true;
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
        self.info.take_ids(&v);
        self.info.take_finish_reasons(&v);
        let choices = v.get("choices").and_then(Value::as_array);
        for choice in choices.into_iter().flatten() {
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
        if !has_usage(&v) {
            return Disposition::Forward;
        }
        // The usage chunk of `include_usage`, or (some compatible providers) the finish chunk.
        let usage_only = choices.is_some_and(Vec::is_empty);
        self.carrier = Some(v);
        self.complete = true;
        if usage_only {
            Disposition::UsageOnly
        } else {
            Disposition::Forward
        }
    }

    fn anthropic(&mut self, event: Option<&str>, v: Value) {
        let kind = event.or_else(|| v.get("type").and_then(Value::as_str));
        match kind {
            Some("message_start") => {
                if let Some(m) = v.get("message") {
                    self.info.take_ids(m);
                }
                if let Some(u) = v.pointer("/message/usage").filter(|u| u.is_object()) {
                    self.carrier = Some(serde_json::json!({ "usage": u }));
                }
            }
            Some("message_delta") => {
                if let Some(r) = v.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.info.finish_reasons.push(r.to_owned());
                }
                if let Some(Value::Object(delta)) = v.get("usage") {
                    // Cumulative: each field the delta carries replaces the start's; the start
                    // alone has some (the cache TTL split), newer deltas add others (the final
                    // input after server tools, compaction iterations).
                    let carrier = self
                        .carrier
                        .get_or_insert_with(|| serde_json::json!({ "usage": {} }));
                    if let Some(Value::Object(usage)) = carrier.get_mut("usage") {
                        for (k, x) in delta {
                            usage.insert(k.clone(), x.clone());
                        }
                    }
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

    /// The type of the error event the provider sent inside the stream, if it sent one
    /// (OpenAI `{"error": …}` chunks, Anthropic `error` events, responses `response.failed`
    /// and `error`).
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Whether the provider's closing usage arrived.
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// The stream's usage, and whether it is an estimate. `prompt_estimate` gives the pre-call
    /// count, asked for only when the provider never said how long the prompt was.
    pub fn finish(&self, model: &str, prompt_estimate: impl FnOnce() -> u64) -> (Metered, bool) {
        let reported = self
            .carrier
            .as_ref()
            .and_then(|c| metered_from_body(self.dialect, c));
        if self.complete
            && let Some(m) = reported
        {
            return (m, false);
        }
        let delivered = tokens::count_text(model, &self.delivered);
        let mut m = reported.unwrap_or(Metered {
            usage: Usage {
                input_tokens: prompt_estimate(),
                ..Usage::default()
            },
            unmetered: Vec::new(),
        });
        m.usage.output_tokens = m.usage.output_tokens.max(delivered);
        (m, true)
    }
}

/// The error an event reports, by its type (or code), if it is an error event.
fn error_type(event: Option<&str>, v: &Value) -> Option<String> {
    let kind = event.or_else(|| v.get("type").and_then(Value::as_str));
    let err = match kind {
        Some("error") => v.get("error").unwrap_or(v),
        Some("response.failed") => v.pointer("/response/error").unwrap_or(v),
        _ => v.get("error").filter(|e| e.is_object())?,
    };
    let name = ["type", "code"]
        .iter()
        .find_map(|k| err.get(*k).and_then(Value::as_str))
        .unwrap_or("error");
    Some(name.to_owned())
}

/// Whether `v` carries a usage object (OpenAI sends `"usage": null` on every other chunk).
fn has_usage(v: &Value) -> bool {
    v.get("usage").is_some_and(Value::is_object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::{Framer, parse};
    use crate::wire::ResponseInfo;
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
        let (u, est) = m.finish("gpt-4o", || 999);
        let u = u.usage;
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
        let (u, est) = m.finish("gpt-4o", || 12);
        let u = u.usage;
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
        let (u, est) = m.finish("claude-sonnet-4", || 0);
        let u = u.usage;
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
        let (u, est) = m.finish("claude-sonnet-4", || 999);
        let u = u.usage;
        assert!(est);
        assert_eq!((u.input_tokens, u.cached_input_tokens), (125, 100));
        assert_eq!(u.output_tokens, 2);
    }

    #[test]
    fn anthropic_stream_deltas_replace_what_they_carry() {
        // Web search: the final input is only in message_delta; the 1h split only in the start.
        let s = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":2684,\"cache_creation_input_tokens\":3913,\"cache_read_input_tokens\":0,\"cache_creation\":{\"ephemeral_5m_input_tokens\":0,\"ephemeral_1h_input_tokens\":3913},\"output_tokens\":3}}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":10387,\"cache_creation_input_tokens\":3913,\"cache_read_input_tokens\":0,\"output_tokens\":310,\"server_tool_use\":{\"web_search_requests\":1}}}\n\n",
        );
        let (m, _) = run(Dialect::Anthropic, s);
        let (u, est) = m.finish("claude-sonnet-4", || 0);
        assert!(!est);
        assert_eq!(
            u.usage,
            Usage {
                input_tokens: 10387 + 3913,
                cache_write_input_tokens: 3913,
                cache_write_1h_input_tokens: 3913,
                output_tokens: 310,
                web_search_requests: 1,
                ..Usage::default()
            }
        );
        // Compaction: the iterations arrive in message_delta and are summed.
        let s = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":100,\"cache_read_input_tokens\":55096,\"output_tokens\":7}}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"input_tokens\":181,\"cache_read_input_tokens\":0,\"output_tokens\":8,\"iterations\":[{\"type\":\"compaction\",\"input_tokens\":100,\"output_tokens\":83,\"cache_read_input_tokens\":55096},{\"type\":\"message\",\"input_tokens\":181,\"output_tokens\":8,\"cache_read_input_tokens\":0}]}}\n\n",
        );
        let (m, _) = run(Dialect::Anthropic, s);
        let (u, _) = m.finish("claude-sonnet-4", || 0);
        assert_eq!(
            (
                u.usage.input_tokens,
                u.usage.cached_input_tokens,
                u.usage.output_tokens
            ),
            (100 + 55096 + 181, 55096, 91)
        );
    }

    #[test]
    fn stream_cut_before_anything_estimates_the_prompt() {
        let (m, _) = run(Dialect::Anthropic, "");
        assert_eq!(
            m.finish("claude-sonnet-4", || 40),
            (
                Metered {
                    usage: Usage {
                        input_tokens: 40,
                        ..Usage::default()
                    },
                    unmetered: Vec::new(),
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
        let (u, est) = m.finish("gpt-4o", || 0);
        let u = u.usage;
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
    fn error_events_are_noticed() {
        let cases = [
            (
                Dialect::OpenAi,
                "data: {\"error\":{\"message\":\"x\",\"type\":\"server_error\"}}\n\n",
                Some("server_error"),
            ),
            (
                Dialect::Anthropic,
                "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
                Some("overloaded_error"),
            ),
            (
                Dialect::OpenAi,
                "event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"error\":{\"code\":\"server_error\"}}}\n\n",
                Some("server_error"),
            ),
            (Dialect::OpenAi, OPENAI, None),
            (Dialect::Anthropic, ANTHROPIC, None),
        ];
        for (d, s, want) in cases {
            let (m, _) = run(d, s);
            assert_eq!(m.error(), want, "{s}");
        }
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
