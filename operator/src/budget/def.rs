//! A Budget as the rest of Soma sees it: the CRD turned into the metering crate's
//! [`BudgetDef`] (one conversion, here), and its chain resolved with the one resolver
//! (`soma_metering::chain::resolve`) over Budgets read from the API.

use std::collections::HashMap;

use kube::api::Api;
use kube::{Client, ResourceExt};
use soma_crds::Budget;
use soma_crds::budget::{CalendarUnit, ExhaustedAction};
use soma_metering::budget::{self, Limits, OnExhausted, ParentRef};
use soma_metering::chain::{self, ChainProblem, Resolution};
use soma_metering::period::{self, PeriodSpec};
use soma_metering::{BudgetDef, BudgetKey};

use crate::error::{Error, Result};

fn positive(v: Option<i64>) -> Option<u64> {
    v.and_then(|v| u64::try_from(v).ok())
}

/// The definition sidecars enforce and the ledger keeps for `budget`.
pub fn budget_def(budget: &Budget) -> BudgetDef {
    let spec = &budget.spec;
    BudgetDef {
        namespace: budget.namespace().unwrap_or_default(),
        name: budget.name_any(),
        uid: budget.uid().unwrap_or_default(),
        generation: budget.metadata.generation.unwrap_or_default(),
        limits: Limits {
            tokens: positive(spec.limits.tokens),
            cost_micros: positive(spec.limits.cost_micros),
            tokens_per_minute: positive(spec.limits.tokens_per_minute),
            requests_per_minute: positive(spec.limits.requests_per_minute),
        },
        period: PeriodSpec {
            calendar: spec.period.calendar.map(|c| match c {
                CalendarUnit::Hour => period::CalendarUnit::Hour,
                CalendarUnit::Day => period::CalendarUnit::Day,
                CalendarUnit::Month => period::CalendarUnit::Month,
            }),
            time_zone: spec.period.time_zone.clone(),
            rolling: spec.period.rolling.clone(),
        },
        thresholds: spec
            .thresholds
            .iter()
            .filter_map(|t| u8::try_from(*t).ok())
            .filter(|t| (1..=100).contains(t))
            .collect(),
        on_exhausted: OnExhausted {
            action: match spec.on_exhausted.action {
                ExhaustedAction::Deny => budget::ExhaustedAction::Deny,
                ExhaustedAction::BrownOut => budget::ExhaustedAction::BrownOut,
            },
            brown_out_model: spec.on_exhausted.brown_out_model.clone(),
        },
        parent_ref: spec.parent_ref.as_ref().map(|p| ParentRef {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
        }),
        allowed_child_namespaces: spec.allowed_child_namespaces.clone(),
        currency: spec.currency.clone(),
    }
}

/// The key of a Budget object.
pub fn key_of(budget: &Budget) -> BudgetKey {
    BudgetKey::new(budget.namespace().unwrap_or_default(), budget.name_any())
}

/// A chain resolved from the API, with the Budget objects it read.
#[derive(Debug, Default)]
pub struct Chain {
    /// The resolution.
    pub resolution: Resolution,
    /// The objects read, by key (the first is the one named).
    pub objects: HashMap<BudgetKey, Budget>,
}

impl Chain {
    /// The Budget object named first, if it exists.
    pub fn first(&self) -> Option<&Budget> {
        self.resolution
            .budgets
            .first()
            .and_then(|d| self.objects.get(&d.key()))
    }
}

/// Resolves the chain from `start` (named in `field`), reading each Budget from the API as the
/// walk reaches it: as many reads as the chain is long, whatever the rules decide.
pub async fn resolve_chain(client: &Client, start: &BudgetKey, field: &str) -> Result<Chain> {
    let mut read: HashMap<BudgetKey, Option<Budget>> = HashMap::new();
    loop {
        let resolution = chain::resolve(start, field, |k| {
            read.get(k).cloned().flatten().map(|b| budget_def(&b))
        });
        match &resolution.problem {
            Some(ChainProblem::Missing { key, .. }) if !read.contains_key(key) => {
                let api: Api<Budget> = Api::namespaced(client.clone(), &key.namespace);
                let found = api.get_opt(&key.name).await.map_err(|source| Error::Read {
                    what: format!("Budget {key}"),
                    source,
                })?;
                read.insert(key.clone(), found);
            }
            _ => {
                let objects = read
                    .into_iter()
                    .filter_map(|(k, b)| b.map(|b| (k, b)))
                    .collect();
                return Ok(Chain {
                    resolution,
                    objects,
                });
            }
        }
    }
}

/// Resolves the chain from `start` over Budgets already in memory (a watch's cache, or the
/// Budgets of a manifest for `render`).
pub fn resolve_in<'a>(
    start: &BudgetKey,
    field: &str,
    budgets: impl Iterator<Item = &'a Budget> + Clone,
) -> Resolution {
    chain::resolve(start, field, |k| {
        budgets.clone().find(|b| key_of(b) == *k).map(budget_def)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_field_reaches_the_definition() {
        let b: Budget = serde_json::from_value(serde_json::json!({
            "apiVersion": "soma.dev/v1alpha1", "kind": "Budget",
            "metadata": {"name": "team", "namespace": "a", "uid": "u1", "generation": 3},
            "spec": {
                "limits": {"tokens": 10, "costMicros": 20, "tokensPerMinute": 30, "requestsPerMinute": 40},
                "period": {"calendar": "month", "timeZone": "Europe/Berlin"},
                "thresholds": [50, 90],
                "onExhausted": {"action": "BrownOut", "brownOutModel": "mini"},
                "parentRef": {"namespace": "platform", "name": "tenant"},
                "allowedChildNamespaces": ["b"],
                "currency": "EUR"
            }
        }))
        .unwrap();
        let d = budget_def(&b);
        assert_eq!(d.key().to_string(), "a/team");
        assert_eq!((d.uid.as_str(), d.generation), ("u1", 3));
        assert_eq!(
            (
                d.limits.tokens,
                d.limits.cost_micros,
                d.limits.tokens_per_minute,
                d.limits.requests_per_minute
            ),
            (Some(10), Some(20), Some(30), Some(40))
        );
        assert_eq!(d.period.calendar, Some(period::CalendarUnit::Month));
        assert_eq!(d.period.time_zone.as_deref(), Some("Europe/Berlin"));
        assert_eq!(d.thresholds, vec![50, 90]);
        assert_eq!(d.on_exhausted.action, budget::ExhaustedAction::BrownOut);
        assert_eq!(d.on_exhausted.brown_out_model.as_deref(), Some("mini"));
        assert_eq!(d.parent_key().unwrap().to_string(), "platform/tenant");
        assert_eq!(d.allowed_child_namespaces, vec!["b".to_owned()]);
        assert_eq!(d.currency, "EUR");
        // The definition is one the sidecar's ledger accepts.
        soma_metering::Ledger::new(d).unwrap();
    }
}
