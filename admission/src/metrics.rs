//! The webhook's Prometheus metrics (one registry; the operator can mount it as a
//! sub-registry).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub kind: String,
    pub operation: String,
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ViolationLabels {
    pub policy: String,
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    pub reason: &'static str,
}

/// Counters and histograms of the webhook.
#[derive(Debug)]
pub struct Metrics {
    pub(crate) requests: Family<RequestLabels, Counter>,
    pub(crate) violations: Family<ViolationLabels, Counter>,
    pub(crate) errors: Family<ReasonLabels, Counter>,
    pub(crate) load_errors: Family<ReasonLabels, Counter>,
    pub(crate) constraints: Gauge,
    pub(crate) duration: Histogram,
}

/// Every reason `soma_admission_errors_total` counts: bad requests (`malformed`, `too_large`,
/// `body`) and decisions that could not be made (`overloaded`, `deadline`, `internal`,
/// `evaluation`).
pub const ERROR_REASONS: [&str; 7] = [
    "malformed",
    "too_large",
    "body",
    "overloaded",
    "deadline",
    "internal",
    "evaluation",
];

impl Default for Metrics {
    /// Every error and load-error series starts at zero, so an alert on `increase()` sees the
    /// first one (a counter born at 1 shows no increase).
    fn default() -> Self {
        let errors = Family::<ReasonLabels, Counter>::default();
        for reason in ERROR_REASONS {
            drop(errors.get_or_create(&ReasonLabels { reason }));
        }
        let load_errors = Family::<ReasonLabels, Counter>::default();
        for reason in soma_policy::PolicyError::LABELS {
            drop(load_errors.get_or_create(&ReasonLabels { reason }));
        }
        Self {
            requests: Family::default(),
            violations: Family::default(),
            errors,
            load_errors,
            constraints: Gauge::default(),
            duration: Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.0,
            ]),
        }
    }
}

impl Metrics {
    /// Registers every metric under `registry` (prefix it with a sub-registry as needed).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "soma_admission_requests",
            "AdmissionReviews answered, by kind, operation and decision",
            self.requests.clone(),
        );
        registry.register(
            "soma_policy_violations",
            "Policy violations found, by policy and enforcement action",
            self.violations.clone(),
        );
        registry.register(
            "soma_admission_errors",
            "Requests that could not be decided normally, by reason",
            self.errors.clone(),
        );
        registry.register(
            "soma_policy_load_errors",
            "Policies that failed to load or compile, by reason",
            self.load_errors.clone(),
        );
        registry.register(
            "soma_policy_constraints",
            "Constraints currently enforced",
            self.constraints.clone(),
        );
        registry.register(
            "soma_admission_duration_seconds",
            "Time to answer an AdmissionReview",
            self.duration.clone(),
        );
    }

    /// Records a policy (re)load: its errors by label and the number of constraints served.
    pub fn record_load(&self, report: &soma_policy::LoadReport) {
        for e in &report.errors {
            self.load_errors
                .get_or_create(&ReasonLabels { reason: e.label() })
                .inc();
        }
        self.constraints
            .set(i64::try_from(report.constraints.len()).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_and_load_error_series_starts_at_zero() {
        let mut registry = Registry::default();
        Metrics::default().register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        for reason in ERROR_REASONS {
            assert!(
                text.contains(&format!(
                    "soma_admission_errors_total{{reason=\"{reason}\"}} 0"
                )),
                "{reason}: {text}"
            );
        }
        for reason in soma_policy::PolicyError::LABELS {
            assert!(
                text.contains(&format!(
                    "soma_policy_load_errors_total{{reason=\"{reason}\"}} 0"
                )),
                "{reason}: {text}"
            );
        }
    }
}
