//! The Soma operator: reconciles Agents into sandboxed, metered pods.
//!
//! ```text
//!  main ──▶ runtime (HTTP, leader election) ──▶ agent::controller ──▶ agent::reconcile
//!                                                                    ├▶ agent::children (pure)
//!                                                                    ├▶ agent::apply    (writes)
//!                                                                    └▶ agent::status   (pure)
//! ```
//! `render` reuses the pure builders without a cluster.

pub mod agent;
pub mod apply;
pub mod budget;
pub mod capsule;
pub mod config;
pub mod context;
pub mod error;
pub mod http;
pub mod job;
pub mod kstatus;
pub mod ledger;
pub mod metrics;
pub mod policy;
pub mod reconciler;
pub mod render;
pub mod runtime;
pub mod telemetry;
pub mod webhook;
pub mod workload;
