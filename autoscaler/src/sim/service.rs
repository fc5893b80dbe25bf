//! How long a request occupies a replica: the simulator's service model.
//!
//! Each replica has `slots` concurrent slots; a request holds one slot for
//!
//! ```text
//!   S = overhead + input_tokens / prefill_tps + output_tokens / decode_tps
//! ```
//!
//! Defaults: one slot per replica (an agent pod works on one task at a time), 50 ms overhead,
//! 8 000 prompt tokens/s prefill and 50 tokens/s decode — the order of a mid-size model on
//! one accelerator for a single stream. On the Azure code trace (mean 2 048 prompt and 28
//! generated tokens) this gives a mean service time of about 0.87 s, heavy-tailed by long
//! generations. Service times are deterministic per request, not exponential: M/M/k is the
//! autoscaler's *model*, and the simulator deliberately does not share its assumptions.

use crate::estimate::TokenThroughput;
use crate::sim::trace::Request;

/// Token throughput of one slot and the number of slots per replica.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServiceModel {
    /// Per-slot throughput.
    pub throughput: TokenThroughput,
    /// Concurrent requests per replica.
    pub slots: u32,
}

impl Default for ServiceModel {
    fn default() -> Self {
        Self {
            throughput: TokenThroughput {
                prefill_tps: 8_000.0,
                decode_tps: 50.0,
                overhead_s: 0.05,
            },
            slots: 1,
        }
    }
}

impl ServiceModel {
    /// The same model `factor` times faster: token rates × `factor`, overhead ÷ `factor`
    /// (every service time divided by `factor`), for a trace replayed that much faster.
    pub fn compressed(&self, factor: f64) -> Self {
        Self {
            throughput: TokenThroughput {
                prefill_tps: self.throughput.prefill_tps * factor,
                decode_tps: self.throughput.decode_tps * factor,
                overhead_s: self.throughput.overhead_s / factor,
            },
            slots: self.slots,
        }
    }

    /// Seconds `request` holds a slot.
    pub fn service_time(&self, request: &Request) -> f64 {
        self.throughput.service_time(
            u64::from(request.input_tokens),
            u64::from(request.output_tokens),
        )
    }
}
