//! The Budget controller: keeps each Budget's status true to the ledger, publishes its live
//! definition to the sidecars, enforces cross-namespace grants, seals the audit chain, and
//! raises an Event once per threshold per period.
//!
//! ```text
//!  watch Budgets ─┐
//!  watch children ├─▶ reconcile ─▶ def (CRD → BudgetDef) ─▶ chain (one resolver) ─▶ ledger
//!  watch Agents  ─┤                (live definition, spend, leases, seal) ─▶ status (pure)
//!  NOTIFY usage  ─┘                ─▶ patch status (only if changed) + Events ─▶ requeue at the period end
//! ```
//!
//! - [`def`]: the CRD turned into the metering definition; chains resolved from the API;
//! - [`index`]: which Budgets each chain passed through, and the refresh bus;
//! - [`status`]: pure status, thresholds and exhaustion;
//! - [`reconcile`]: the reconcile;
//! - [`controller`]: the kube-runtime `Controller` and its watches.

pub mod controller;
pub mod def;
pub mod index;
pub mod reconcile;
pub mod status;
