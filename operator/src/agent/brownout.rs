//! The brown-out the autoscaler asks of an Agent's sidecars: what to publish for a decision
//! (rounded, shed when no model to downgrade to is named), when it is new enough to earn a
//! new revision, and the `BrownOut` condition. The loop that publishes it (the ledger's
//! `soma_agent_live` row) is [`crate::autoscale`]; the ConfigMap carries it too
//! ([`super::children`]).
//!
//! ```text
//!  Decision.brown_out ─► brown_out_of ─► next_brown_out (a new revision only on a change)
//!    ─► status.scaling.brownOut + `BrownOut` ─► the ledger's row and the sidecar's ConfigMap
//! ```

use soma_autoscaler::BrownOutAction;
use soma_crds::agent::{AgentStatus, BrownOutStatus, ScalingStatus};

use super::scaling::Step;
use crate::kstatus::{Verdict, verdict};

/// Condition type: whether the Agent's sidecars shed or downgrade traffic now.
pub const BROWN_OUT: &str = "BrownOut";

/// The brown-out to publish for a decision's: its fraction rounded up to a whole percent (so
/// noise in the fifteenth digit publishes nothing new, and never less is taken than asked),
/// none below that. Downgrading needs a model; without one the share is shed, and the
/// message says so.
pub fn brown_out_of(
    b: Option<&soma_autoscaler::BrownOut>,
    downgrade_model: Option<&str>,
) -> Option<BrownOutStatus> {
    let b = b?;
    let fraction = ((b.fraction * 100.0 - 1e-9).ceil() / 100.0).clamp(0.0, 1.0);
    if fraction.is_nan() || fraction <= 0.0 {
        return None;
    }
    let (action, model, message) = match (b.action, downgrade_model.filter(|m| !m.is_empty())) {
        (BrownOutAction::Downgrade, Some(m)) => {
            ("downgrade", Some(m.to_owned()), b.message.clone())
        }
        (BrownOutAction::Downgrade, None) => (
            "shed",
            None,
            format!("{} (no model to downgrade to: shed instead)", b.message),
        ),
        (BrownOutAction::Shed, _) => ("shed", None, b.message.clone()),
    };
    Some(BrownOutStatus {
        fraction,
        action: action.to_owned(),
        model,
        message,
    })
}

/// Whether two brown-outs ask the same of the sidecars (the message aside: its figures move
/// every step).
fn same_brown_out(a: Option<&BrownOutStatus>, b: Option<&BrownOutStatus>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.fraction == b.fraction && a.action == b.action && a.model == b.model
        }
        _ => false,
    }
}

/// The brown-out in force after a step, and its revision: what `previous` holds while
/// `wanted` asks the same, else `wanted` at a new revision (`now_ms`, or one past the
/// previous revision when the clock is behind it: a new leader's clock may be).
pub fn next_brown_out(
    previous: Option<&ScalingStatus>,
    wanted: Option<BrownOutStatus>,
    now_ms: i64,
) -> (Option<BrownOutStatus>, Option<i64>) {
    let held = previous.and_then(|p| p.brown_out.as_ref());
    let revision = previous.and_then(|p| p.brown_out_revision);
    if same_brown_out(held, wanted.as_ref()) {
        return (held.cloned(), revision);
    }
    (wanted, Some(now_ms.max(revision.map_or(0, |r| r + 1))))
}

/// The contract's brown-out (what the sidecars enforce) of a published one.
pub fn contract_brown_out(b: &BrownOutStatus) -> soma_contract::load::BrownOut {
    soma_contract::load::BrownOut {
        fraction: b.fraction,
        action: if b.action == "downgrade" {
            BrownOutAction::Downgrade
        } else {
            BrownOutAction::Shed
        },
        model: b.model.clone(),
        message: b.message.clone(),
    }
}

/// The `BrownOut` condition a step leads to: only a decision says (a conflict or a missing
/// signal leaves the brown-out as it was).
pub fn brown_out_verdict(step: &Step) -> Option<Verdict> {
    let Step::Decided {
        decision: d,
        brown_out,
        ..
    } = step
    else {
        return None;
    };
    Some(match brown_out {
        Some(b) => verdict(
            BROWN_OUT,
            true,
            if b.action == "downgrade" {
                "Downgrading"
            } else {
                "Shedding"
            },
            // The crate's message, with this step's figures.
            d.brown_out
                .as_ref()
                .map_or_else(|| b.message.clone(), |now| now.message.clone()),
        ),
        None => verdict(
            BROWN_OUT,
            false,
            "NoBrownOut",
            "the wait target is met within maxReplicas: no traffic is shed or downgraded",
        ),
    })
}

/// Whether a status says a brown-out is in force (`BrownOut=True`).
pub fn browned_out(status: Option<&AgentStatus>) -> bool {
    status
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == BROWN_OUT))
        .is_some_and(|c| c.status == "True")
}
