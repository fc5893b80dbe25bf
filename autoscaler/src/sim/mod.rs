//! A discrete-event simulator that replays request traces against autoscalers.
//!
//! ```text
//!   trace (CSV or synthetic) ─► engine ◄─► Scaler (peers::soma / hpa / keda)
//!                                 │
//!                                 └─► RunResult ─► report (table, ratios, RESULT line)
//! ```

pub mod compare;
pub mod engine;
pub mod frontier;
pub mod report;
pub mod rng;
pub mod service;
pub mod trace;

pub use compare::{Comparison, Sweep};
pub use engine::{Observation, RunResult, Scaler, SimConfig, simulate};
pub use service::ServiceModel;
pub use trace::{Request, Trace};
