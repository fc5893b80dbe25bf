//! Reserve or brown out, then record: the call's worst case is reserved on every Budget of the
//! chain (all or none), first with the prompt's bound and, when that is refused, again with
//! the prompt counted (`request::Prompt`); when a Budget refuses and its `onExhausted` is
//! `BrownOut`, the call is rewritten to the cheaper model and reserved at that model's worst
//! case instead. What was reserved is then recorded (the journal's begin record) before
//! anything leaves.

use std::sync::Arc;

use serde_json::Value;
use soma_metering::budget::{ExhaustedAction, LimitKind};
use soma_metering::{Amount, Price};

use crate::authority::Reserve;
use crate::endpoint::Endpoint;
use crate::error::ProxyError;
use crate::outbox::OpenRecord;
use crate::request::Call;
use crate::state::{AppState, Charge, InFlight};

/// The price of `model`, or an error when a price table is set and lacks it.
pub fn price_of(state: &AppState, model: &str) -> Result<Option<Price>, ProxyError> {
    match &state.config.prices {
        None => Ok(None),
        Some(table) => table
            .get(model)
            .copied()
            .map(Some)
            .ok_or_else(|| ProxyError::UnknownModel(model.to_owned())),
    }
}

/// Reserves the call's worst case (or the brown-out model's) and records it.
pub async fn reserve(
    state: &Arc<AppState>,
    endpoint: Endpoint,
    call: &mut Call,
    permit: InFlight,
) -> Result<Charge, ProxyError> {
    let mut price = price_of(state, &call.model)?;
    let now = jiff::Timestamp::now();
    let want = Amount::worst_case(&call.worst, price.as_ref());
    let mut asked = state.authority.reserve(now, want).await;
    // Refused on the prompt's bound by a cap on size (a count of requests does not depend on
    // it): the counted prompt may fit.
    if let Reserve::Refused(refusal) = &asked
        && refusal.limit != LimitKind::RequestsPerMinute
        && call.count_prompt(state).await?
    {
        let want = Amount::worst_case(&call.worst, price.as_ref());
        asked = state.authority.reserve(now, want).await;
    }
    let reservations = match asked {
        Reserve::Taken(r) => r,
        Reserve::Undefined(why) => return Err(ProxyError::BudgetUndefined(why)),
        Reserve::Unavailable(why) => return Err(ProxyError::BudgetUnavailable(why)),
        Reserve::Refused(refusal) => {
            let cheaper = state
                .authority
                .def(&refusal.budget)
                .filter(|d| d.on_exhausted.action == ExhaustedAction::BrownOut)
                .and_then(|d| d.on_exhausted.brown_out_model)
                .filter(|m| *m != call.model);
            let browned = match cheaper {
                Some(cheaper) => {
                    let cheaper_price = price_of(state, &cheaper)?;
                    let cheaper_want = Amount::worst_case(&call.worst, cheaper_price.as_ref());
                    match state.authority.reserve(now, cheaper_want).await {
                        Reserve::Taken(r) => {
                            tracing::info!(from = %call.model, to = %cheaper, budget = %refusal.budget, "brown-out");
                            state.authority.count_refusal(&refusal.budget, true);
                            call.json["model"] = Value::String(cheaper.clone());
                            call.model = cheaper;
                            call.rewritten = true;
                            price = cheaper_price;
                            Some(r)
                        }
                        _ => None,
                    }
                }
                None => None,
            };
            match browned {
                Some(r) => r,
                None => {
                    // The Budget's refusal count means "its period cap is used up";
                    // rate-limit refusals are the sidecar's own metric (`limit` label) only.
                    if matches!(refusal.limit, LimitKind::Tokens | LimitKind::CostMicros) {
                        state.authority.count_refusal(&refusal.budget, false);
                    } else {
                        // A rate cap turned it away: demand the autoscaler must see, so that
                        // a brown-out can take the lowest priority first instead.
                        state.load.refused(call.priority, false);
                    }
                    state
                        .metrics
                        .refusal(&refusal.budget, refusal.limit.field());
                    return Err(ProxyError::Budget(refusal));
                }
            }
        }
    };
    let worst = Amount::worst_case(&call.worst, price.as_ref());
    let charge = Charge {
        id: uuid::Uuid::now_v7().to_string(),
        reservations,
        model: call.model.clone(),
        price,
        prompt: call.prompt.clone(),
        span: tracing::Span::current(),
        arrival: state.load.arrive(permit.admitted, call.priority),
        in_flight: permit,
    };
    let record = OpenRecord {
        id: charge.id.clone(),
        namespace: state.config.agent.namespace.clone(),
        agent: state.config.agent.name.clone(),
        budgets: state.authority.chain_label(),
        endpoint: endpoint.label(),
        model: call.model.clone(),
        started_at: now,
        prompt_estimate: call.prompt.reserved(),
        max_output_tokens: call.max_out,
        reserved: worst,
    };
    if let Err(e) = state.outbox.begin(&record) {
        state.authority.release(now, charge.reservations);
        return Err(ProxyError::Outbox(e));
    }
    Ok(charge)
}
