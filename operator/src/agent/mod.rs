//! The Agent controller: turns each Agent into a ServiceAccount, a Deployment (agent +
//! metering sidecar), a Service, a NetworkPolicy and the sidecar's ConfigMap.
//!
//! ```text
//!  watch Agents ─┐
//!  owns children ├─▶ reconcile ─▶ children (pure) ─▶ apply (SSA, only what differs)
//!  watch Budgets │              └▶ status (pure) ─▶ patch status (only if changed) + Event
//!  watch Capsules┘
//! ```
//!
//! - [`children`]: pure builders of the child objects;
//! - [`image`]: agent image signatures (tag → digest → Cosign), cached, pinned;
//! - [`status`]: pure computation of conditions;
//! - [`apply`]: the only place that writes children (besides [`revoked`]);
//! - [`revoked`]: Capsule revocations written into the sidecar's ConfigMap while the Agent is
//!   held back (a live part of the configuration: the pods are not rolled);
//! - [`reconcile`]: the reconcile and error policy;
//! - [`scaling`]: pure autoscaling settings, `spec.replicas` ownership and `status.scaling`
//!   (the loop itself is [`crate::autoscale`]);
//! - [`brownout`]: pure: the brown-out to publish for a decision and the `BrownOut` condition;
//! - [`credentials`]: the pure `CredentialsUnavailable` condition from the sidecars' `/readyz`
//!   (the loop that asks is [`crate::credentials_check`]);
//! - [`controller`]: the kube-runtime `Controller` and its watches.

pub mod apply;
pub mod brownout;
pub mod children;
pub mod controller;
pub mod credentials;
pub mod image;
pub mod reconcile;
pub mod revoked;
pub mod scaling;
pub mod status;
