//! The Budget reconcile: definition → own parent chain (grants) → Agents charging it →
//! ledger (publish the live definition, read the window's spend, seal it) → status (pure) →
//! write only if changed, with Events for a new `Ready` reason, each threshold once per period
//! and exhaustion → requeue exactly at the next period boundary.
//!
//! Nothing polls: a Budget is reconciled when it (or its parent, or an Agent charging it)
//! changes, when the sidecars charge it (`NOTIFY soma_usage`, at most once per refresh
//! interval), and when its period ends.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use soma_crds::Budget;
use soma_ledger::spend;
use soma_metering::BudgetDef;
use tracing::{Span, field, instrument};

use super::def::{budget_def, key_of, resolve_chain};
use super::index::Walked;
use super::status::{BudgetObserved, Ledgered, budget_status, news, window};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::reconciler::{Reported, publish, ready_reason_changed, write_status};

/// Safety-net requeue; period boundaries and notifications drive everything else.
const RESYNC: Duration = Duration::from_secs(3600);

/// Publishes the live definition, reads the window's spend and what the sidecars hold, and
/// seals the window.
async fn observe_ledger(
    ctx: &Context,
    def: &BudgetDef,
    valid: bool,
    now: Timestamp,
) -> Result<Ledgered, String> {
    let Some(ledger) = &ctx.ledger else {
        return Err("no ledger".into());
    };
    let pool = ledger.pool().await?;
    if valid {
        soma_ledger::live::upsert_budget(pool, def)
            .await
            .map_err(|e| format!("writing the live definition: {e}"))?;
    }
    let Some(w) = window(def, now) else {
        return Ok(Ledgered::default());
    };
    let reference = def.reference();
    let (start, end) = (w.start.as_millisecond(), w.end.as_millisecond());
    // A rolling window counts whole minutes up to and including the current one.
    let end = if def.period.rolling.is_some() {
        end + 60_000
    } else {
        end
    };
    let spend = spend::window_spend(pool, &reference, start, end)
        .await
        .map_err(|e| format!("reading spend: {e}"))?;
    let leases = spend::leases(pool, &reference, start)
        .await
        .map_err(|e| format!("reading leases: {e}"))?;
    if let Some(key) = ledger.seal.lock().await.as_ref()
        && let Err(e) =
            soma_ledger::audit::seal_window(pool, key, &reference, start, end, now.as_millisecond())
                .await
    {
        // A seal is written again at the next refresh; the status does not depend on it.
        ctx.metrics.ledger_error("seal");
        tracing::warn!(error = %e, budget = %def.key(), "sealing the Budget window failed");
    }
    Ok(Ledgered { spend, leases })
}

/// Reconciles one Budget.
#[instrument(skip(budget, ctx), fields(namespace = field::Empty, budget = %budget.name_any()))]
pub async fn reconcile(budget: Arc<Budget>, ctx: Arc<Context>) -> Result<Action> {
    let ctx = &*ctx;
    let _timer = ctx.metrics.reconcile_started(Budget::CONTROLLER);
    let namespace = budget
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    Span::current().record("namespace", namespace.as_str());
    if budget.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let now = ctx.clock.now();
    let def = budget_def(&budget);
    let key = key_of(&budget);
    let invalid = soma_metering::Ledger::new(def.clone())
        .err()
        .map(|e| e.to_string());
    let chain = resolve_chain(&ctx.client, &key, "this Budget")
        .await?
        .resolution;
    ctx.index.record_budget(
        &key,
        Walked {
            chain: chain.budgets.iter().map(BudgetDef::key).collect(),
            missing: chain.stopped_at().cloned(),
        },
    );
    let (ledger, ledger_error) = match &ctx.ledger {
        None => (None, None),
        Some(_) => match observe_ledger(ctx, &def, invalid.is_none(), now).await {
            Ok(l) => (Some(l), None),
            Err(e) => {
                ctx.metrics.ledger_error("read");
                (Some(Ledgered::default()), Some(e))
            }
        },
    };
    let obs = BudgetObserved {
        generation: budget.metadata.generation,
        def: def.clone(),
        invalid: invalid.clone(),
        chain: chain.problem.clone(),
        ledger,
        ledger_error: ledger_error.clone(),
        agents: ctx.index.agents_charging(&key),
        now,
    };
    let time = Time(now);
    let written = write_status(ctx, &*budget, |old| budget_status(old, &obs, &time)).await?;
    if let Some(w) = &written {
        if let Some(ready) = ready_reason_changed::<Budget>(w) {
            let type_ = if ready.status == "True" {
                EventType::Normal
            } else {
                EventType::Warning
            };
            publish(
                ctx,
                &*budget,
                type_,
                &ready.reason,
                &ready.message,
                "Reconcile",
            )
            .await;
        }
        let (thresholds, exhausted) = news(w.old.as_ref(), &w.new);
        for t in thresholds {
            let note = format!(
                "Budget {key} reached {t}% ({} used, {} left this period; resets at {})",
                w.new.spent_display.as_deref().unwrap_or("-"),
                w.new.remaining_display.as_deref().unwrap_or("-"),
                w.new.period_end.as_deref().unwrap_or("-"),
            );
            publish(
                ctx,
                &*budget,
                EventType::Warning,
                "BudgetThreshold",
                &note,
                // One action per threshold: Kubernetes folds Events with the same reason and
                // action into one series, and each threshold is news of its own.
                &format!("Threshold{t}"),
            )
            .await;
        }
        if exhausted {
            let note = w
                .new
                .conditions
                .iter()
                .find(|c| c.type_ == super::status::EXHAUSTED)
                .map_or_else(String::new, |c| c.message.clone());
            publish(
                ctx,
                &*budget,
                EventType::Warning,
                "BudgetExhausted",
                &note,
                "Meter",
            )
            .await;
        }
    }
    let status = written
        .map(|w| w.new)
        .or_else(|| budget.status.clone())
        .unwrap_or_default();
    ctx.metrics
        .budget(&namespace, &budget.name_any(), &def, &status);
    let key_for_backoff = crate::reconciler::key(&*budget);
    if ledger_error.is_some() {
        return Ok(Action::requeue(ctx.backoff(&key_for_backoff)));
    }
    ctx.succeeded(&key_for_backoff);
    if invalid.is_some() || chain.problem.is_some() {
        return Ok(Action::await_change());
    }
    // The next period boundary, exactly (plus a moment, so the new window has begun).
    let next = window(&def, now)
        .filter(|_| def.period.calendar.is_some())
        .map(|w| w.end.duration_since(now))
        .and_then(|d| d.try_into().ok())
        .map(|d: Duration| d + Duration::from_millis(500));
    Ok(Action::requeue(next.map_or(RESYNC, |d| d.min(RESYNC))))
}
