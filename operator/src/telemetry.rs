//! Logs and OpenTelemetry trace export: the shared `soma-telemetry` crate, re-exported so the
//! operator's callers keep their path (`soma_operator::telemetry::init`).

pub use soma_telemetry::*;
