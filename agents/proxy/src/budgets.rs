//! The budget authority the request path sees: the embedded one (a single sidecar, state
//! rebuilt from its outbox) or the cluster one (replicas sharing Budgets through PostgreSQL),
//! chosen by the configuration's `authority` field. `handler.rs` does not know which.

use jiff::Timestamp;
use soma_metering::{Amount, BudgetDef, BudgetKey, BudgetRef, Reservation};

use crate::authority::{Applied, Authority, ChainError, Plan, Reserve};
use crate::cluster::ClusterAuthority;
use crate::outbox::PastSpend;

/// Either authority.
#[derive(Debug)]
pub enum Budgets {
    /// `authority: embedded`.
    Embedded(Authority),
    /// `authority: {postgres: {...}}`.
    Cluster(Box<ClusterAuthority>),
}

impl Budgets {
    /// The chain as recorded in the outbox (`ns/team@uid,platform/tenant@uid`).
    pub fn chain_label(&self) -> String {
        match self {
            Budgets::Embedded(a) => a.chain_label(),
            Budgets::Cluster(a) => a.chain_label(),
        }
    }

    /// Whether any Budget applies.
    pub fn is_budgeted(&self) -> bool {
        match self {
            Budgets::Embedded(a) => a.is_budgeted(),
            Budgets::Cluster(a) => a.is_budgeted(),
        }
    }

    /// A Budget's definition.
    pub fn def(&self, key: &BudgetKey) -> Option<BudgetDef> {
        match self {
            Budgets::Embedded(a) => a.def(key),
            Budgets::Cluster(a) => a.def(key),
        }
    }

    /// Takes a new plan while running (a live edit); an invalid one changes nothing.
    pub fn apply(&self, plan: &Plan) -> Result<Applied, ChainError> {
        match self {
            Budgets::Embedded(a) => a.apply(plan),
            Budgets::Cluster(a) => a.apply(plan),
        }
    }

    /// Reserves `want` on every Budget of the chain, or on none.
    pub async fn reserve(&self, now: Timestamp, want: Amount) -> Reserve {
        match self {
            Budgets::Embedded(a) => a.reserve(now, want),
            Budgets::Cluster(a) => a.reserve(now, want).await,
        }
    }

    /// Counts a refusal (or, with `brown_out`, a downgrade) by `key` for the Budget's
    /// cluster-wide figures (the embedded authority has only the sidecar's own metrics).
    pub fn count_refusal(&self, key: &BudgetKey, brown_out: bool) {
        if let Budgets::Cluster(a) = self {
            a.count_refusal(key, brown_out);
        }
    }

    /// Settles each reservation with `actual`.
    pub fn settle(&self, now: Timestamp, reservations: Vec<Reservation>, actual: Amount) {
        match self {
            Budgets::Embedded(a) => a.settle(now, reservations, actual),
            Budgets::Cluster(a) => a.settle(now, reservations, actual),
        }
    }

    /// Releases each reservation.
    pub fn release(&self, now: Timestamp, reservations: Vec<Reservation>) {
        match self {
            Budgets::Embedded(a) => a.release(now, reservations),
            Budgets::Cluster(a) => a.release(now, reservations),
        }
    }

    /// The earliest instant whose spend may still count in some window: the outbox replays
    /// from here at start-up, and keeps delivered rows from here on.
    pub fn replay_since(&self, now: Timestamp) -> Timestamp {
        match self {
            Budgets::Embedded(a) => a.replay_since(now),
            Budgets::Cluster(a) => a.replay_since(now),
        }
    }

    /// Replays settled spend from the outbox into the Budgets of `only` (all when `None`).
    pub fn replay(&self, rows: &[PastSpend], only: Option<&[BudgetRef]>) {
        match self {
            Budgets::Embedded(a) => a.replay(rows, only),
            Budgets::Cluster(a) => a.replay(rows, only),
        }
    }

    /// Cost left per Budget, for metrics (the cluster authority reports this replica's
    /// unused lease).
    pub fn remaining_micros(&self, now: Timestamp) -> Vec<(BudgetKey, Option<u64>)> {
        match self {
            Budgets::Embedded(a) => a.remaining_micros(now),
            Budgets::Cluster(a) => a.remaining_micros(now),
        }
    }
}
