//! The cluster budget authority's SQL: leasing slices of a Budget window to a replica and
//! taking back what it did not use (tables `budget_windows` and `budget_leases`, migration
//! `0002_budget_leases.sql`).
//!
//! Every change to a window's `granted` happens in a transaction that first locks the window's
//! row (the upsert below), so the check "granted + slice ≤ cap" and the update cannot
//! interleave with another replica's. A chain (Budget and its `parentRef` ancestors) is leased
//! in one transaction, rows locked in name order (no deadlock between replicas whose chains
//! share a parent): every Budget grants or none does.
//!
//! ```text
//!  lock window ─► cut long-expired leases back to `used` ─► my lease: overshoot? ─► need ≤ cap − granted?
//!        └── yes: granted += slice (≥ need, shrinking as the window fills); lease += slice
//!        └── no:  roll back, refuse naming the Budget
//! ```

use std::time::Duration;

use soma_metering::{Amount, BudgetRef};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};

/// Who holds leases and on what terms.
#[derive(Clone, Debug)]
pub struct Terms {
    /// This replica's stable name (kept in its outbox).
    pub holder: String,
    /// The Agent's namespace (shown on its lease rows).
    pub namespace: String,
    /// The Agent (shown on its lease rows).
    pub agent: String,
    /// A lease lives this long after each renewal; the holder stops using it once that time
    /// has passed since the renewal started.
    pub ttl: Duration,
    /// An expired lease is cut back to what its holder last reported only once it has been
    /// expired this long.
    pub reclaim_after: Duration,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// One Budget's part of a lease request or report.
#[derive(Clone, Debug)]
pub struct Ask {
    /// The Budget (key and uid: a recreated Budget has windows of its own).
    pub budget: BudgetRef,
    /// Its window, Unix milliseconds.
    pub window_start_ms: i64,
    /// The window's end (when the caps reset).
    pub window_end_ms: i64,
    /// `limits.tokens`.
    pub cap_tokens: Option<u64>,
    /// `limits.costMicros`.
    pub cap_micros: Option<u64>,
    /// This replica's settled plus reserved spend in the window.
    pub used: Amount,
    /// The part of `used` still reserved by requests in flight.
    pub reserved: Amount,
    /// What the request waiting for the lease needs on top of `used`.
    pub want: Amount,
    /// Requests this replica refused in the window (this Budget refusing).
    pub refusals: u64,
    /// Requests this replica browned out in the window.
    pub brownouts: u64,
}

/// What a Budget granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The Budget.
    pub budget: BudgetRef,
    /// The window the grant is for.
    pub window_start_ms: i64,
    /// This replica's whole lease for the window (what it may reach in `used`).
    pub lease: Amount,
    /// Replicas holding a live lease on the window, this one included.
    pub live: u64,
}

/// A Budget that could not grant what was needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortfall {
    /// The Budget.
    pub budget: BudgetRef,
    /// True for `limits.costMicros`, false for `limits.tokens`.
    pub micros: bool,
    /// The cap.
    pub cap: u64,
    /// What the request needed (more than `remaining`).
    pub need: u64,
    /// What is left for this replica: the window's ungranted rest plus its own unused lease.
    pub remaining: u64,
    /// The window's end.
    pub window_end_ms: i64,
}

/// A pool for the authority, created without connecting. Connecting is bounded (2 s) so that
/// a request waiting for a lease while PostgreSQL is down fails closed quickly.
pub fn pool(url: &str) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy(url)
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn amount(row: &sqlx::postgres::PgRow, tokens: &str, micros: &str) -> Amount {
    Amount {
        tokens: u(row.get(tokens)),
        micros: u(row.get(micros)),
    }
}

/// A window as locked: what is granted of it, and its caps.
struct Locked {
    granted: Amount,
    cap_tokens: Option<u64>,
    cap_micros: Option<u64>,
}

/// Locks the window row (creating it, and keeping its caps current) and cuts other replicas'
/// expired leases back to what they used. The caps are the operator's live definition of the
/// Budget (`soma_budgets`) when it has one for this incarnation, else the asker's: a replica
/// that has not yet heard of a lowered cap is still granted no more than it allows.
async fn lock_window(
    tx: &mut Transaction<'_, Postgres>,
    a: &Ask,
    terms: &Terms,
) -> Result<Locked, sqlx::Error> {
    let row = sqlx::query(
        "WITH live AS (
            SELECT (definition->'limits'->>'tokens')::BIGINT AS t,
                   (definition->'limits'->>'costMicros')::BIGINT AS m
              FROM soma_budgets
             WHERE namespace = split_part($1, '/', 1) AND name = split_part($1, '/', 2)
               AND uid = $2)
         INSERT INTO budget_windows AS w (budget, budget_uid, window_start_ms, window_end_ms,
                                          cap_tokens, cap_micros)
         VALUES ($1, $2, $3, $4,
                 CASE WHEN EXISTS (SELECT 1 FROM live) THEN (SELECT t FROM live) ELSE $5 END,
                 CASE WHEN EXISTS (SELECT 1 FROM live) THEN (SELECT m FROM live) ELSE $6 END)
         ON CONFLICT (budget, budget_uid, window_start_ms) DO UPDATE
            SET cap_tokens = EXCLUDED.cap_tokens, cap_micros = EXCLUDED.cap_micros
         RETURNING granted_tokens, granted_micros, cap_tokens, cap_micros",
    )
    .bind(a.budget.key.to_string())
    .bind(&a.budget.uid)
    .bind(a.window_start_ms)
    .bind(a.window_end_ms)
    .bind(a.cap_tokens.map(i))
    .bind(a.cap_micros.map(i))
    .fetch_one(&mut **tx)
    .await?;
    let mut granted = amount(&row, "granted_tokens", "granted_micros");
    let cap = |c: &str| row.get::<Option<i64>, _>(c).map(u);
    let (cap_tokens, cap_micros) = (cap("cap_tokens"), cap("cap_micros"));
    let reclaimed = sqlx::query(
        "WITH old AS (
            SELECT holder, granted_tokens - LEAST(granted_tokens, used_tokens) AS t,
                   granted_micros - LEAST(granted_micros, used_micros) AS m
            FROM budget_leases
            WHERE budget = $1 AND budget_uid = $2 AND window_start_ms = $3 AND holder <> $4
              AND expires_at < now() - $5 * interval '1 millisecond'
              AND (granted_tokens > used_tokens OR granted_micros > used_micros)
         ), upd AS (
            UPDATE budget_leases l
               SET granted_tokens = LEAST(l.granted_tokens, l.used_tokens),
                   granted_micros = LEAST(l.granted_micros, l.used_micros)
              FROM old
             WHERE l.budget = $1 AND l.budget_uid = $2 AND l.window_start_ms = $3
               AND l.holder = old.holder
         )
         SELECT COALESCE(SUM(t), 0)::BIGINT AS t, COALESCE(SUM(m), 0)::BIGINT AS m FROM old",
    )
    .bind(a.budget.key.to_string())
    .bind(&a.budget.uid)
    .bind(a.window_start_ms)
    .bind(&terms.holder)
    .bind(ms(terms.reclaim_after))
    .fetch_one(&mut **tx)
    .await?;
    let r = amount(&reclaimed, "t", "m");
    if r != Amount::default() {
        granted.tokens = granted.tokens.saturating_sub(r.tokens);
        granted.micros = granted.micros.saturating_sub(r.micros);
        tracing::info!(budget = %a.budget.key, tokens = r.tokens, micros = r.micros, "reclaimed expired leases");
    }
    Ok(Locked {
        granted,
        cap_tokens,
        cap_micros,
    })
}

async fn my_lease(
    tx: &mut Transaction<'_, Postgres>,
    a: &Ask,
    holder: &str,
) -> Result<Amount, sqlx::Error> {
    let row = sqlx::query(
        "SELECT granted_tokens, granted_micros FROM budget_leases
         WHERE budget = $1 AND budget_uid = $2 AND window_start_ms = $3 AND holder = $4",
    )
    .bind(a.budget.key.to_string())
    .bind(&a.budget.uid)
    .bind(a.window_start_ms)
    .bind(holder)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map_or(Amount::default(), |r| {
        amount(&r, "granted_tokens", "granted_micros")
    }))
}

/// Writes the window's new total and this replica's lease; returns the live lease count.
async fn write(
    tx: &mut Transaction<'_, Postgres>,
    a: &Ask,
    terms: &Terms,
    granted: Amount,
    lease: Amount,
) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "UPDATE budget_windows SET granted_tokens = $4, granted_micros = $5
         WHERE budget = $1 AND budget_uid = $2 AND window_start_ms = $3",
    )
    .bind(a.budget.key.to_string())
    .bind(&a.budget.uid)
    .bind(a.window_start_ms)
    .bind(i(granted.tokens))
    .bind(i(granted.micros))
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO budget_leases (budget, budget_uid, window_start_ms, holder, granted_tokens,
            granted_micros, used_tokens, used_micros, expires_at, reserved_tokens,
            reserved_micros, refusals, brownouts, namespace, agent)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now() + $9 * interval '1 millisecond', $10, $11,
                 $12, $13, $14, $15)
         ON CONFLICT (budget, budget_uid, window_start_ms, holder) DO UPDATE SET
            granted_tokens = EXCLUDED.granted_tokens, granted_micros = EXCLUDED.granted_micros,
            used_tokens = EXCLUDED.used_tokens, used_micros = EXCLUDED.used_micros,
            expires_at = EXCLUDED.expires_at, reserved_tokens = EXCLUDED.reserved_tokens,
            reserved_micros = EXCLUDED.reserved_micros,
            refusals = GREATEST(budget_leases.refusals, EXCLUDED.refusals),
            brownouts = GREATEST(budget_leases.brownouts, EXCLUDED.brownouts),
            namespace = EXCLUDED.namespace, agent = EXCLUDED.agent",
    )
    .bind(a.budget.key.to_string())
    .bind(&a.budget.uid)
    .bind(a.window_start_ms)
    .bind(&terms.holder)
    .bind(i(lease.tokens))
    .bind(i(lease.micros))
    // A top-up's request reserves `want` as soon as the grant arrives: it is recorded as used
    // already, so a reclaim of this lease can never take it back.
    .bind(i(a.used.tokens.saturating_add(a.want.tokens)))
    .bind(i(a.used.micros.saturating_add(a.want.micros)))
    .bind(ms(terms.ttl))
    // What was in flight before this request: it settles within moments, and counting it
    // here would count it twice once it is delivered.
    .bind(i(a.reserved.tokens))
    .bind(i(a.reserved.micros))
    .bind(i(a.refusals))
    .bind(i(a.brownouts))
    .bind(&terms.namespace)
    .bind(&terms.agent)
    .execute(&mut **tx)
    .await?;
    let live: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM budget_leases
         WHERE budget = $1 AND budget_uid = $2 AND window_start_ms = $3 AND expires_at >= now()",
    )
    .bind(a.budget.key.to_string())
    .bind(&a.budget.uid)
    .bind(a.window_start_ms)
    .fetch_one(&mut **tx)
    .await?;
    Ok(u(live).max(1))
}

/// The slice to grant on one cap: at least `need`, otherwise a share of what is left that
/// shrinks with it (`left / (4 × live replicas)`), never more than is left. `None` when
/// `need` does not fit.
pub fn slice(cap: Option<u64>, granted: u64, need: u64, live: u64) -> Option<u64> {
    let Some(cap) = cap else {
        // No cap on this dimension: track what is used, grant nothing ahead.
        return Some(need);
    };
    let left = cap.saturating_sub(granted);
    if need > left {
        return None;
    }
    Some(need.max(left / (4 * live.max(1))).min(left))
}

/// Grows this replica's lease on every Budget of `asks` so that `used + want` fits, or on
/// none. Returns the grants, or the first Budget that could not grant.
pub async fn acquire(
    pool: &PgPool,
    terms: &Terms,
    asks: &[Ask],
) -> Result<Result<Vec<Grant>, Shortfall>, sqlx::Error> {
    let mut sorted: Vec<&Ask> = asks.iter().collect();
    sorted.sort_by(|a, b| a.budget.cmp(&b.budget));
    let mut tx = pool.begin().await?;
    let mut grants = Vec::with_capacity(sorted.len());
    for a in sorted {
        let locked = lock_window(&mut tx, a, terms).await?;
        let mut granted = locked.granted;
        let mut lease = my_lease(&mut tx, a, &terms.holder).await?;
        // Spend beyond the lease (a provider that returned more than the worst case, or a
        // restart whose outbox holds more than a reclaimed lease kept) is counted as it is:
        // it happened.
        let over = Amount {
            tokens: a.used.tokens.saturating_sub(lease.tokens),
            micros: a.used.micros.saturating_sub(lease.micros),
        };
        granted.tokens = granted.tokens.saturating_add(over.tokens);
        granted.micros = granted.micros.saturating_add(over.micros);
        lease.tokens += over.tokens;
        lease.micros += over.micros;
        let need = Amount {
            tokens: (a.used.tokens + a.want.tokens).saturating_sub(lease.tokens),
            micros: (a.used.micros + a.want.micros).saturating_sub(lease.micros),
        };
        let live: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM budget_leases
             WHERE budget = $1 AND budget_uid = $2 AND window_start_ms = $3
               AND expires_at >= now() AND holder <> $4",
        )
        .bind(a.budget.key.to_string())
        .bind(&a.budget.uid)
        .bind(a.window_start_ms)
        .bind(&terms.holder)
        .fetch_one(&mut *tx)
        .await?;
        let live = u(live) + 1;
        let unused = |l: u64, used: u64| l.saturating_sub(used);
        let tokens = slice(locked.cap_tokens, granted.tokens, need.tokens, live);
        let micros = slice(locked.cap_micros, granted.micros, need.micros, live);
        let (Some(t), Some(m)) = (tokens, micros) else {
            let micros_short = micros.is_none();
            let (cap, g, n, l, used) = if micros_short {
                (
                    locked.cap_micros,
                    granted.micros,
                    a.want.micros,
                    lease.micros,
                    a.used.micros,
                )
            } else {
                (
                    locked.cap_tokens,
                    granted.tokens,
                    a.want.tokens,
                    lease.tokens,
                    a.used.tokens,
                )
            };
            let cap = cap.unwrap_or(u64::MAX);
            // The transaction is dropped unfinished: rolled back, nothing granted anywhere.
            return Ok(Err(Shortfall {
                budget: a.budget.clone(),
                micros: micros_short,
                cap,
                need: n,
                remaining: cap.saturating_sub(g) + unused(l, used),
                window_end_ms: a.window_end_ms,
            }));
        };
        granted.tokens += t;
        granted.micros += m;
        lease.tokens += t;
        lease.micros += m;
        let live = write(&mut tx, a, terms, granted, lease).await?;
        grants.push(Grant {
            budget: a.budget.clone(),
            window_start_ms: a.window_start_ms,
            lease,
            live,
        });
    }
    tx.commit().await?;
    Ok(Ok(grants))
}

/// Reports `used` for each Budget and renews the lease; with `give_back`, also cuts the lease
/// to `used` and returns the rest to the window (idle and shutdown). Returns the new leases.
pub async fn report(
    pool: &PgPool,
    terms: &Terms,
    reports: &[Ask],
    give_back: bool,
) -> Result<Vec<Grant>, sqlx::Error> {
    let mut sorted: Vec<&Ask> = reports.iter().collect();
    sorted.sort_by(|a, b| a.budget.cmp(&b.budget));
    let mut tx = pool.begin().await?;
    let mut grants = Vec::with_capacity(sorted.len());
    for a in sorted {
        let mut granted = lock_window(&mut tx, a, terms).await?.granted;
        let mut lease = my_lease(&mut tx, a, &terms.holder).await?;
        for (g, l, used) in [
            (&mut granted.tokens, &mut lease.tokens, a.used.tokens),
            (&mut granted.micros, &mut lease.micros, a.used.micros),
        ] {
            if used > *l {
                *g = g.saturating_add(used - *l);
                *l = used;
            } else if give_back {
                *g = g.saturating_sub(*l - used);
                *l = used;
            }
        }
        let live = write(&mut tx, a, terms, granted, lease).await?;
        grants.push(Grant {
            budget: a.budget.clone(),
            window_start_ms: a.window_start_ms,
            lease,
            live,
        });
    }
    // What was reported (reservations, refusals) changes the Budgets' status: wake the
    // operator's refresh, as a delivery does. Sent at commit.
    let labels: Vec<String> = reports.iter().map(|a| a.budget.label()).collect();
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(soma_ledger::deliver::USAGE_CHANNEL)
        .bind(labels.join(","))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(grants)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_need_shrink_with_what_is_left_and_never_pass_the_cap() {
        // 1000 left, 3 replicas: a twelfth of what is left.
        assert_eq!(slice(Some(1_000), 0, 10, 3), Some(83));
        // Near exhaustion the slice is the need itself.
        assert_eq!(slice(Some(1_000), 990, 5, 3), Some(5));
        assert_eq!(slice(Some(1_000), 990, 10, 3), Some(10));
        assert_eq!(slice(Some(1_000), 990, 11, 3), None);
        // No cap: only the need is tracked.
        assert_eq!(slice(None, 5, 7, 3), Some(7));
        for granted in (0..=1_000).step_by(7) {
            for need in (0..=1_000).step_by(13) {
                if let Some(s) = slice(Some(1_000), granted, need, 2) {
                    assert!(granted + s <= 1_000 && s >= need);
                }
            }
        }
    }
}
