//! What a response says about itself, for traces.

use serde_json::Value;

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
    pub(super) fn take_ids(&mut self, v: &Value) {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        if self.id.is_none() {
            self.id = s("id");
        }
        if self.model.is_none() {
            self.model = s("model");
        }
    }

    /// OpenAI's per-choice reasons (set on a stream's last chunk of each choice).
    pub(super) fn take_finish_reasons(&mut self, v: &Value) {
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
