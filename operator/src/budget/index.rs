//! Which Budgets each Agent's chain (and each Budget's own parent chain) passed through at its
//! last reconcile, and a bus of "refresh these Budgets" requests.
//!
//! The index answers the watches' questions without walking chains again: a Budget that
//! changes (or appears) wakes every Agent and child Budget whose chain passed through it or
//! stopped at it, whatever namespace they are in; and a Budget's status lists the Agents that
//! charge it. The bus carries refresh requests from the Agent controller (an Agent started or
//! stopped charging a Budget) and from the ledger (the sidecars just charged it) to the Budget
//! controllers.
//!
//! ```text
//!  agent reconcile ─record(agent, chain)─► index ─changed keys─┐
//!  ledger NOTIFY soma_usage ───────────────────────────────────┼─► bus ─► Budget controllers
//!  Budget event ─► index.waiting_on(key) ─► Agents / child Budgets to reconcile
//! ```

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use soma_metering::BudgetKey;
use tokio::sync::broadcast;

/// What one referrer's chain passed through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Walked {
    /// The Budgets found, the named one first.
    pub chain: Vec<BudgetKey>,
    /// The Budget the walk stopped at outside the chain: missing, or a parent that does not
    /// (yet) grant the child's namespace. Its appearance or change is what the referrer waits
    /// for.
    pub missing: Option<BudgetKey>,
}

impl Walked {
    fn touches(&self, key: &BudgetKey) -> bool {
        self.chain.contains(key) || self.missing.as_ref() == Some(key)
    }
}

/// The index and the bus.
#[derive(Debug)]
pub struct ChainIndex {
    agents: Mutex<HashMap<String, Walked>>,
    budgets: Mutex<HashMap<BudgetKey, Walked>>,
    bus: broadcast::Sender<Option<Vec<BudgetKey>>>,
}

impl Default for ChainIndex {
    fn default() -> Self {
        ChainIndex {
            agents: Mutex::default(),
            budgets: Mutex::default(),
            bus: broadcast::channel(1024).0,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ChainIndex {
    /// Records the chain of Agent `agent` (`namespace/name`; `None`: it has none or is gone)
    /// and asks for a refresh of every Budget it started or stopped charging.
    pub fn record_agent(&self, agent: &str, walked: Option<Walked>) {
        let old = {
            let mut m = lock(&self.agents);
            match walked.clone() {
                Some(w) => m.insert(agent.to_owned(), w),
                None => m.remove(agent),
            }
        };
        let before: BTreeSet<BudgetKey> = old
            .map(|w| w.chain)
            .unwrap_or_default()
            .into_iter()
            .collect();
        let after: BTreeSet<BudgetKey> = walked
            .map(|w| w.chain)
            .unwrap_or_default()
            .into_iter()
            .collect();
        let changed: Vec<BudgetKey> = before.symmetric_difference(&after).cloned().collect();
        if !changed.is_empty() {
            self.refresh(Some(changed));
        }
    }

    /// Records the parent chain of Budget `key`.
    pub fn record_budget(&self, key: &BudgetKey, walked: Walked) {
        lock(&self.budgets).insert(key.clone(), walked);
    }

    /// Agents (`namespace/name`) whose chain passed through or stopped at `key`.
    pub fn agents_touching(&self, key: &BudgetKey) -> Vec<String> {
        let mut out: Vec<String> = lock(&self.agents)
            .iter()
            .filter(|(_, w)| w.touches(key))
            .map(|(a, _)| a.clone())
            .collect();
        out.sort();
        out
    }

    /// Agents (`namespace/name`) charging `key`: its chain holds it.
    pub fn agents_charging(&self, key: &BudgetKey) -> Vec<String> {
        let mut out: Vec<String> = lock(&self.agents)
            .iter()
            .filter(|(_, w)| w.chain.contains(key))
            .map(|(a, _)| a.clone())
            .collect();
        out.sort();
        out
    }

    /// Budgets whose own parent chain passed through or stopped at `key` (other than itself).
    pub fn budgets_touching(&self, key: &BudgetKey) -> Vec<BudgetKey> {
        lock(&self.budgets)
            .iter()
            .filter(|(k, w)| *k != key && w.touches(key))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Asks the Budget controllers to refresh `keys` (`None`: every Budget).
    pub fn refresh(&self, keys: Option<Vec<BudgetKey>>) {
        // No receiver (no Budget controller running yet) is fine: it reconciles everything
        // when it starts.
        let _ = self.bus.send(keys);
    }

    /// A receiver of refresh requests.
    pub fn subscribe(&self) -> broadcast::Receiver<Option<Vec<BudgetKey>>> {
        self.bus.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> BudgetKey {
        s.parse().unwrap()
    }

    #[test]
    fn agents_and_children_are_found_by_any_budget_they_touch() {
        let index = ChainIndex::default();
        let mut rx = index.subscribe();
        index.record_agent(
            "a/bot",
            Some(Walked {
                chain: vec![k("a/team")],
                missing: Some(k("platform/tenant")),
            }),
        );
        assert_eq!(rx.try_recv().unwrap(), Some(vec![k("a/team")]));
        assert_eq!(index.agents_touching(&k("platform/tenant")), vec!["a/bot"]);
        assert!(index.agents_charging(&k("platform/tenant")).is_empty());
        index.record_agent(
            "a/bot",
            Some(Walked {
                chain: vec![k("a/team"), k("platform/tenant")],
                missing: None,
            }),
        );
        assert_eq!(rx.try_recv().unwrap(), Some(vec![k("platform/tenant")]));
        assert_eq!(index.agents_charging(&k("platform/tenant")), vec!["a/bot"]);
        index.record_agent("a/bot", None);
        let mut gone = rx.try_recv().unwrap().unwrap();
        gone.sort();
        assert_eq!(gone, vec![k("a/team"), k("platform/tenant")]);
        index.record_budget(
            &k("a/team"),
            Walked {
                chain: vec![k("a/team")],
                missing: Some(k("platform/tenant")),
            },
        );
        assert_eq!(
            index.budgets_touching(&k("platform/tenant")),
            vec![k("a/team")]
        );
        assert!(index.budgets_touching(&k("a/team")).is_empty());
    }
}
