//! Soma's metering domain: what a call costs, which Budget period it falls in, whether it fits,
//! and what the provider said it used. No `kube`, no HTTP, no database: the sidecar
//! (`soma-proxy`) and, later, the operator's Budget controller build on these pure pieces.
//!
//! ```text
//!  request JSON ─► tokens (BPE estimate) ─► reserve::worst_case ─► budget::Ledger::reserve
//!                                                                        │ Reservation
//!  response JSON / SSE ─► wire (provider usage) ─► price::cost ─► Ledger::settle / release
//!                                      period (calendar in a zone, rolling) ─┘
//! ```
//!
//! Money is integer micro-units of the Budget's currency (1 USD = 1,000,000 micros) and prices
//! are micros per million tokens; no floating point touches money.
#![forbid(unsafe_code)]

pub mod bound;
pub mod budget;
pub mod chain;
pub mod error;
pub mod period;
pub mod price;
pub mod sse;
pub mod tokens;
pub mod usage;
pub mod wire;

pub use bound::{ToolAllowance, worst_usage};
pub use budget::{
    Amount, BudgetDef, ExhaustedAction, Ledger, Limits, OnExhausted, Refusal, Reservation,
};
pub use chain::{BudgetKey, BudgetRef, ChainProblem, Resolution};
pub use error::Error;
pub use period::{Period, PeriodSpec, Window};
pub use price::{Price, PriceTable};
pub use usage::Usage;
