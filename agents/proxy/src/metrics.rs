//! Prometheus metrics: one registry, the `soma_proxy` sub-registry. Tokens and cost are
//! labelled by namespace, agent and model (STYLE.md, convention 10).

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Mutex, PoisonError};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use soma_metering::{BudgetKey, Usage};

type Labels = Vec<(&'static str, String)>;

/// The sidecar's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    namespace: String,
    agent: String,
    requests: Family<Labels, Counter>,
    tokens: Family<Labels, Counter>,
    cost: Family<Labels, Counter>,
    refusals: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    budget_remaining: Family<Labels, Gauge<i64, AtomicI64>>,
    upstream_latency: Family<Labels, Histogram>,
    added_latency: Family<Labels, Histogram>,
    in_flight: Gauge,
    estimated: Counter,
    live_updates: Family<Labels, Counter>,
    deliveries: Family<Labels, Counter>,
    delivered: Family<Labels, Counter>,
    backlog: Family<Labels, Gauge>,
    backlog_age: Family<Labels, Gauge<f64, AtomicU64>>,
    tool_uses: Family<Labels, Counter>,
    unmetered: Family<Labels, Counter>,
    stream_endings: Family<Labels, Counter>,
    credential_refreshes: Family<Labels, Counter>,
    credentials_ready: Gauge,
    ledger_credential_refreshes: Family<Labels, Counter>,
    ledger_credentials_ready: Gauge,
    /// Distinct `field` series of `unmetered` made so far.
    unmetered_fields: std::sync::atomic::AtomicUsize,
    /// Series the request path touches, looked up once and kept.
    hot: Mutex<Hot>,
}

/// Handles to the series each request increments, by the label values that pick them, so
/// that the request path increments atomics instead of building label sets and hashing them.
/// A handle shares its series with the family; the lists stay short (models × statuses), and
/// past [`HOT_LIMIT`] entries a lookup goes to the family each time.
#[derive(Debug, Default)]
struct Hot {
    requests: Vec<((&'static str, String, u16), Counter)>,
    models: Vec<(String, ModelSeries)>,
    added: Vec<(&'static str, Histogram)>,
    upstream: Vec<(&'static str, Histogram)>,
}

/// A model's usage series.
#[derive(Clone, Debug)]
struct ModelSeries {
    /// Tokens by [`TOKEN_KINDS`].
    tokens: [Counter; 6],
    /// Server-tool uses by [`TOOLS`].
    tools: [Counter; 2],
    cost: Counter,
}

/// The `kind` label of `soma_proxy_tokens_total`, in [`ModelSeries::tokens`] order.
const TOKEN_KINDS: [&str; 6] = [
    "input",
    "cached_input",
    "cache_write_input",
    "cache_write_1h_input",
    "output",
    "reasoning",
];

/// The `outcome` label of `soma_proxy_stream_endings_total` (the relay's outcomes), exposed
/// from the start at 0.
const STREAM_OUTCOMES: [&str; 5] = [
    "ok",
    "client_disconnected",
    "upstream_cut",
    "upstream_timeout",
    "upstream_error_event",
];

/// The `tool` label of `soma_proxy_tool_uses_total`, in [`ModelSeries::tools`] order.
const TOOLS: [&str; 2] = ["web_search", "web_fetch"];

/// Distinct `field` values `soma_proxy_unmetered_usage_total` keeps; further fields count
/// under `other` (the paths come from the provider's responses).
const UNMETERED_FIELDS_LIMIT: usize = 64;

/// Most entries kept per list of [`Hot`].
const HOT_LIMIT: usize = 256;

/// The handle kept in `list` under `key`, made by `make` (and kept) on first use.
fn hot<K: PartialEq, M: Clone>(
    lock: &Mutex<Hot>,
    list: impl Fn(&mut Hot) -> &mut Vec<(K, M)>,
    find: impl Fn(&K) -> bool,
    key: impl FnOnce() -> K,
    make: impl FnOnce() -> M,
) -> M {
    let mut guard = lock.lock().unwrap_or_else(PoisonError::into_inner);
    let entries = list(&mut guard);
    if let Some((_, m)) = entries.iter().find(|(k, _)| find(k)) {
        return m.clone();
    }
    let m = make();
    if entries.len() < HOT_LIMIT {
        entries.push((key(), m.clone()));
    }
    m
}

impl Metrics {
    /// Metrics for one Agent's sidecar.
    pub fn new(namespace: &str, agent: &str) -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        let tokens = Family::<Labels, Counter>::default();
        let cost = Family::<Labels, Counter>::default();
        let refusals = Family::<Labels, Counter>::default();
        let errors = Family::<Labels, Counter>::default();
        let budget_remaining = Family::<Labels, Gauge<i64, AtomicI64>>::default();
        let upstream_latency = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        let added_latency = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_025, 2.0, 14))
        });
        let in_flight = Gauge::default();
        let estimated = Counter::default();
        let live_updates = Family::<Labels, Counter>::default();
        let deliveries = Family::<Labels, Counter>::default();
        let delivered = Family::<Labels, Counter>::default();
        let backlog = Family::<Labels, Gauge>::default();
        let backlog_age = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let tool_uses = Family::<Labels, Counter>::default();
        let unmetered = Family::<Labels, Counter>::default();
        let stream_endings = Family::<Labels, Counter>::default();
        let credential_refreshes = Family::<Labels, Counter>::default();
        for outcome in ["ok", "rotated"]
            .into_iter()
            .chain(crate::keys::Reason::ALL.map(crate::keys::Reason::as_str))
            .filter(|o| *o != "VaultPending" && *o != "ProviderRejectedKey")
        {
            let _ = credential_refreshes.get_or_create(&vec![("outcome", outcome.to_owned())]);
        }
        let credentials_ready = Gauge::default();
        credentials_ready.set(1);
        // Registered by every sidecar, written only by one with ledger credentials from Vault.
        let ledger_credential_refreshes = Family::<Labels, Counter>::default();
        for outcome in ["issued", "renewed"]
            .into_iter()
            .chain(soma_contract::readiness::LEDGER_REASONS)
            .filter(|o| *o != "LedgerCredentialsPending")
        {
            let _ =
                ledger_credential_refreshes.get_or_create(&vec![("outcome", outcome.to_owned())]);
        }
        let ledger_credentials_ready = Gauge::default();
        for outcome in STREAM_OUTCOMES {
            let _ = stream_endings.get_or_create(&vec![("outcome", outcome.to_owned())]);
        }
        // Every failure reason exists from the start at 0, so that `increase()` sees the first.
        for reason in crate::error::REASONS {
            let _ = errors.get_or_create(&vec![("reason", reason.to_owned())]);
        }
        let r = registry.sub_registry_with_prefix("soma_proxy");
        r.register(
            "requests",
            "Requests answered, by endpoint, model and status",
            requests.clone(),
        );
        r.register(
            "tokens",
            "Tokens metered, by kind (input, cached_input, cache_write_input, output, reasoning)",
            tokens.clone(),
        );
        r.register(
            "cost_micros",
            "Cost metered, in micro-units of the price table's currency",
            cost.clone(),
        );
        r.register(
            "budget_refusals",
            "Requests refused by a Budget, by Budget and limit",
            refusals.clone(),
        );
        r.register(
            "errors",
            "Requests that failed in the sidecar or upstream, by reason",
            errors.clone(),
        );
        r.register(
            "budget_remaining_micros",
            "Cost left under the Budget's costMicros cap",
            budget_remaining.clone(),
        );
        r.register(
            "upstream_latency_seconds",
            "From sending upstream to the upstream's response headers",
            upstream_latency.clone(),
        );
        r.register(
            "added_latency_seconds",
            "Time the sidecar adds before forwarding and after the upstream's headers",
            added_latency.clone(),
        );
        r.register(
            "in_flight_requests",
            "Requests being served",
            in_flight.clone(),
        );
        r.register(
            "estimated_records",
            "Usage records the sidecar had to estimate",
            estimated.clone(),
        );
        r.register(
            "live_updates",
            "Live Budget definition changes, by source (file, ledger) and outcome (applied, refused)",
            live_updates.clone(),
        );
        r.register(
            "deliveries",
            "Delivery rounds from the outbox, by sink (ledger, nats) and outcome (ok, failed)",
            deliveries.clone(),
        );
        r.register(
            "delivered_records",
            "Usage records delivered from the outbox, by sink (ledger, nats)",
            delivered.clone(),
        );
        r.register(
            "outbox_pending_records",
            "Settled usage records in the outbox not yet delivered, by sink (read when scraped)",
            backlog.clone(),
        );
        r.register(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest settled record not yet delivered, by sink (0 when none)",
            backlog_age.clone(),
        );
        r.register(
            "tool_uses",
            "Server-tool uses the provider billed per use, by tool (web_search, web_fetch)",
            tool_uses.clone(),
        );
        r.register(
            "unmetered_usage",
            "Usage records with a usage field the sidecar did not meter, by field (an unknown \
             provider field, a known one without a price, or a tool use without a per-use price)",
            unmetered.clone(),
        );
        r.register(
            "stream_endings",
            "Streamed responses by how they ended (ok, client_disconnected, upstream_cut, \
             upstream_timeout, upstream_error_event)",
            stream_endings.clone(),
        );
        r.register(
            "credential_refreshes",
            "Provider-key reads from Vault, by outcome (ok, rotated, or the failure's reason)",
            credential_refreshes.clone(),
        );
        r.register(
            "credentials_ready",
            "1 when the sidecar holds a provider key the provider has not refused, else 0",
            credentials_ready.clone(),
        );
        r.register(
            "ledger_credential_refreshes",
            "Reads and renewals of the ledger's PostgreSQL user from Vault's database secrets \
             engine, by outcome (issued, renewed, or the failure's Ledger… reason)",
            ledger_credential_refreshes.clone(),
        );
        r.register(
            "ledger_credentials_ready",
            "1 when the sidecar holds a ledger user from Vault whose lease has not ended, else 0 \
             (always 0 without ledgerCredentials)",
            ledger_credentials_ready.clone(),
        );
        Metrics {
            registry,
            namespace: namespace.to_owned(),
            agent: agent.to_owned(),
            requests,
            tokens,
            cost,
            refusals,
            errors,
            budget_remaining,
            upstream_latency,
            added_latency,
            in_flight,
            estimated,
            live_updates,
            deliveries,
            delivered,
            backlog,
            backlog_age,
            tool_uses,
            unmetered,
            stream_endings,
            credential_refreshes,
            credentials_ready,
            ledger_credential_refreshes,
            ledger_credentials_ready,
            unmetered_fields: std::sync::atomic::AtomicUsize::new(0),
            hot: Mutex::default(),
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// One request answered.
    pub fn request(&self, endpoint: &'static str, model: &str, status: u16) {
        hot(
            &self.hot,
            |h| &mut h.requests,
            |(e, m, s)| *e == endpoint && m == model && *s == status,
            || (endpoint, model.to_owned(), status),
            || {
                self.requests
                    .get_or_create(&vec![
                        ("endpoint", endpoint.to_owned()),
                        ("model", model.to_owned()),
                        ("status", status.to_string()),
                    ])
                    .clone()
            },
        )
        .inc();
    }

    /// Metered usage.
    pub fn usage(&self, model: &str, usage: &Usage, cost_micros: u64, estimated: bool) {
        let series = hot(
            &self.hot,
            |h| &mut h.models,
            |m| m == model,
            || model.to_owned(),
            || {
                let labels = |kind: Option<&str>| {
                    let mut l = vec![
                        ("namespace", self.namespace.clone()),
                        ("agent", self.agent.clone()),
                        ("model", model.to_owned()),
                    ];
                    l.extend(kind.map(|k| ("kind", k.to_owned())));
                    l
                };
                let tool = |t: &str| {
                    let mut l = labels(None);
                    l.push(("tool", t.to_owned()));
                    self.tool_uses.get_or_create(&l).clone()
                };
                ModelSeries {
                    tokens: TOKEN_KINDS
                        .map(|kind| self.tokens.get_or_create(&labels(Some(kind))).clone()),
                    tools: TOOLS.map(tool),
                    cost: self.cost.get_or_create(&labels(None)).clone(),
                }
            },
        );
        let counts = [
            usage.input_tokens,
            usage.cached_input_tokens,
            usage.cache_write_input_tokens,
            usage.cache_write_1h_input_tokens,
            usage.output_tokens,
            usage.reasoning_tokens,
        ];
        for (counter, n) in series.tokens.iter().zip(counts) {
            if n > 0 {
                counter.inc_by(n);
            }
        }
        let uses = [usage.web_search_requests, usage.web_fetch_requests];
        for (counter, n) in series.tools.iter().zip(uses) {
            if n > 0 {
                counter.inc_by(n);
            }
        }
        series.cost.inc_by(cost_micros);
        if estimated {
            self.estimated.inc();
        }
    }

    /// A usage record with `field` not metered.
    pub fn unmetered(&self, field: &str) {
        let labels = vec![("field", field.to_owned())];
        let known = self.unmetered.get(&labels).is_some();
        if known {
            self.unmetered.get_or_create(&labels).inc();
            return;
        }
        let distinct = self
            .unmetered_fields
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let labels = if distinct < UNMETERED_FIELDS_LIMIT {
            labels
        } else {
            vec![("field", "other".to_owned())]
        };
        self.unmetered.get_or_create(&labels).inc();
    }

    /// A streamed response ended with `outcome`.
    pub fn stream_ending(&self, outcome: &str) {
        self.stream_endings
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc();
    }

    /// A Budget refusal.
    pub fn refusal(&self, budget: &BudgetKey, limit: &str) {
        self.refusals
            .get_or_create(&vec![
                ("budget_namespace", budget.namespace.clone()),
                ("budget", budget.name.clone()),
                ("limit", limit.to_owned()),
            ])
            .inc();
    }

    /// A live configuration change from `source` (`file`, `ledger`), `applied` or `refused`.
    pub fn live_update(&self, source: &str, outcome: &str) {
        self.live_updates
            .get_or_create(&vec![
                ("source", source.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }

    /// One read of the provider key from Vault, by outcome.
    pub fn credential_refresh(&self, outcome: &str) {
        self.credential_refreshes
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc();
    }

    /// Whether a usable provider key is held.
    pub fn credentials_ready(&self, ready: bool) {
        self.credentials_ready.set(i64::from(ready));
    }

    /// One round of the ledger's credentials from Vault, by outcome.
    pub fn ledger_credential_refresh(&self, outcome: &str) {
        self.ledger_credential_refreshes
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc();
    }

    /// Whether a ledger user from Vault whose lease has not ended is held.
    pub fn ledger_credentials_ready(&self, ready: bool) {
        self.ledger_credentials_ready.set(i64::from(ready));
    }

    /// A failure, by the error's label.
    pub fn error(&self, reason: &str) {
        self.errors
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc();
    }

    /// What a Budget has left.
    pub fn budget_remaining(&self, budget: &BudgetKey, micros: u64) {
        self.budget_remaining
            .get_or_create(&vec![
                ("budget_namespace", budget.namespace.clone()),
                ("budget", budget.name.clone()),
            ])
            .set(i64::try_from(micros).unwrap_or(i64::MAX));
    }

    /// Time to the upstream's headers.
    pub fn upstream_latency(&self, endpoint: &'static str, secs: f64) {
        hot(
            &self.hot,
            |h| &mut h.upstream,
            |e| *e == endpoint,
            || endpoint,
            || {
                self.upstream_latency
                    .get_or_create(&vec![("endpoint", endpoint.to_owned())])
                    .clone()
            },
        )
        .observe(secs);
    }

    /// Time the sidecar added.
    pub fn added_latency(&self, endpoint: &'static str, secs: f64) {
        hot(
            &self.hot,
            |h| &mut h.added,
            |e| *e == endpoint,
            || endpoint,
            || {
                self.added_latency
                    .get_or_create(&vec![("endpoint", endpoint.to_owned())])
                    .clone()
            },
        )
        .observe(secs);
    }

    /// The counters of deliveries to `sink` (`ledger`, `nats`), created at 0.
    pub fn delivery(&self, sink: &'static str) -> DeliveryMeter {
        let round = |outcome: &str| {
            self.deliveries
                .get_or_create(&vec![
                    ("sink", sink.to_owned()),
                    ("outcome", outcome.to_owned()),
                ])
                .clone()
        };
        DeliveryMeter {
            ok: round("ok"),
            failed: round("failed"),
            records: self
                .delivered
                .get_or_create(&vec![("sink", sink.to_owned())])
                .clone(),
        }
    }

    /// What waits in the outbox for `sink`: records and the age of the oldest.
    pub fn backlog(&self, sink: &'static str, records: u64, oldest_age_secs: f64) {
        let labels = vec![("sink", sink.to_owned())];
        self.backlog
            .get_or_create(&labels)
            .set(i64::try_from(records).unwrap_or(i64::MAX));
        self.backlog_age.get_or_create(&labels).set(oldest_age_secs);
    }

    /// The in-flight gauge.
    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    /// Exposes the load reported to the autoscaler as `soma_proxy_load_*` (read when scraped).
    pub fn register_load(&mut self, meter: std::sync::Arc<crate::load::LoadMeter>) {
        self.registry
            .sub_registry_with_prefix("soma_proxy")
            .register_collector(Box::new(crate::load::LoadCollector(meter)));
    }

    /// Exposes the cluster budget authority's transaction counts (called once, at start-up,
    /// when that authority is configured).
    pub fn register_lease_transactions(&mut self, t: &LeaseTransactions) {
        self.registry
            .sub_registry_with_prefix("soma_proxy")
            .register(
                "budget_lease_transactions",
                "Transactions of the cluster budget authority on PostgreSQL, by kind (top_up: \
                 on the request path; heartbeat: in the background) and outcome",
                t.0.clone(),
            );
    }
}

/// The cluster budget authority's PostgreSQL transactions, counted by the authority and read
/// by `/metrics` (`soma_proxy_budget_lease_transactions_total`). `kind` is `top_up` (a
/// request waited for it) or `heartbeat`; `outcome` is `granted`, `refused` (the cap left too
/// little), `ok` (a heartbeat) or `failed` (PostgreSQL unreachable).
#[derive(Clone, Debug, Default)]
pub struct LeaseTransactions(Family<Labels, Counter>);

impl LeaseTransactions {
    /// One transaction.
    pub fn count(&self, kind: &'static str, outcome: &'static str) {
        self.0
            .get_or_create(&vec![
                ("kind", kind.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }

    /// How many of `kind` ended with `outcome` so far.
    pub fn get(&self, kind: &'static str, outcome: &'static str) -> u64 {
        self.0
            .get(&vec![
                ("kind", kind.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .map_or(0, |c| c.get())
    }
}

/// Counts one sink's delivery rounds and the records they delivered.
#[derive(Clone, Debug)]
pub struct DeliveryMeter {
    ok: Counter,
    failed: Counter,
    records: Counter,
}

impl DeliveryMeter {
    /// A round that could not start (the sink unreachable).
    pub fn failed(&self) {
        self.failed.inc();
    }

    /// One round that delivered `result` records, or failed.
    pub fn round<E>(&self, result: &Result<usize, E>) {
        match result {
            Ok(n) => {
                self.ok.inc();
                self.records.inc_by(*n as u64);
            }
            Err(_) => {
                self.failed.inc();
            }
        }
    }
}
