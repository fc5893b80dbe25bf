//! What a Budget has spent, from the ledger: the delivered records of a window (from the
//! per-minute rollup), what replicas hold in flight and how often they refused (from the
//! leases), and the budget holder's report by Budget, Agent, model and day.

use serde::Serialize;
use soma_metering::BudgetRef;
use sqlx::{PgPool, Row};

/// Delivered spend of one Budget in a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Spend {
    /// Records.
    pub requests: i64,
    /// Input plus output tokens.
    pub tokens: i64,
    /// Cost in micros.
    pub micros: i64,
}

/// The spend delivered to the ledger for `budget` between `start_ms` (inclusive) and `end_ms`
/// (exclusive), both on minute boundaries (calendar periods always are; a rolling window is
/// counted by whole minutes, as the sidecars count it).
pub async fn window_spend(
    pool: &PgPool,
    budget: &BudgetRef,
    start_ms: i64,
    end_ms: i64,
) -> Result<Spend, sqlx::Error> {
    let row = sqlx::query(
        "SELECT COALESCE(SUM(requests), 0)::BIGINT, COALESCE(SUM(tokens), 0)::BIGINT,
                COALESCE(SUM(cost_micros), 0)::BIGINT
           FROM budget_spend_minute
          WHERE budget = $1 AND budget_uid = $2
            AND minute >= to_timestamp($3 / 1000.0) AND minute < to_timestamp($4 / 1000.0)",
    )
    .bind(budget.key.to_string())
    .bind(&budget.uid)
    .bind(start_ms)
    .bind(end_ms)
    .fetch_one(pool)
    .await?;
    Ok(Spend {
        requests: row.get(0),
        tokens: row.get(1),
        micros: row.get(2),
    })
}

/// What the replicas sharing a Budget window reported at their last heartbeats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Leases {
    /// Replicas whose lease has not expired.
    pub live: i64,
    /// Reserved by in-flight requests (live leases only), tokens.
    pub reserved_tokens: i64,
    /// Reserved by in-flight requests (live leases only), micros.
    pub reserved_micros: i64,
    /// Settled plus reserved across every lease of the window: what the authority counts.
    pub used_tokens: i64,
    /// The same in micros.
    pub used_micros: i64,
    /// Requests refused in the window, across replicas.
    pub refusals: i64,
    /// Requests sent to the brown-out model in the window, across replicas.
    pub brownouts: i64,
}

/// The leases of `budget`'s window starting at `window_start_ms`.
pub async fn leases(
    pool: &PgPool,
    budget: &BudgetRef,
    window_start_ms: i64,
) -> Result<Leases, sqlx::Error> {
    let row = sqlx::query(
        "SELECT COUNT(*) FILTER (WHERE expires_at >= now()),
                COALESCE(SUM(reserved_tokens) FILTER (WHERE expires_at >= now()), 0)::BIGINT,
                COALESCE(SUM(reserved_micros) FILTER (WHERE expires_at >= now()), 0)::BIGINT,
                COALESCE(SUM(used_tokens), 0)::BIGINT, COALESCE(SUM(used_micros), 0)::BIGINT,
                COALESCE(SUM(refusals), 0)::BIGINT, COALESCE(SUM(brownouts), 0)::BIGINT
           FROM budget_leases
          WHERE budget = $1 AND budget_uid = $2 AND window_start_ms = $3",
    )
    .bind(budget.key.to_string())
    .bind(&budget.uid)
    .bind(window_start_ms)
    .fetch_one(pool)
    .await?;
    Ok(Leases {
        live: row.get(0),
        reserved_tokens: row.get(1),
        reserved_micros: row.get(2),
        used_tokens: row.get(3),
        used_micros: row.get(4),
        refusals: row.get(5),
        brownouts: row.get(6),
    })
}

/// What one run of a Job used: its records (agent `job/<name>`), and how many of its calls the
/// sidecar refused because a Budget was used up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunSpend {
    /// Records (model calls).
    pub requests: i64,
    /// Prompt tokens.
    pub input_tokens: i64,
    /// Generated tokens.
    pub output_tokens: i64,
    /// Cost in micros.
    pub cost_micros: i64,
    /// Calls refused for a used-up Budget, as the sidecars last reported them.
    pub refusals: i64,
}

/// The records of agent `agent` in `namespace` that started at or after `since_ms`, and the
/// refusals its sidecars reported in leases alive since then (per sidecar and window, the
/// largest count of any Budget of its chain, so a refusal is counted once).
pub async fn run_spend(
    pool: &PgPool,
    namespace: &str,
    agent: &str,
    since_ms: i64,
) -> Result<RunSpend, sqlx::Error> {
    let row = sqlx::query(
        "SELECT COUNT(*)::BIGINT, COALESCE(SUM(input_tokens), 0)::BIGINT,
                COALESCE(SUM(output_tokens), 0)::BIGINT, COALESCE(SUM(cost_micros), 0)::BIGINT
           FROM usage_records
          WHERE namespace = $1 AND agent = $2 AND started_at >= to_timestamp($3 / 1000.0)",
    )
    .bind(namespace)
    .bind(agent)
    .bind(since_ms)
    .fetch_one(pool)
    .await?;
    let refusals: i64 = sqlx::query_scalar(
        "SELECT COALESCE(SUM(most), 0)::BIGINT FROM (
             SELECT MAX(refusals) AS most FROM budget_leases
              WHERE namespace = $1 AND agent = $2 AND expires_at >= to_timestamp($3 / 1000.0)
              GROUP BY holder, window_start_ms) per_sidecar",
    )
    .bind(namespace)
    .bind(agent)
    .bind(since_ms)
    .fetch_one(pool)
    .await?;
    Ok(RunSpend {
        requests: row.get(0),
        input_tokens: row.get(1),
        output_tokens: row.get(2),
        cost_micros: row.get(3),
        refusals,
    })
}

/// Which records a report covers.
#[derive(Clone, Debug, Default)]
pub struct ReportFilter {
    /// Only Budgets in this namespace.
    pub namespace: Option<String>,
    /// Only this Budget (`namespace/name`).
    pub budget: Option<String>,
    /// From (Unix ms, inclusive).
    pub from_ms: i64,
    /// To (Unix ms, exclusive).
    pub to_ms: i64,
    /// The zone days are counted in (IANA name).
    pub time_zone: String,
}

/// One line of `soma budget report`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportRow {
    /// `namespace/name` of the Budget charged.
    pub budget: String,
    /// The Budget's uid (empty where not known).
    pub budget_uid: String,
    /// The Agent's namespace.
    pub namespace: String,
    /// The Agent.
    pub agent: String,
    /// The model.
    pub model: String,
    /// The day (`YYYY-MM-DD` in the report's zone).
    pub day: String,
    /// Requests.
    pub requests: i64,
    /// All prompt tokens.
    pub input_tokens: i64,
    /// Prompt tokens read from the cache.
    pub cached_input_tokens: i64,
    /// Generated tokens.
    pub output_tokens: i64,
    /// Cost in micros.
    pub cost_micros: i64,
    /// Records whose usage is the sidecar's estimate.
    pub estimated: i64,
}

/// Spend by Budget, Agent, model and day. A request charged to a chain counts once under each
/// Budget of the chain (a team Budget and its tenant both show it).
pub async fn report(pool: &PgPool, f: &ReportFilter) -> Result<Vec<ReportRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT split_part(b, '@', 1) AS budget, split_part(b, '@', 2) AS budget_uid,
                r.namespace, r.agent, r.model,
                to_char(date_trunc('day', r.started_at AT TIME ZONE $5), 'YYYY-MM-DD') AS day,
                COUNT(*)::BIGINT, SUM(r.input_tokens)::BIGINT, SUM(r.cached_input_tokens)::BIGINT,
                SUM(r.output_tokens)::BIGINT, SUM(r.cost_micros)::BIGINT,
                COUNT(*) FILTER (WHERE r.estimated)::BIGINT
           FROM usage_records r, unnest(string_to_array(r.budgets, ',')) AS b
          WHERE b <> ''
            AND r.started_at >= to_timestamp($1 / 1000.0) AND r.started_at < to_timestamp($2 / 1000.0)
            AND ($3::text IS NULL OR split_part(split_part(b, '@', 1), '/', 1) = $3)
            AND ($4::text IS NULL OR split_part(b, '@', 1) = $4)
          GROUP BY 1, 2, 3, 4, 5, 6
          ORDER BY 1, 2, 6, 3, 4, 5",
    )
    .bind(f.from_ms)
    .bind(f.to_ms)
    .bind(f.namespace.as_deref())
    .bind(f.budget.as_deref())
    .bind(&f.time_zone)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ReportRow {
            budget: r.get(0),
            budget_uid: r.get(1),
            namespace: r.get(2),
            agent: r.get(3),
            model: r.get(4),
            day: r.get(5),
            requests: r.get(6),
            input_tokens: r.get(7),
            cached_input_tokens: r.get(8),
            output_tokens: r.get(9),
            cost_micros: r.get(10),
            estimated: r.get(11),
        })
        .collect())
}
