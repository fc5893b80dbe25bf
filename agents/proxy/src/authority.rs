//! The embedded budget authority: every Budget in the chain (the Agent's Budget and its
//! `parentRef` ancestors) as an in-memory [`Ledger`] behind one mutex, rebuilt from the outbox
//! at start-up. A reservation is all-or-nothing across the chain.
//!
//! This is the single-sidecar authority (`authority: embedded`, the default). Its durable state
//! is the SQLite outbox: the in-memory ledgers are rebuilt from it at every start. Budgets
//! shared by many replicas use the cluster authority (`crate::cluster`, PostgreSQL with leased
//! slices); `crate::budgets::Budgets` is the one type the request path sees.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use jiff::Timestamp;
use soma_metering::{Amount, BudgetDef, Ledger, Refusal, Reservation};

use crate::outbox::PastSpend;

/// Why a chain could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A definition is invalid.
    #[error(transparent)]
    Definition(#[from] soma_metering::Error),
    /// `parentRef`s loop.
    #[error("budget {0:?} is its own ancestor")]
    Cycle(String),
    /// The cluster authority keys leases by calendar window.
    #[error(
        "budget {0:?} has a rolling period, which the postgres budget authority does not support; use a calendar period or the embedded authority"
    )]
    Rolling(String),
}

/// A chain's Budget names in order, the first name without a definition, and the ledgers.
pub type Chain = (Vec<String>, Option<String>, HashMap<String, Ledger>);

/// Follows `budget`'s `parentRef`s through `defs`.
pub fn build_chain(budget: Option<&str>, defs: &[BudgetDef]) -> Result<Chain, ChainError> {
    let mut chain = Vec::new();
    let mut ledgers = HashMap::new();
    let mut missing = None;
    let mut next = budget.map(str::to_owned);
    while let Some(name) = next.take() {
        if chain.contains(&name) {
            return Err(ChainError::Cycle(name));
        }
        match defs.iter().find(|d| d.name == name) {
            Some(def) => {
                next = def.parent_ref.as_ref().map(|p| p.name.clone());
                ledgers.insert(name.clone(), Ledger::new(def.clone())?);
            }
            None => missing = Some(name.clone()),
        }
        chain.push(name);
    }
    Ok((chain, missing, ledgers))
}

/// The outcome of a reservation attempt.
#[derive(Debug)]
pub enum Reserve {
    /// Taken on every Budget of the chain.
    Taken(Vec<Reservation>),
    /// A Budget refused (nothing is held).
    Refused(Box<Refusal>),
    /// The configured Budget (or an ancestor) has no definition: fail closed.
    Undefined(String),
    /// The authority cannot decide (the cluster authority's database is unreachable and the
    /// local slice is used up): fail closed, with the reason.
    Unavailable(String),
}

/// The authority.
#[derive(Debug)]
pub struct Authority {
    chain: Vec<String>,
    missing: Option<String>,
    ledgers: Mutex<HashMap<String, Ledger>>,
}

impl Authority {
    /// Builds the chain for `budget` from `defs`.
    pub fn new(budget: Option<&str>, defs: &[BudgetDef]) -> Result<Authority, ChainError> {
        let (chain, missing, ledgers) = build_chain(budget, defs)?;
        Ok(Authority {
            chain,
            missing,
            ledgers: Mutex::new(ledgers),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Ledger>> {
        // A panic while holding the lock cannot leave a ledger half-updated (each method
        // finishes its arithmetic before returning), so the data is still sound.
        self.ledgers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The chain as recorded in the outbox (`team,tenant`).
    pub fn chain_label(&self) -> String {
        self.chain.join(",")
    }

    /// Whether any Budget applies.
    pub fn is_budgeted(&self) -> bool {
        !self.chain.is_empty()
    }

    /// A Budget's definition (brown-out reads `onExhausted` of the Budget that refused).
    pub fn def(&self, name: &str) -> Option<BudgetDef> {
        self.lock().get(name).map(|l| l.def().clone())
    }

    /// Reserves `want` on every Budget of the chain, or on none.
    pub fn reserve(&self, now: Timestamp, want: Amount) -> Reserve {
        if let Some(name) = &self.missing {
            return Reserve::Undefined(name.clone());
        }
        let mut ledgers = self.lock();
        let mut taken = Vec::with_capacity(self.chain.len());
        for name in &self.chain {
            let Some(ledger) = ledgers.get_mut(name) else {
                return Reserve::Undefined(name.clone());
            };
            match ledger.reserve(now, want) {
                Ok(r) => taken.push(r),
                Err(refusal) => {
                    for r in taken {
                        if let Some(l) = ledgers.get_mut(&r.budget) {
                            l.release(now, r);
                        }
                    }
                    return Reserve::Refused(Box::new(refusal));
                }
            }
        }
        Reserve::Taken(taken)
    }

    /// Settles each reservation with `actual`.
    pub fn settle(&self, now: Timestamp, reservations: Vec<Reservation>, actual: Amount) {
        let mut ledgers = self.lock();
        for r in reservations {
            if let Some(l) = ledgers.get_mut(&r.budget) {
                l.settle(now, r, actual);
            }
        }
    }

    /// Releases each reservation.
    pub fn release(&self, now: Timestamp, reservations: Vec<Reservation>) {
        let mut ledgers = self.lock();
        for r in reservations {
            if let Some(l) = ledgers.get_mut(&r.budget) {
                l.release(now, r);
            }
        }
    }

    /// The earliest instant whose spend may still count in some window.
    pub fn replay_since(&self, now: Timestamp) -> Timestamp {
        let mut ledgers = self.lock();
        ledgers
            .values_mut()
            .filter_map(|l| l.window(now).ok())
            // A rolling window keeps a minute's bucket a minute longer.
            .map(|w| w.start - jiff::SignedDuration::from_secs(60))
            .min()
            .unwrap_or(now)
    }

    /// Replays settled spend from the outbox (start-up only, before any reservation).
    pub fn replay(&self, rows: &[PastSpend]) {
        let mut ledgers = self.lock();
        for row in rows {
            for name in row.budgets.split(',') {
                if let Some(l) = ledgers.get_mut(name) {
                    l.record(row.at, row.amount);
                }
            }
        }
    }

    /// Cost left per Budget (for metrics).
    pub fn remaining_micros(&self, now: Timestamp) -> Vec<(String, Option<u64>)> {
        let mut ledgers = self.lock();
        self.chain
            .iter()
            .filter_map(|n| {
                let l = ledgers.get_mut(n)?;
                Some((n.clone(), l.remaining_micros(now).ok().flatten()))
            })
            .collect()
    }
}
