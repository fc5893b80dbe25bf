//! What every request shares.

use std::sync::Arc;
use std::time::{Duration, Instant};

use soma_metering::wire::Metered;
use soma_metering::{Amount, Price, Reservation};

use crate::budgets::Budgets;
use crate::config::Config;
use crate::connections::Connections;
use crate::keys::KeyHolder;
use crate::load::{Arrival, LoadMeter};
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Settlement};
use crate::upstream::Upstream;

/// Shared, read-mostly state behind an `Arc`.
#[derive(Debug)]
pub struct AppState {
    /// Requests being served, bounded by `maxInFlight`.
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// The configuration file.
    pub config: Config,
    /// The per-pod client token.
    pub client_token: String,
    /// The provider key (from a file, or kept current from Vault), or why there is none.
    pub keys: KeyHolder,
    /// Upstream HTTP client.
    pub client: Connections,
    /// The provider's base URL, parsed.
    pub upstream: Upstream,
    /// Budgets.
    pub authority: Budgets,
    /// Durable usage.
    pub outbox: Outbox,
    /// Prometheus.
    pub metrics: Metrics,
    /// The load reported to the autoscaler (`GET /load`).
    pub load: Arc<LoadMeter>,
    /// The brown-out in force (live configuration), if any.
    pub brown_out: crate::brownout::BrownOutGate,
    /// How the ledger is reached (with `databaseUrl`): every pool, and the credentials from
    /// Vault when `ledgerCredentials` says so.
    pub ledger: Option<Arc<crate::ledger_access::LedgerAccess>>,
    /// The pod's Capsules for recall, and the revocations in force (live configuration).
    pub capsules: crate::recall::Shelf,
}

/// A request's place among those in flight: released (and the gauge lowered) when the request
/// is done, for a stream when its last byte is metered.
#[derive(Debug)]
pub struct InFlight {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: prometheus_client::metrics::gauge::Gauge,
    /// When it was admitted: a request's service time runs from here.
    pub admitted: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl AppState {
    /// Admits a request, unless `maxInFlight` are already being served.
    pub fn admit(&self) -> Option<InFlight> {
        let permit = self.in_flight.clone().try_acquire_owned().ok()?;
        let gauge = self.metrics.in_flight().clone();
        gauge.inc();
        Some(InFlight {
            _permit: permit,
            gauge,
            admitted: Instant::now(),
        })
    }

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
    /// What is known of the prompt's tokens before the call.
    pub prompt: crate::request::Prompt,
    /// The call's GenAI span, held until the charge is settled so that it closes after the
    /// usage is known (for a stream, after the relay has metered it).
    pub span: tracing::Span,
    /// Its place among the requests in flight, given up when it is settled.
    pub in_flight: InFlight,
    /// Its arrival in the load report, completed when it is settled.
    pub arrival: Arrival,
}

impl Charge {
    /// Settles with what the call used (zero usage releases the reservation), records it
    /// durably (one journal append) and in metrics. A journal failure is logged and counted:
    /// the spend is already in the budget authority and the row stays open, to be settled at
    /// worst case on the next start.
    ///
    /// The record lists what was not metered: the provider's usage fields the sidecar does not
    /// know or price (`metered.unmetered`) and server-tool uses the model's price leaves
    /// unpriced.
    pub fn settle(
        self,
        state: &AppState,
        metered: Metered,
        estimated: bool,
        outcome: &'static str,
        http_status: u16,
    ) {
        let now = jiff::Timestamp::now();
        let Metered {
            usage,
            mut unmetered,
        } = metered;
        if let Some(p) = &self.price {
            unmetered.extend(p.unpriced(&usage).into_iter().map(str::to_owned));
        }
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
        for field in &unmetered {
            state.metrics.unmetered(field);
        }
        let settlement = Settlement {
            usage,
            unmetered: unmetered.join(","),
            cost_micros: amount.micros,
            estimated,
            outcome,
            http_status,
        };
        if let Err(e) = state.outbox.settle(&self.id, &settlement, now) {
            tracing::error!(error = %e, id = %self.id, "outbox settle failed; the row stays open");
            state.metrics.error("outbox");
        }
        state
            .metrics
            .usage(&self.model, &usage, amount.micros, estimated);
        state.load.complete(self.arrival, &usage);
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
