//! The Capsule bundle: the format (an OCI artifact), packing a folder of documents into it
//! reproducibly, its digest, an OCI image layout on disk, pushing it to a registry and
//! fetching it back by digest with every byte checked. No Kubernetes dependency: the `soma`
//! CLI packs, pushes and fetches (the fetch runs in an agent pod's init container), and the
//! operator checks a verified bundle's signed `policyHash`. See `docs/capsules.md`.
//!
//! ```text
//!  folder ──pack──► Bundle {manifest bytes, digest, blobs} ──write_layout──► OCI layout
//!                        │                                        │
//!                        └──────────────── Registry::push ◄── read_layout
//!  registry ──Registry::fetch(repo, digest)──► Bundle ──open──► Contents ──write_into──► /capsules/<name>/
//!  /capsules/<name>/ ──delivered::open_delivered(digest)──► Delivered ──► index::Index (the sidecar: exact, or HNSW when large)
//! ```
//!
//! The `registry` feature (on by default) adds push and fetch; the sidecar, which only reads
//! delivered folders, builds without it. The `qdrant` feature adds the Qdrant scale path. `hashed` is a deterministic, lexical embedder for
//! tests and benchmarks.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod chunk;
pub mod delivered;
mod error;
pub mod format;
pub mod hashed;
pub mod index;
pub mod layout;
pub mod pack;
#[cfg(feature = "qdrant")]
pub mod qdrant;
pub mod recall;
pub mod recall_index;
#[cfg(feature = "registry")]
pub mod registry;

pub use bundle::{Bundle, Contents, sha256_digest};
pub use error::{Error, Result};
pub use pack::{PackOptions, pack};
#[cfg(feature = "registry")]
pub use registry::Registry;
