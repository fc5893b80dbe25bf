//! The Capsule controller: checks a Capsule's content against its digest, verifies its
//! signature through a [`verify::CapsuleVerifier`], re-checks it against the policies, and
//! writes `Ready`, `PolicyAllowed`, `verifiedDigest`, `signer` and `verifiedAt`. An Agent that
//! references a Capsule that is not Ready is not started (`agent::reconcile`).
//!
//! ```text
//!  watch Capsules ─▶ reconcile ─▶ revoked? ─▶ policies ─▶ content digest ─▶ public key
//!                                   (content::digest: oci as given; inline computed;
//!                                    configMapRef computed and compared)
//!                               ─▶ cache (digest, key fingerprint, policyHash) ─▶ verifier
//!                               ─▶ status (pure) ─▶ patch status only if changed
//! ```
//!
//! - [`content`]: pure: the digest a Capsule's content has;
//! - [`verify`]: the verifier trait, the result cache, and the verifier of a binary that
//!   cannot verify (never a pass);
//! - [`cosign`]: the verifier the operator runs (Cosign, through `soma-signatures`);
//! - [`status`]: pure: the status from what the reconcile found;
//! - [`refs`]: the Capsules an Agent or a Job names, looked up;
//! - [`delivery`]: pure: a verified Capsule's content into the pod, read-only, by digest;
//! - [`qdrant`]: a verified Capsule with `spec.index: qdrant` loaded into its Qdrant
//!   collection (the scale path of recall);
//! - [`revocation`]: a revoked Capsule (or one whose signature stopped verifying) published
//!   to the ledger, so running sidecars stop serving it within seconds;
//! - [`reconcile`], [`controller`]: the reconcile and its watches.

pub mod content;
pub mod controller;
pub mod cosign;
pub mod delivery;
pub mod qdrant;
pub mod reconcile;
pub mod refs;
pub mod revocation;
pub mod status;
pub mod verify;
