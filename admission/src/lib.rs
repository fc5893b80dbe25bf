//! Soma's validating admission webhook: `admission.k8s.io/v1` AdmissionReviews for Agent,
//! Capsule, Budget and Job over HTTPS, decided by `soma-policy`.
//!
//! ```text
//!  kube-apiserver ──HTTPS POST /validate──▶ tls::serve ─▶ server::router
//!                                              │ body ≤ max_body_bytes, else 413 (a denial
//!                                              │ when the uid can be read)
//!                                              ▼
//!                           review::parse ─▶ Semaphore (bounded in-flight evaluations)
//!                                              ▼
//!                 spawn_blocking(span) ─▶ PolicySet::evaluate(review, deadline)
//!                                              ▼
//!      AdmissionReview response: allowed / denied with every deny message, warnings for
//!      `warn`, audit annotations for everything (dryrun included)
//! ```
//!
//! The operator owns the ValidatingWebhookConfiguration and the serving certificate
//! ([`tls::CertBundle::generate`] makes a CA and a serving certificate for the Service's DNS
//! names); this crate serves. Evaluation failures (deadline, overload) deny unless
//! [`Config::fail_open`] is set.

pub mod client;
mod error;
mod metrics;
pub mod review;
pub mod server;
pub mod tls;

pub use error::AdmissionError;
pub use metrics::Metrics;
pub use server::{Config, State, router};
