//! Soma's built-in policies, compiled into the binary from `policies/builtin/`.
//!
//! Each is a template (its Rego, `package soma.<name>`) and a default constraint
//! (`constraint.yaml`). A platform team replaces a default constraint by supplying its own
//! constraint(s) of the same kind.

use crate::error::PolicyError;
use crate::gatekeeper;
use crate::model::{Constraint, Template};

/// One built-in policy's sources.
#[derive(Clone, Copy, Debug)]
pub struct Builtin {
    /// Folder name under `policies/builtin/`.
    pub name: &'static str,
    /// The constraint kind.
    pub kind: &'static str,
    /// File stem of its Rego (`<file>.rego`, `<file>_test.rego`).
    pub file: &'static str,
    /// The policy's Rego.
    pub rego: &'static str,
    /// Its Rego unit tests.
    pub tests: &'static str,
    /// The default constraint.
    pub constraint: &'static str,
}

macro_rules! builtin {
    ($name:literal, $kind:literal, $file:literal) => {
        Builtin {
            name: $name,
            kind: $kind,
            file: $file,
            rego: include_str!(concat!("../../builtin/", $name, "/", $file, ".rego")),
            tests: include_str!(concat!("../../builtin/", $name, "/", $file, "_test.rego")),
            constraint: include_str!(concat!("../../builtin/", $name, "/constraint.yaml")),
        }
    };
}

/// The starter set.
pub const BUILTINS: &[Builtin] = &[
    builtin!("images", "SomaImages", "images"),
    builtin!("sandbox", "SomaSandbox", "sandbox"),
    builtin!("egress", "SomaEgress", "egress"),
    builtin!("budget-ref", "SomaBudgetRef", "budget_ref"),
    builtin!("capsules", "SomaCapsules", "capsules"),
    builtin!("budget-parent", "SomaBudgetParent", "budget_parent"),
    builtin!("vault", "SomaVault", "vault"),
];

impl Builtin {
    /// The template.
    pub fn template(&self) -> Template {
        Template {
            name: self.kind.to_ascii_lowercase(),
            kind: self.kind.to_owned(),
            rego: self.rego.to_owned(),
            libs: Vec::new(),
            rego_v1: true,
            origin: format!("builtin/{}", self.name),
        }
    }

    /// The default constraint.
    pub fn default_constraint(&self) -> Result<Constraint, PolicyError> {
        let origin = format!("builtin/{}/constraint.yaml", self.name);
        let docs = gatekeeper::documents(self.constraint, &origin)?;
        let doc = docs
            .first()
            .ok_or_else(|| PolicyError::doc(&origin, "no constraint"))?;
        gatekeeper::constraint(doc, &origin)
    }
}

/// The built-in whose constraint kind is `kind`.
pub fn by_kind(kind: &str) -> Option<&'static Builtin> {
    BUILTINS.iter().find(|b| b.kind == kind)
}
