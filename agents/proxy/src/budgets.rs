//! The budget authority the request path sees: the embedded one (a single sidecar, state
//! rebuilt from its outbox) or the cluster one (replicas sharing Budgets through PostgreSQL),
//! chosen by the configuration's `authority` field. `handler.rs` does not know which.

use jiff::Timestamp;
use soma_metering::{Amount, BudgetDef, Reservation};

use crate::authority::{Authority, Reserve};
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
    /// The chain as recorded in the outbox (`team,tenant`).
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
    pub fn def(&self, name: &str) -> Option<BudgetDef> {
        match self {
            Budgets::Embedded(a) => a.def(name),
            Budgets::Cluster(a) => a.def(name),
        }
    }

    /// Reserves `want` on every Budget of the chain, or on none.
    pub async fn reserve(&self, now: Timestamp, want: Amount) -> Reserve {
        match self {
            Budgets::Embedded(a) => a.reserve(now, want),
            Budgets::Cluster(a) => a.reserve(now, want).await,
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

    /// Replays settled spend from the outbox (start-up only).
    pub fn replay(&self, rows: &[PastSpend]) {
        match self {
            Budgets::Embedded(a) => a.replay(rows),
            Budgets::Cluster(a) => a.replay(rows),
        }
    }

    /// Cost left per Budget, for metrics (the cluster authority reports this replica's
    /// unused lease).
    pub fn remaining_micros(&self, now: Timestamp) -> Vec<(String, Option<u64>)> {
        match self {
            Budgets::Embedded(a) => a.remaining_micros(now),
            Budgets::Cluster(a) => a.remaining_micros(now),
        }
    }
}
