//! Soma's policy decisions, with no Kubernetes client: Rego policies evaluated in process by
//! the `regorus` interpreter.
//!
//! Soma's built-in policies and the Gatekeeper ConstraintTemplates a platform team brings are
//! the same thing here: a [`Template`] (Rego whose `violation[{"msg": msg}]` rule reads
//! `input.review` and `input.parameters`) and the [`Constraint`]s that instantiate it with
//! parameters, a match and an enforcement action (`deny`, `warn`, `dryrun`).
//!
//! ```text
//!  built-ins (policies/builtin/*) ─┐                    ┌─▶ Decision { violations, errors }
//!  ConfigMaps / a directory  ──────┼─▶ PolicyStore ─▶ PolicySet::evaluate(&Review, deadline)
//!  (templates + constraints)       │   (last good         (one compiled regorus Engine per
//!  inventory (synced objects) ─────┘    set per template)   template, cloned per evaluation)
//! ```
//!
//! The admission webhook (`soma-admission`) and the operator's reconcile-time re-check call the
//! same [`PolicySet::evaluate`], so a decision at admission and at reconcile cannot drift.
//! [`suite`] runs Gatekeeper `Suite` files (what `gator verify` reads) offline; [`regotest`]
//! runs Rego `test_` rules.

pub mod builtin;
pub mod condition;
mod deprecated;
mod error;
pub mod gatekeeper;
pub mod inventory;
mod matching;
mod model;
pub mod regotest;
mod set;
mod store;
pub mod suite;

pub use error::PolicyError;
pub use model::{Action, Constraint, KindMatch, Match, Review, Template};
pub use set::{Decision, EvalFailure, EvalMode, PolicySet, Violation, interpreter_and_vm};
pub use store::{LoadReport, PolicyStore, Sources};
