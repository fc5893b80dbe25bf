//! The endpoints the sidecar serves, and what each one needs from it.

use soma_metering::wire::Dialect;

use crate::config::ProviderKind;

/// A served endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// `POST /v1/responses`.
    Responses,
    /// `POST /v1/responses/compact` (a billed summary of a conversation).
    ResponsesCompact,
    /// `GET /v1/models`.
    Models,
    /// `POST /v1/messages` (Anthropic).
    Messages,
    /// `POST /v1/messages/count_tokens` (Anthropic).
    CountTokens,
}

impl Endpoint {
    /// Every endpoint, for routing.
    pub const ALL: [Endpoint; 8] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Responses,
        Endpoint::ResponsesCompact,
        Endpoint::Models,
        Endpoint::Messages,
        Endpoint::CountTokens,
    ];

    /// The request path.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Responses => "/v1/responses",
            Endpoint::ResponsesCompact => "/v1/responses/compact",
            Endpoint::Models => "/v1/models",
            Endpoint::Messages => "/v1/messages",
            Endpoint::CountTokens => "/v1/messages/count_tokens",
        }
    }

    /// A short label for metrics, logs and records.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::ResponsesCompact => "responses_compact",
            Endpoint::Models => "models",
            Endpoint::Messages => "messages",
            Endpoint::CountTokens => "count_tokens",
        }
    }

    /// The wire format of requests, responses and errors.
    pub fn dialect(self) -> Dialect {
        match self {
            Endpoint::Messages | Endpoint::CountTokens => Dialect::Anthropic,
            _ => Dialect::OpenAi,
        }
    }

    /// Whether calls cost tokens (and so are estimated, reserved and recorded).
    pub fn metered(self) -> bool {
        !matches!(self, Endpoint::Models | Endpoint::CountTokens)
    }

    /// Whether OpenAI needs `stream_options.include_usage` to report a stream's usage.
    pub fn needs_include_usage(self) -> bool {
        matches!(self, Endpoint::ChatCompletions | Endpoint::Completions)
    }

    /// Whether the request has no generated output (worst case is the prompt alone).
    pub fn input_only(self) -> bool {
        matches!(self, Endpoint::Embeddings)
    }

    /// Whether `provider` serves this endpoint.
    pub fn served_by(self, provider: ProviderKind) -> bool {
        match provider {
            ProviderKind::Anthropic => self.dialect() == Dialect::Anthropic,
            ProviderKind::Openai | ProviderKind::OpenaiCompatible => {
                self.dialect() == Dialect::OpenAi
            }
        }
    }
}
