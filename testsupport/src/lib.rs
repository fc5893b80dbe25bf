//! Real servers for Soma's tests, started the same way everywhere: on a free 127.0.0.1 port,
//! in a temporary folder, stopped by PID (also when a test fails).
//!
//! A server that is not installed fails the test with the command that installs it
//! (`scripts/test-deps/servers.sh`): a test that cannot reach its server must never pass.
#![allow(clippy::unwrap_used)] // test support: a failed set-up should panic

pub mod bao;
pub mod nats;
pub mod pg;

pub use bao::Bao;
pub use nats::Nats;
pub use pg::Pg;
