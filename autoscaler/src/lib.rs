//! Conductance autoscaling with Erlang-C floors for Soma agents, and a simulator that
//! compares it with Kubernetes' HPA and a KEDA-style scaler on request traces.
//!
//! This crate has no `kube` dependency; everything in it is pure and testable. The sidecars
//! measure what a [`LoadSignal`] needs (`soma_contract::load::LoadReport`, served at
//! `GET /load`); the operator's scaling loop (`soma_operator::autoscale`) merges them, steps
//! one [`Autoscaler`] per Agent, sets the Deployment's replicas and writes the [`Decision`] and
//! a [`Snapshot`] into the Agent's status; an Agent that serves no port scales to zero and is
//! woken by the Soma Jobs that reference it ([`Autoscaler::set_queued_work`]). Brown-out from
//! the operator and the Budget's cap are planned there (`docs/autoscaler.md`); the simulator
//! runs all of it.
//!
//! ```text
//!  signal ─► estimate ─► conductance ─┐
//!                    └─► erlang ──────┴─► autoscaler ─► decision
//!  sim::trace ─► sim::engine ◄─ peers::{soma, hpa, keda} ─► sim::report
//! ```
#![forbid(unsafe_code)]

pub mod autoscaler;
pub mod conductance;
pub mod config;
pub mod decision;
pub mod erlang;
pub mod error;
pub mod estimate;
pub mod peers;
pub mod signal;
pub mod sim;

pub use autoscaler::{Autoscaler, BudgetRate, Snapshot};
pub use conductance::{Conductance, ConductanceParams};
pub use config::{AutoscalerConfig, BrownOutAction};
pub use decision::{BrownOut, BrownOutCause, Decision, Reason};
pub use error::Error;
pub use signal::LoadSignal;
