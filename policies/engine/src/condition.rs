//! The `PolicyAllowed` condition the operator writes after re-checking an object at
//! reconcile time (policies change after admission). Pure: the operator turns it into a
//! `metav1.Condition`, keeping `lastTransitionTime` unless the status flips.

use crate::model::Action;
use crate::set::Decision;

/// The condition type.
pub const POLICY_ALLOWED: &str = "PolicyAllowed";

/// Status, reason and message of `PolicyAllowed`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyCondition {
    /// `"True"` or `"False"`.
    pub status: &'static str,
    /// `Allowed`, `AllowedWithWarnings`, `Denied` or `PolicyError`.
    pub reason: &'static str,
    /// Every reason, joined; a user can act on each.
    pub message: String,
}

/// Computes `PolicyAllowed` from a decision.
pub fn policy_allowed(decision: &Decision) -> PolicyCondition {
    if !decision.allowed() {
        let only_failures = !decision.violations.iter().any(|v| v.action == Action::Deny);
        return PolicyCondition {
            status: "False",
            reason: if only_failures {
                "PolicyError"
            } else {
                "Denied"
            },
            message: truncate(decision.deny_messages().join("; ")),
        };
    }
    let warnings = decision.warnings();
    if warnings.is_empty() {
        PolicyCondition {
            status: "True",
            reason: "Allowed",
            message: format!("{} policies allow this object", decision.evaluated),
        }
    } else {
        PolicyCondition {
            status: "True",
            reason: "AllowedWithWarnings",
            message: truncate(warnings.join("; ")),
        }
    }
}

/// Condition messages are capped at 32 KiB by the API server; stay well below.
fn truncate(mut s: String) -> String {
    const MAX: usize = 4096;
    if s.len() > MAX {
        let mut cut = MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str(" …");
    }
    s
}
