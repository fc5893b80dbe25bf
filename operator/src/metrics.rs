//! Prometheus metrics: one registry, a sub-registry per subsystem (`soma_` prefix). The
//! reconcile metrics are labelled by controller, and failures by the error's label.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the reconcile counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// `agent`, later `budget`, `capsule`, `job`.
    pub controller: String,
}

/// Labels of the failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// The controller.
    pub controller: String,
    /// The error's label (`ApplyFailed`, `ReadFailed`, …).
    pub reason: String,
}

/// The operator's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ControllerLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    duration: Family<ControllerLabels, Histogram>,
    status_writes: Family<ControllerLabels, Counter>,
    child_writes: Family<ControllerLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(|_| {})
    }
}

impl Metrics {
    /// The operator's metrics, plus whatever `register` adds to the same registry (the
    /// webhook's, which share the `soma_` names they were given).
    pub fn new(register: impl FnOnce(&mut Registry)) -> Self {
        let mut registry = Registry::default();
        register(&mut registry);
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        let status_writes = Family::<ControllerLabels, Counter>::default();
        let child_writes = Family::<ControllerLabels, Counter>::default();
        let soma = registry.sub_registry_with_prefix("soma");
        soma.register("reconcile", "Reconciles started", reconciles.clone());
        soma.register(
            "reconcile_failures",
            "Reconciles that failed, by error",
            failures.clone(),
        );
        soma.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            duration.clone(),
        );
        soma.register(
            "status_writes",
            "Status patches written (only when the status changed)",
            status_writes.clone(),
        );
        soma.register(
            "child_writes",
            "Child objects applied or deleted (only when they differed)",
            child_writes.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            duration,
            status_writes,
            child_writes,
        }
    }
}

impl Metrics {
    /// Counts a reconcile and returns a guard that records its duration when dropped.
    pub fn reconcile_started(&self, controller: &str) -> ReconcileTimer<'_> {
        let labels = ControllerLabels {
            controller: controller.to_owned(),
        };
        self.reconciles.get_or_create(&labels).inc();
        ReconcileTimer {
            metrics: self,
            labels,
            start: Instant::now(),
        }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, controller: &str, reason: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                controller: controller.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts a status write.
    pub fn status_written(&self, controller: &str) {
        self.status_writes
            .get_or_create(&ControllerLabels {
                controller: controller.to_owned(),
            })
            .inc();
    }

    /// Counts a child write.
    pub fn child_written(&self, controller: &str) {
        self.child_writes
            .get_or_create(&ControllerLabels {
                controller: controller.to_owned(),
            })
            .inc();
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Records a reconcile's duration when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    labels: ControllerLabels,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .get_or_create(&self.labels)
            .observe(self.start.elapsed().as_secs_f64());
    }
}
