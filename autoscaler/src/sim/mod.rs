//! A discrete-event simulator that replays request traces against autoscalers.
//!
//! ```text
//!   trace (CSV, synthetic, or a variant) ─► engine ◄─► Scaler (peers::soma / hpa / keda)
//!                                             │
//!        compare: defaults, or each scaler ◄──┴─► RunResult / frontier::Point
//!        swept over its main knob                  └─► report (tables, ratios, frontier
//!                                                      placements, RESULT line)
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
