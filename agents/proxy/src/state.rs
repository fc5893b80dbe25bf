//! What every request shares.

use std::time::Duration;

use soma_metering::{Amount, Price, Reservation, Usage};

use crate::budgets::Budgets;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Settlement};
use crate::upstream::{ProviderKey, UpstreamClient};

/// Shared, read-mostly state behind an `Arc`.
#[derive(Debug)]
pub struct AppState {
    /// The configuration file.
    pub config: Config,
    /// The per-pod client token.
    pub client_token: String,
    /// The provider key.
    pub key: ProviderKey,
    /// Upstream HTTP client.
    pub client: UpstreamClient,
    /// Budgets.
    pub authority: Budgets,
    /// Durable usage.
    pub outbox: Outbox,
    /// Prometheus.
    pub metrics: Metrics,
}

impl AppState {
    /// Idle timeout between body chunks.
    pub fn idle(&self) -> Duration {
        Duration::from_millis(self.config.timeouts.idle_ms)
    }

    /// Time allowed for the upstream's response headers.
    pub fn response_headers_timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeouts.response_headers_ms)
    }
}

/// A metered request in flight: its outbox row and its reservations, settled exactly once.
#[derive(Debug)]
#[must_use = "a charge must be settled"]
pub struct Charge {
    /// Outbox id (idempotency key).
    pub id: String,
    /// Reservations on the Budget chain.
    pub reservations: Vec<Reservation>,
    /// Model sent upstream.
    pub model: String,
    /// Its price (None: cost not metered).
    pub price: Option<Price>,
    /// Pre-call prompt estimate.
    pub prompt_estimate: u64,
    /// The call's GenAI span, held until the charge is settled so that it closes after the
    /// usage is known (for a stream, after the relay has metered it).
    pub span: tracing::Span,
}

impl Charge {
    /// Settles with `usage` (zero usage releases the reservation), records it durably and in
    /// metrics. An outbox failure is logged and counted: the spend is already in the budget
    /// authority and the row stays open, to be settled at worst case on the next start.
    pub async fn settle(
        self,
        state: &AppState,
        usage: Usage,
        estimated: bool,
        outcome: &'static str,
        http_status: u16,
    ) {
        let now = jiff::Timestamp::now();
        let amount = Amount::of(&usage, self.price.as_ref());
        if amount == Amount::default() {
            state.authority.release(now, self.reservations);
        } else {
            state.authority.settle(now, self.reservations, amount);
        }
        crate::genai_span::record_settlement(
            &self.span,
            &usage,
            amount.micros,
            estimated,
            outcome,
            http_status,
        );
        let settlement = Settlement {
            usage,
            cost_micros: amount.micros,
            estimated,
            outcome,
            http_status,
        };
        if let Err(e) = state.outbox.settle(&self.id, &settlement, now).await {
            tracing::error!(error = %e, id = %self.id, "outbox settle failed; the row stays open");
            state.metrics.error("outbox");
        }
        state
            .metrics
            .usage(&self.model, &usage, amount.micros, estimated);
        for (budget, left) in state.authority.remaining_micros(now) {
            if let Some(left) = left {
                state.metrics.budget_remaining(&budget, left);
            }
        }
        // Debug, not info: at a thousand requests a second the outbox is the record, and a
        // formatted log line per request is measurable on the request path.
        tracing::debug!(
            id = %self.id,
            gen_ai.request.model = %self.model,
            gen_ai.usage.input_tokens = usage.input_tokens,
            gen_ai.usage.output_tokens = usage.output_tokens,
            cached_input_tokens = usage.cached_input_tokens,
            cost_micros = amount.micros,
            estimated,
            outcome,
            "usage recorded"
        );
    }
}
