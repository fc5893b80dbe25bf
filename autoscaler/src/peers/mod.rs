//! The autoscalers the simulator compares: Soma's, and emulations of what users run today.
//!
//! | module | what | loop |
//! | ------ | ---- | ---- |
//! | [`soma`] | [`crate::Autoscaler`] fed a [`crate::LoadSignal`] per tick | 15 s |
//! | [`hpa`]  | Kubernetes HPA v2 algorithm and default behaviour | 15 s sync |
//! | [`keda`] | KEDA ScaledObject: activation/cooldown around an HPA | 30 s poll, 15 s HPA |

pub mod hpa;
pub mod keda;
pub mod soma;

pub use hpa::{Hpa, HpaParams};
pub use keda::{Keda, KedaParams};
pub use soma::{SignalView, SomaScaler};
