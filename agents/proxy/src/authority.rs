//! The embedded budget authority: every Budget in the chain (the Agent's Budget and its
//! `parentRef` ancestors) as an in-memory [`Ledger`] behind one mutex, rebuilt from the outbox
//! at start-up. A reservation is all-or-nothing across the chain.
//!
//! This is the single-sidecar authority (`authority: embedded`). Its durable state is the SQLite
//! outbox: the in-memory ledgers are rebuilt from it at every start. Budgets shared by many
//! replicas use the cluster authority (`crate::cluster`, PostgreSQL with leased slices);
//! `crate::budgets::Budgets` is the one type the request path sees.
//!
//! Both authorities take the chain from [`plan`], which walks it with the resolver every part
//! of Soma uses (`soma_metering::chain::resolve`), and both take a new plan while running
//! ([`Authority::apply`]): a Budget edited in the cluster changes the caps here without a
//! restart, keeping what was spent and reserved.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use jiff::Timestamp;
use soma_metering::chain::{self, ChainProblem};
use soma_metering::{Amount, BudgetDef, BudgetKey, BudgetRef, Ledger, Refusal, Reservation};

use crate::outbox::PastSpend;

/// Why a definition could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A definition is invalid.
    #[error(transparent)]
    Definition(#[from] soma_metering::Error),
    /// The cluster authority keys leases by calendar window.
    #[error(
        "budget {0} has a rolling period, which the postgres budget authority does not support; use a calendar period or the embedded authority"
    )]
    Rolling(BudgetKey),
}

/// The chain a sidecar enforces, resolved from the definitions it knows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// The Budgets, the Agent's first.
    pub defs: Vec<BudgetDef>,
    /// Why the chain cannot be enforced (requests are refused until it can).
    pub problem: Option<ChainProblem>,
}

impl Plan {
    /// The chain's references, as records carry them.
    pub fn refs(&self) -> Vec<BudgetRef> {
        self.defs.iter().map(BudgetDef::reference).collect()
    }

    /// Every Budget the walk looked at (found or missing): what the live sources read.
    pub fn keys(&self) -> Vec<BudgetKey> {
        let mut keys: Vec<BudgetKey> = self.defs.iter().map(BudgetDef::key).collect();
        if let Some(ChainProblem::Missing { key, .. }) = &self.problem {
            keys.push(key.clone());
        }
        keys
    }
}

/// Walks `start`'s chain through `defs` (no Budget: an empty plan).
pub fn plan(start: Option<&BudgetKey>, defs: &[BudgetDef]) -> Plan {
    let Some(start) = start else {
        return Plan::default();
    };
    let r = chain::resolve(start, "spec.budgetRef", |k| {
        defs.iter().find(|d| d.key() == *k).cloned()
    });
    Plan {
        defs: r.budgets,
        problem: r.problem,
    }
}

/// The outcome of a reservation attempt.
#[derive(Debug)]
pub enum Reserve {
    /// Taken on every Budget of the chain.
    Taken(Vec<Reservation>),
    /// A Budget refused (nothing is held).
    Refused(Box<Refusal>),
    /// The chain cannot be enforced (a Budget missing, a parent refusing the child's
    /// namespace, a loop): fail closed, with the reason.
    Undefined(String),
    /// The authority cannot decide (the cluster authority's database is unreachable and the
    /// local slice is used up): fail closed, with the reason.
    Unavailable(String),
}

/// What changed when a plan was applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Budgets new to the chain (or recreated with a new uid): their spend is replayed.
    pub added: Vec<BudgetRef>,
    /// Whether a period cap (tokens or cost) changed on a Budget already enforced.
    pub caps_changed: bool,
    /// Whether anything at all changed.
    pub changed: bool,
}

/// The chain's state, shared by both authorities: the plan's order, its problem, and one
/// state `S` per Budget (a ledger here, a ledger with its lease in the cluster authority).
#[derive(Debug)]
pub struct ChainState<S> {
    /// The chain in order.
    pub refs: Vec<BudgetRef>,
    /// `refs` as recorded in the outbox, made when they change (every request's begin record
    /// carries it).
    label: String,
    /// Why it cannot be enforced.
    pub problem: Option<ChainProblem>,
    /// Each Budget's state.
    pub states: HashMap<BudgetKey, S>,
}

impl<S> Default for ChainState<S> {
    fn default() -> Self {
        ChainState {
            refs: Vec::new(),
            label: String::new(),
            problem: None,
            states: HashMap::new(),
        }
    }
}

/// How an authority keeps one Budget's state.
pub trait BudgetState: Sized {
    /// A fresh state for `def`.
    fn create(def: BudgetDef) -> Result<Self, ChainError>;
    /// The definition it enforces.
    fn def(&self) -> &BudgetDef;
    /// Takes an edited definition of the same Budget, keeping spend and reservations.
    fn redefine(&mut self, def: BudgetDef) -> Result<(), ChainError>;
}

impl<S: BudgetState> ChainState<S> {
    /// Takes `plan`. Every definition is checked before anything changes: an invalid one
    /// leaves the state as it was.
    pub fn apply(&mut self, plan: &Plan) -> Result<Applied, ChainError> {
        let mut fresh: HashMap<BudgetKey, S> = HashMap::new();
        for def in &plan.defs {
            soma_metering::Ledger::new(def.clone())?;
            let key = def.key();
            let same_budget = self
                .states
                .get(&key)
                .is_some_and(|s| s.def().uid == def.uid);
            if !same_budget {
                fresh.insert(key, S::create(def.clone())?);
            }
        }
        let mut applied = Applied::default();
        let keep: Vec<BudgetKey> = plan.defs.iter().map(BudgetDef::key).collect();
        let before = self.states.len();
        self.states.retain(|k, _| keep.contains(k));
        applied.changed |= self.states.len() != before;
        for def in &plan.defs {
            let key = def.key();
            if let Some(state) = fresh.remove(&key) {
                applied.added.push(def.reference());
                self.states.insert(key, state);
                applied.changed = true;
            } else if let Some(state) = self.states.get_mut(&key)
                && state.def() != def
            {
                let (old, new) = (&state.def().limits, &def.limits);
                applied.caps_changed |=
                    (old.tokens, old.cost_micros) != (new.tokens, new.cost_micros);
                state.redefine(def.clone())?;
                applied.changed = true;
            }
        }
        let refs = plan.refs();
        applied.changed |= refs != self.refs || plan.problem != self.problem;
        self.label = BudgetRef::chain_label(&refs);
        self.refs = refs;
        self.problem = plan.problem.clone();
        Ok(applied)
    }

    /// The chain as recorded in the outbox (`ns/team@uid,platform/tenant@uid`).
    pub fn label(&self) -> String {
        self.label.clone()
    }

    /// The reason requests are refused, if the chain cannot be enforced.
    pub fn undefined(&self) -> Option<String> {
        self.problem.as_ref().map(ToString::to_string)
    }

    /// The state of each Budget of the chain whose spend `label` (a record's chain) counts
    /// for: same key and same uid.
    pub fn charged_by<'a>(&'a mut self, label: &str) -> impl Iterator<Item = &'a mut S> + 'a {
        let refs = BudgetRef::parse_chain(label).unwrap_or_default();
        self.states
            .iter_mut()
            .filter(move |(k, s)| refs.iter().any(|r| r.key == **k && r.uid == s.def().uid))
            .map(|(_, s)| s)
    }
}

impl BudgetState for Ledger {
    fn create(def: BudgetDef) -> Result<Self, ChainError> {
        Ok(Ledger::new(def)?)
    }
    fn def(&self) -> &BudgetDef {
        Ledger::def(self)
    }
    fn redefine(&mut self, def: BudgetDef) -> Result<(), ChainError> {
        Ok(Ledger::redefine(self, def)?)
    }
}

/// The authority.
#[derive(Debug)]
pub struct Authority {
    chain: Mutex<ChainState<Ledger>>,
}

impl Authority {
    /// Enforces `plan`.
    pub fn new(plan: &Plan) -> Result<Authority, ChainError> {
        let mut chain = ChainState::default();
        chain.apply(plan)?;
        Ok(Authority {
            chain: Mutex::new(chain),
        })
    }

    fn lock(&self) -> MutexGuard<'_, ChainState<Ledger>> {
        // A panic while holding the lock cannot leave a ledger half-updated (each method
        // finishes its arithmetic before returning), so the data is still sound.
        self.chain.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a new plan while running.
    pub fn apply(&self, plan: &Plan) -> Result<Applied, ChainError> {
        self.lock().apply(plan)
    }

    /// The chain as recorded in the outbox.
    pub fn chain_label(&self) -> String {
        self.lock().label()
    }

    /// Whether any Budget applies.
    pub fn is_budgeted(&self) -> bool {
        let c = self.lock();
        !c.refs.is_empty() || c.problem.is_some()
    }

    /// A Budget's definition (brown-out reads `onExhausted` of the Budget that refused).
    pub fn def(&self, key: &BudgetKey) -> Option<BudgetDef> {
        self.lock().states.get(key).map(|l| l.def().clone())
    }

    /// Reserves `want` on every Budget of the chain, or on none.
    pub fn reserve(&self, now: Timestamp, want: Amount) -> Reserve {
        let mut c = self.lock();
        if let Some(reason) = c.undefined() {
            return Reserve::Undefined(reason);
        }
        let ChainState { refs, states, .. } = &mut *c;
        let mut taken = Vec::with_capacity(refs.len());
        for r in refs.iter() {
            let Some(ledger) = states.get_mut(&r.key) else {
                return Reserve::Undefined(format!("Budget {} has no definition", r.key));
            };
            match ledger.reserve(now, want) {
                Ok(res) => taken.push(res),
                Err(refusal) => {
                    for res in taken {
                        if let Some(l) = states.get_mut(&res.budget) {
                            l.release(now, res);
                        }
                    }
                    return Reserve::Refused(refusal);
                }
            }
        }
        Reserve::Taken(taken)
    }

    /// Settles each reservation with `actual`.
    pub fn settle(&self, now: Timestamp, reservations: Vec<Reservation>, actual: Amount) {
        let mut c = self.lock();
        for r in reservations {
            if let Some(l) = c.states.get_mut(&r.budget) {
                l.settle(now, r, actual);
            }
        }
    }

    /// Releases each reservation.
    pub fn release(&self, now: Timestamp, reservations: Vec<Reservation>) {
        let mut c = self.lock();
        for r in reservations {
            if let Some(l) = c.states.get_mut(&r.budget) {
                l.release(now, r);
            }
        }
    }

    /// The earliest instant whose spend may still count in some window.
    pub fn replay_since(&self, now: Timestamp) -> Timestamp {
        let mut c = self.lock();
        c.states
            .values_mut()
            .filter_map(|l| l.window(now).ok())
            // A rolling window keeps a minute's bucket a minute longer.
            .map(|w| w.start - jiff::SignedDuration::from_secs(60))
            .min()
            .unwrap_or(now)
    }

    /// Replays settled spend from the outbox into the Budgets of `only` (all, when `None`):
    /// at start-up before any reservation, and for a Budget added to the chain while running.
    pub fn replay(&self, rows: &[PastSpend], only: Option<&[BudgetRef]>) {
        let mut c = self.lock();
        for row in rows {
            for l in c.charged_by(&row.budgets) {
                if only.is_none_or(|o| o.contains(&l.def().reference())) {
                    l.record(row.at, row.amount);
                }
            }
        }
    }

    /// Cost left per Budget (for metrics).
    pub fn remaining_micros(&self, now: Timestamp) -> Vec<(BudgetKey, Option<u64>)> {
        let mut c = self.lock();
        let refs = c.refs.clone();
        refs.iter()
            .filter_map(|r| {
                let l = c.states.get_mut(&r.key)?;
                Some((r.key.clone(), l.remaining_micros(now).ok().flatten()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use soma_metering::budget::{Limits, ParentRef};
    use soma_metering::period::{CalendarUnit, PeriodSpec};

    fn def(ns: &str, name: &str, tokens: u64, parent: Option<&str>) -> BudgetDef {
        BudgetDef {
            namespace: ns.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            limits: Limits {
                tokens: Some(tokens),
                ..Limits::default()
            },
            period: PeriodSpec {
                calendar: Some(CalendarUnit::Day),
                ..PeriodSpec::default()
            },
            parent_ref: parent.map(|p| ParentRef {
                namespace: None,
                name: p.into(),
            }),
            ..BudgetDef::default()
        }
    }

    fn amt(tokens: u64) -> Amount {
        Amount { tokens, micros: 0 }
    }

    #[test]
    fn a_live_edit_keeps_spend_and_takes_the_new_cap() {
        let now = Timestamp::now();
        let start = BudgetKey::new("a", "team");
        let a = Authority::new(&plan(Some(&start), &[def("a", "team", 100, None)])).unwrap();
        let Reserve::Taken(r) = a.reserve(now, amt(60)) else {
            panic!("fits")
        };
        a.settle(now, r, amt(60));
        // Lowered to 50: nothing more fits, the 60 spent stays.
        let applied = a
            .apply(&plan(Some(&start), &[def("a", "team", 50, None)]))
            .unwrap();
        assert!(applied.caps_changed && applied.added.is_empty());
        assert!(matches!(a.reserve(now, amt(1)), Reserve::Refused(_)));
        // A parent added live is enforced at once, and only its own spend counts for it.
        let applied = a
            .apply(&plan(
                Some(&start),
                &[
                    def("a", "team", 1_000, Some("tenant")),
                    def("a", "tenant", 10, None),
                ],
            ))
            .unwrap();
        assert_eq!(
            applied.added,
            vec![def("a", "tenant", 10, None).reference()]
        );
        assert_eq!(a.chain_label(), "a/team@uid-team,a/tenant@uid-tenant");
        match a.reserve(now, amt(11)) {
            Reserve::Refused(r) => assert_eq!(r.budget, BudgetKey::new("a", "tenant")),
            other => panic!("{other:?}"),
        }
        // A parent that goes missing fails closed with the field to fix.
        a.apply(&plan(
            Some(&start),
            &[def("a", "team", 1_000, Some("tenant"))],
        ))
        .unwrap();
        match a.reserve(now, amt(1)) {
            Reserve::Undefined(why) => assert!(why.contains("spec.parentRef"), "{why}"),
            other => panic!("{other:?}"),
        }
        // An invalid definition changes nothing.
        let mut bad = def("a", "team", 1, None);
        bad.limits = Limits::default();
        assert!(a.apply(&plan(Some(&start), &[bad])).is_err());
        assert!(matches!(a.reserve(now, amt(1)), Reserve::Undefined(_)));
    }

    #[test]
    fn a_recreated_budget_does_not_inherit_spend() {
        let now = Timestamp::now();
        let start = BudgetKey::new("a", "team");
        let a = Authority::new(&plan(Some(&start), &[def("a", "team", 100, None)])).unwrap();
        let rows = vec![PastSpend {
            budgets: "a/team@uid-team".into(),
            at: now,
            amount: amt(90),
        }];
        a.replay(&rows, None);
        assert!(matches!(a.reserve(now, amt(20)), Reserve::Refused(_)));
        let mut again = def("a", "team", 100, None);
        again.uid = "uid-new".into();
        let applied = a.apply(&plan(Some(&start), &[again.clone()])).unwrap();
        assert_eq!(applied.added, vec![again.reference()]);
        a.replay(&rows, Some(&applied.added));
        assert!(matches!(a.reserve(now, amt(20)), Reserve::Taken(_)));
    }
}
