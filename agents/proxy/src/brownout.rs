//! Brown-out: the share of this Agent's traffic the operator's autoscaler asks the sidecars to
//! shed or downgrade because no replica count within `maxReplicas` meets the wait target
//! (the contract's [`BrownOut`], a live part of the configuration, `crate::live`).
//!
//! ```text
//!  parse ─► priority high? ─► pass
//!        └► p = BrownOut::take_probabilities(recent priority shares)[priority]
//!           error diffusion: take every request that carries the class's running sum of p
//!           over an integer ─► shed: 503 + Retry-After (client's wire format)
//!                              downgrade: model rewritten to brownOut.model
//! ```
//!
//! The choice is deterministic (error diffusion rather than a random draw): of every `n`
//! requests of a class, `⌊n·p⌋` or `⌈n·p⌉` are taken, so the shed share is exact at any
//! rate and a test can count it. The request path reads one `RwLock` briefly (never across
//! an await) and touches atomics; an `Arc` is cloned only while a brown-out is in force.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use serde_json::Value;
use soma_contract::load::{BrownOut, BrownOutAction, Priority};
use soma_metering::PriceTable;

use crate::error::ProxyError;
use crate::load::LoadMeter;
use crate::request::Call;
use crate::state::AppState;

/// Arrivals since the brown-out began that make its own priority shares trustworthy; before
/// them the shares since the sidecar started are used.
const RECENT_ARRIVALS: u64 = 20;

/// A brown-out in force.
#[derive(Debug)]
pub struct Active {
    spec: BrownOut,
    /// Arrivals by priority when it began.
    base: [u64; 3],
    /// Per priority, the running sum of take probabilities in 32.32 fixed point.
    acc: [AtomicU64; 3],
}

impl Active {
    fn shares(&self, meter: &LoadMeter) -> [f64; 3] {
        let now = meter.arrivals_by_priority();
        let recent: [u64; 3] = std::array::from_fn(|i| now[i].saturating_sub(self.base[i]));
        let counts = if recent.iter().sum::<u64>() >= RECENT_ARRIVALS {
            recent
        } else {
            now
        };
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return [0.0, 1.0, 0.0];
        }
        counts.map(|c| c as f64 / total as f64)
    }

    /// Whether the next request of `priority`, taken with probability `p`, is taken.
    fn take(&self, priority: Priority, p: f64) -> bool {
        let step = (p.clamp(0.0, 1.0) * 4_294_967_296.0) as u64;
        if step == 0 {
            return false;
        }
        let old = self.acc[priority.index()].fetch_add(step, Ordering::Relaxed);
        old.wrapping_add(step) >> 32 != old >> 32
    }
}

/// The brown-out in force, shared by the request path and the live configuration.
#[derive(Debug, Default)]
pub struct BrownOutGate(RwLock<Option<Arc<Active>>>);

impl BrownOutGate {
    /// Puts `spec` in force (or lifts the brown-out with `None`) when this sidecar can enforce
    /// it ([`enforceable`]); returns whether that changed anything, or why the spec was
    /// refused (the brown-out in force then stays). A spec equal to the one in force keeps
    /// its counts.
    pub fn set_checked(
        &self,
        spec: Option<BrownOut>,
        meter: &LoadMeter,
        prices: Option<&PriceTable>,
    ) -> Result<bool, String> {
        if let Some(s) = &spec {
            enforceable(s, prices)?;
        }
        Ok(self.set(spec, meter))
    }

    /// Puts `spec` in force (or lifts the brown-out with `None`); returns whether that changed
    /// anything. A spec equal to the one in force keeps its counts.
    fn set(&self, spec: Option<BrownOut>, meter: &LoadMeter) -> bool {
        let mut guard = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if guard.as_ref().map(|a| &a.spec) == spec.as_ref() {
            return false;
        }
        *guard = spec.filter(|s| s.fraction > 0.0).map(|spec| {
            Arc::new(Active {
                spec,
                base: meter.arrivals_by_priority(),
                acc: std::array::from_fn(|_| AtomicU64::new(0)),
            })
        });
        true
    }

    /// The brown-out in force.
    pub fn spec(&self) -> Option<BrownOut> {
        self.current().map(|a| a.spec.clone())
    }

    fn current(&self) -> Option<Arc<Active>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Whether this sidecar can enforce `spec`: its fields make sense, and a downgrade's model has a
/// price when the sidecar prices calls (a downgraded call is priced and reserved at that model,
/// so an unknown one would fail every call it takes instead of serving it).
pub fn enforceable(spec: &BrownOut, prices: Option<&PriceTable>) -> Result<(), String> {
    spec.validate()?;
    match (&spec.action, spec.model.as_deref(), prices) {
        (BrownOutAction::Downgrade, Some(model), Some(table)) if table.get(model).is_none() => Err(
            format!("brownOut.model {model:?} has no price in this sidecar's price table"),
        ),
        _ => Ok(()),
    }
}

/// Sheds the call (an error) or downgrades it (the model rewritten), when the brown-out in
/// force takes it.
pub fn apply(state: &AppState, call: &mut Call) -> Result<(), ProxyError> {
    if call.priority == Priority::High {
        return Ok(());
    }
    let Some(active) = state.brown_out.current() else {
        return Ok(());
    };
    let p = active.spec.take_probabilities(active.shares(&state.load))[call.priority.index()];
    if !active.take(call.priority, p) {
        return Ok(());
    }
    match (&active.spec.action, &active.spec.model) {
        (BrownOutAction::Downgrade, Some(model)) if *model != call.model => {
            call.json["model"] = Value::String(model.clone());
            call.model.clone_from(model);
            call.rewritten = true;
            state.load.downgraded();
            Ok(())
        }
        (BrownOutAction::Downgrade, _) => Ok(()),
        (BrownOutAction::Shed, _) => {
            state.load.refused(call.priority, true);
            Err(ProxyError::Shed {
                message: active.spec.message.clone(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn shed(fraction: f64) -> BrownOut {
        BrownOut {
            fraction,
            action: BrownOutAction::Shed,
            model: None,
            message: "m".into(),
        }
    }

    #[test]
    fn error_diffusion_takes_exactly_the_share() {
        let meter = LoadMeter::new();
        let gate = BrownOutGate::default();
        assert!(gate.set(Some(shed(0.3)), &meter));
        assert!(!gate.set(Some(shed(0.3)), &meter));
        let active = gate.current().unwrap();
        for p in [0.0, 0.1, 0.3, 0.5, 1.0] {
            let taken = (0..1000).filter(|_| active.take(Priority::Low, p)).count();
            let want = (p * 1000.0) as usize;
            assert!(taken.abs_diff(want) <= 1, "{p}: {taken}");
        }
        // A zero fraction is no brown-out; None lifts it.
        assert!(gate.set(Some(shed(0.0)), &meter));
        assert!(gate.spec().is_none());
        assert!(gate.set(Some(shed(0.3)), &meter));
        assert!(gate.set(None, &meter));
        assert!(gate.spec().is_none());
    }

    #[test]
    fn a_downgrade_to_an_unpriced_model_is_refused_and_the_one_in_force_stays() {
        let meter = LoadMeter::new();
        let gate = BrownOutGate::default();
        let prices: PriceTable = serde_json::from_value(
            serde_json::json!({"gpt-4o-mini": {"inputPerMTok": 150000, "outputPerMTok": 600000}}),
        )
        .unwrap();
        let downgrade = |model: &str| BrownOut {
            action: BrownOutAction::Downgrade,
            model: Some(model.into()),
            ..shed(0.4)
        };
        assert_eq!(
            gate.set_checked(Some(shed(0.2)), &meter, Some(&prices)),
            Ok(true)
        );
        let refused = gate
            .set_checked(Some(downgrade("gpt-unknown")), &meter, Some(&prices))
            .unwrap_err();
        assert!(refused.contains("gpt-unknown"), "{refused}");
        assert_eq!(gate.spec(), Some(shed(0.2)), "the brown-out in force stays");
        assert_eq!(
            gate.set_checked(Some(downgrade("gpt-4o-mini")), &meter, Some(&prices)),
            Ok(true)
        );
        // Without a price table any model is served, so any model can be downgraded to.
        assert_eq!(
            gate.set_checked(Some(downgrade("gpt-unknown")), &meter, None),
            Ok(true)
        );
        // Fields that make no sense are refused the same way.
        assert!(gate.set_checked(Some(shed(1.5)), &meter, None).is_err());
    }

    #[test]
    fn shares_come_from_recent_arrivals_once_there_are_enough() {
        let meter = LoadMeter::new();
        for _ in 0..10 {
            meter.refused(Priority::High, false);
        }
        let gate = BrownOutGate::default();
        gate.set(Some(shed(0.5)), &meter);
        let active = gate.current().unwrap();
        // Too few since it began: the shares since start (all high).
        assert_eq!(active.shares(&meter), [0.0, 0.0, 1.0]);
        for _ in 0..20 {
            meter.refused(Priority::Low, false);
        }
        assert_eq!(active.shares(&meter), [1.0, 0.0, 0.0]);
    }
}
