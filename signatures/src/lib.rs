//! Cosign signature verification for Soma Capsules and agent images, with no Kubernetes
//! dependency: the operator resolves what a Capsule or Agent references (the public key PEM from
//! its ConfigMap, the artifact's repository and digest) and asks a shared [`Verifier`].
//!
//! ```text
//!  operator ──► Policy::public_key_pem(pem) ─┐
//!           ──► OciRef::from_repository(..) ─┼─► Verifier::verify_oci ──► Ok(Verified {digest, signer, at})
//!           ──► Verifier::verify_image(img) ─┘                        └─► Err(Rejection): reason(), is_transient()
//! ```
//!
//! What is checked: a cosign signature (`cosign sign --key`) stored under the artifact's
//! `sha256-<hex>.sig` tag, made by an accepted key over a simple-signing payload that names the
//! requested digest, or a keyless signature whose certificate chains to a configured trusted
//! root and names an accepted identity; or a `cosign sign-blob` signature over a blob's bytes.
//! Successful verifications are cached by (digest, policy fingerprint). Keyless verification is
//! offline: no Rekor or timestamp evidence is checked, so the certificate must be valid at
//! verification time. See `docs/signatures.md`.
#![forbid(unsafe_code)]

mod blob;
mod cache;
mod error;
mod keyless;
mod policy;
mod reference;
mod registry;
mod simple_signing;
mod verifier;

pub use blob::{Blob, sha256_digest};
pub use error::Rejection;
pub use policy::{KeylessIdentity, Policy, PublicKey};
pub use reference::OciRef;
pub use verifier::{TrustConfig, Verified, Verifier};
