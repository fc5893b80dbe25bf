//! The Soma operator: reconciles Agents into sandboxed, metered pods, Budgets into their spend,
//! Capsules into verified signatures, and Jobs into runs of those pods (or DR drills).
//!
//! ```text
//!  main ──▶ runtime (HTTP, leader election) ──▶ agent::controller ──▶ agent::reconcile
//!                                         │                          ├▶ agent::children (pure)
//!                                         │                          ├▶ agent::apply    (writes)
//!                                         │                          └▶ agent::status   (pure)
//!                                         ├─▶ budget::, capsule:: (the same shape)
//!                                         └─▶ job::controller ──▶ job::reconcile ─▶ job::children,
//!                                                                 job::queue, job::status (pure)
//!  workload (pure): the pod, sidecar configuration and NetworkPolicy of an Agent or a Job
//! ```
//! `render` reuses the pure builders without a cluster.

pub mod agent;
pub mod apply;
pub mod autoscale;
pub mod budget;
pub mod capsule;
pub mod config;
pub mod context;
pub mod credentials_check;
pub mod error;
pub mod http;
pub mod job;
pub mod kstatus;
pub mod ledger;
pub mod metrics;
pub mod pod_admin;
pub mod policy;
pub mod reconciler;
pub mod render;
pub mod runtime;
pub mod telemetry;
pub mod webhook;
pub mod workload;
