//! What the sidecar benchmarks share (`bench/proxy-overhead`, `bench/proxy-vs-litellm`,
//! `bench/budget-contention`): child processes started and stopped by PID ([`procs`]), an
//! open-loop load generator that measures from each request's scheduled time ([`load`]), and
//! the Soma side of every run, the fake provider plus `soma-proxy` with a given configuration
//! ([`soma`]), and nginx as a bare reverse proxy, the floor a proxy hop costs ([`nginx`]).
//!
//! Each benchmark is an example that declares `mod bench_support;` and uses part of it.
#![allow(dead_code)] // each example uses a different part of the shared code

pub mod cpu;
pub mod load;
pub mod nginx;
pub mod procs;
pub mod soma;
