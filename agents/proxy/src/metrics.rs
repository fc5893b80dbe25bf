//! Prometheus metrics: one registry, the `soma_proxy` sub-registry. Tokens and cost are
//! labelled by namespace, agent and model (STYLE.md, convention 10).

use std::sync::atomic::AtomicI64;

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
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// One request answered.
    pub fn request(&self, endpoint: &str, model: &str, status: u16) {
        self.requests
            .get_or_create(&vec![
                ("endpoint", endpoint.to_owned()),
                ("model", model.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    /// Metered usage.
    pub fn usage(&self, model: &str, usage: &Usage, cost_micros: u64, estimated: bool) {
        let base = |kind: &'static str| {
            vec![
                ("namespace", self.namespace.clone()),
                ("agent", self.agent.clone()),
                ("model", model.to_owned()),
                ("kind", kind.to_owned()),
            ]
        };
        for (kind, n) in [
            ("input", usage.input_tokens),
            ("cached_input", usage.cached_input_tokens),
            ("cache_write_input", usage.cache_write_input_tokens),
            ("output", usage.output_tokens),
            ("reasoning", usage.reasoning_tokens),
        ] {
            if n > 0 {
                self.tokens.get_or_create(&base(kind)).inc_by(n);
            }
        }
        self.cost
            .get_or_create(&vec![
                ("namespace", self.namespace.clone()),
                ("agent", self.agent.clone()),
                ("model", model.to_owned()),
            ])
            .inc_by(cost_micros);
        if estimated {
            self.estimated.inc();
        }
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
    pub fn upstream_latency(&self, endpoint: &str, secs: f64) {
        self.upstream_latency
            .get_or_create(&vec![("endpoint", endpoint.to_owned())])
            .observe(secs);
    }

    /// Time the sidecar added.
    pub fn added_latency(&self, endpoint: &str, secs: f64) {
        self.added_latency
            .get_or_create(&vec![("endpoint", endpoint.to_owned())])
            .observe(secs);
    }

    /// The in-flight gauge.
    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
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
