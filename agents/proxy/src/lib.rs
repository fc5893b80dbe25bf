//! `soma-proxy`, the metering sidecar in every agent pod.
//!
//! It holds the provider key (the agent container never sees it), authenticates the agent with
//! the per-pod token, forwards OpenAI- and Anthropic-format calls to the configured upstream
//! byte for byte, meters them from the provider's own usage numbers, enforces the Agent's
//! Budget before a call leaves, and writes every call's usage to a durable local outbox.
//!
//! ```text
//!  agent ──127.0.0.1:4000──► handler ──► budgets (embedded, or cluster: leases in PostgreSQL) ──► outbox (SQLite WAL)
//!                               │                                     ▲
//!                               └──► upstream (key injected) ──► relay/settle
//!  outbox ──(background)──► ledger (PostgreSQL) and events (NATS JetStream), idempotent
//!  vault (optional) ──► keys (the provider key, swapped atomically on rotation)
//!  /v1/recall, /mcp (tool capsule_recall) ──► recall (the pod's Capsules, checked against their digests; query embedded by the metered call)
//!  revocations (file, ledger) ──► live ──► recall refuses; withdraw moves the folder out of the agent's view
//!  Prometheus, operator ──:9090──► admin (/healthz, /readyz, /metrics, /load: the autoscaler's signal)
//!  each call ──► one GenAI span (genai_span), exported over OTLP when configured
//! ```
//!
//! The domain arithmetic (prices, periods, reservations, usage parsing) is in `soma-metering`.
#![forbid(unsafe_code)]

pub mod authority;
pub mod brownout;
pub mod budgets;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod endpoint;
pub mod error;
pub mod events;
pub mod fake_upstream;
pub mod forward;
pub mod genai_span;
pub mod handler;
pub mod journal;
pub mod keys;
pub mod lease;
pub mod ledger;
pub mod ledger_access;
pub mod live;
pub mod load;
pub mod mcp;
pub mod metrics;
pub mod outbox;
pub mod queue;
pub mod recall;
pub mod relay;
pub mod request;
pub mod reserve;
pub mod server;
pub mod state;
pub mod upstream;
pub mod vault;
pub mod withdraw;

pub use config::Config;
pub use server::{Running, StartError, start};
