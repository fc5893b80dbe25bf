//! Policies in the operator: the same `soma-policy` store the admission webhook serves, loaded
//! from the built-ins, labelled ConfigMaps in the operator's namespace and an optional
//! directory, and fed an inventory of Namespaces, Budgets and Agents.
//!
//! ```text
//!  ConfigMaps soma.dev/policy=true ─watch─▶ loader ─▶ PolicyStore::load ─▶ metrics, Warning Events
//!  --policy-dir, built-ins ─────────────────┘            │                 (bad policy: last good
//!                                                        │                  set kept)
//!                                                        ├─▶ reload counter ─▶ every Agent reconciled
//!  Namespaces, Budgets, Agents ─watch─▶ inventory ───────┘ (debounced set_inventory)
//! ```
//!
//! - [`sources`]: pure: which documents a load reads, and which ConfigMap an error belongs to;
//! - [`loader`]: the ConfigMap watch and reloads;
//! - [`inventory`]: `data.inventory` from the caches;
//! - [`check`]: the reconcile-time re-check (pure).
//!
//! Every replica runs this (the webhook serves on every replica); only the leader reconciles.

pub mod check;
pub mod inventory;
pub mod loader;
pub mod sources;

use std::path::PathBuf;
use std::time::Duration;

/// Label selecting policy ConfigMaps by default.
pub const DEFAULT_SELECTOR: &str = "soma.dev/policy=true";

/// How policies are loaded and applied.
#[derive(Clone, Debug)]
pub struct PolicyOptions {
    /// Namespace whose ConfigMaps hold policies (the operator's own).
    pub namespace: String,
    /// Label selector of policy ConfigMaps.
    pub configmap_selector: String,
    /// A directory of policy documents (a mounted volume), read at start-up.
    pub dir: Option<PathBuf>,
    /// Time one decision may take.
    pub deadline: Duration,
    /// When an evaluation cannot finish, allow (with a warning / condition) instead of denying.
    pub fail_open: bool,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        Self {
            namespace: "default".to_owned(),
            configmap_selector: DEFAULT_SELECTOR.to_owned(),
            dir: None,
            deadline: Duration::from_millis(1500),
            fail_open: false,
        }
    }
}
