//! Live configuration in the ledger, written by the operator and followed by every running
//! sidecar without a restart (one channel, `soma_live`):
//!
//! - Budget definitions: the Budget controller keeps one row per Budget in `soma_budgets`;
//!   each sidecar reads the rows of its chain, so a changed cap, threshold, action or parent
//!   reaches running pods in milliseconds. The cluster authority also grants leases against
//!   these caps.
//! - Each Agent's brown-out: the scaling loop keeps one row per Agent in `soma_agent_live`
//!   (its `revision` only grows); the Agent's sidecars read their own row.
//!
//! ```text
//!  Budget edited ─► operator: upsert soma_budgets (only if the definition changed) + NOTIFY soma_live 'ns/name'
//!  brown-out     ─► operator: upsert soma_agent_live (only a newer revision that changes it) + NOTIFY soma_live 'agent:ns/name'
//!  sidecar: LISTEN soma_live ─► read its chain's rows / its Agent's row ─► newer? ─► enforce
//!           (and every `ledgerPollMs` without a notification, in case one was missed)
//! ```

use soma_metering::{BudgetDef, BudgetKey};
use sqlx::{PgPool, Row};

/// The channel the operator notifies with `namespace/name` when a definition changes.
pub const CHANNEL: &str = "soma_live";

/// Writes `def` as the live definition of its Budget, unless the same definition is already
/// there. Returns whether it wrote (and notified).
pub async fn upsert_budget(pool: &PgPool, def: &BudgetDef) -> Result<bool, sqlx::Error> {
    let body = serde_json::to_value(def).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let written: i64 = sqlx::query_scalar(
        "WITH up AS (
            INSERT INTO soma_budgets (namespace, name, uid, generation, definition)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (namespace, name) DO UPDATE SET
                uid = EXCLUDED.uid, generation = EXCLUDED.generation,
                definition = EXCLUDED.definition, updated_at = now()
            WHERE soma_budgets.definition IS DISTINCT FROM EXCLUDED.definition
               OR soma_budgets.uid IS DISTINCT FROM EXCLUDED.uid
            RETURNING 1),
         n AS (SELECT pg_notify($6, $1 || '/' || $2) FROM up)
         SELECT COUNT(*) FROM n",
    )
    .bind(&def.namespace)
    .bind(&def.name)
    .bind(&def.uid)
    .bind(def.generation)
    .bind(body)
    .bind(CHANNEL)
    .fetch_one(pool)
    .await?;
    Ok(written > 0)
}

/// The live definitions of `keys` that exist (a Budget the operator has not written, or whose
/// row cannot be read back into a definition, is left out).
pub async fn budgets(pool: &PgPool, keys: &[BudgetKey]) -> Result<Vec<BudgetDef>, sqlx::Error> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let namespaces: Vec<&str> = keys.iter().map(|k| k.namespace.as_str()).collect();
    let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
    let rows = sqlx::query(
        "SELECT b.definition FROM soma_budgets b
           JOIN unnest($1::text[], $2::text[]) AS k(namespace, name)
             ON b.namespace = k.namespace AND b.name = k.name",
    )
    .bind(&namespaces)
    .bind(&names)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let v: serde_json::Value = r.get(0);
            match serde_json::from_value::<BudgetDef>(v) {
                Ok(def) => Some(def),
                Err(e) => {
                    tracing::warn!(error = %e, "a live Budget definition does not read; ignored");
                    None
                }
            }
        })
        .collect())
}

/// Removes the live definition of a Budget that no longer exists in the cluster (its uid
/// must match, so a Budget created again meanwhile keeps its row).
pub async fn forget_budget(pool: &PgPool, key: &BudgetKey, uid: &str) -> Result<bool, sqlx::Error> {
    let done =
        sqlx::query("DELETE FROM soma_budgets WHERE namespace = $1 AND name = $2 AND uid = $3")
            .bind(&key.namespace)
            .bind(&key.name)
            .bind(uid)
            .execute(pool)
            .await?;
    Ok(done.rows_affected() > 0)
}

/// The prefix of a `soma_live` notification about a Capsule: `capsule:<namespace>/<name>`.
pub const CAPSULE_NOTE_PREFIX: &str = "capsule:";

/// A revocation row: the Capsule (namespace, name), the digest no longer to serve, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapsuleRevocation {
    /// The Capsule's namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The digest no longer to serve.
    pub digest: String,
    /// Why, in words a user can act on.
    pub reason: String,
}

/// Records that `r.digest` of Capsule `r.namespace/r.name` must no longer be served, and
/// notifies the sidecars, unless the same row is already there. Returns whether it wrote.
pub async fn revoke_capsule(pool: &PgPool, r: &CapsuleRevocation) -> Result<bool, sqlx::Error> {
    let written: i64 = sqlx::query_scalar(
        "WITH up AS (
            INSERT INTO soma_capsule_revocations (namespace, name, digest, reason)
            VALUES ($1, $2, $3, $4)
            ON CONFLICT (namespace, name, digest) DO UPDATE SET reason = EXCLUDED.reason
            WHERE soma_capsule_revocations.reason IS DISTINCT FROM EXCLUDED.reason
            RETURNING 1),
         n AS (SELECT pg_notify($5, $6 || $1 || '/' || $2) FROM up)
         SELECT COUNT(*) FROM n",
    )
    .bind(&r.namespace)
    .bind(&r.name)
    .bind(&r.digest)
    .bind(&r.reason)
    .bind(CHANNEL)
    .bind(CAPSULE_NOTE_PREFIX)
    .fetch_one(pool)
    .await?;
    Ok(written > 0)
}

/// The prefix of a notification on [`CHANNEL`] about an Agent's live row
/// (`agent:namespace/name`); a Budget's notification is its bare `namespace/name`.
pub const AGENT_NOTE: &str = "agent:";

/// An Agent's live row: what the operator's scaling loop asks of its sidecars.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentLive {
    /// Orders the operator's decisions: only grows.
    pub revision: i64,
    /// The brown-out in force; `None` when none is.
    pub brown_out: Option<soma_contract::load::BrownOut>,
}

/// Publishes `live` as the live row of Agent `namespace/agent` and notifies its sidecars,
/// unless the row already holds a revision at least as new, or the same brown-out. Returns
/// whether it wrote. A brown-out the sidecars could not enforce is refused before any write.
pub async fn publish_agent(
    pool: &PgPool,
    namespace: &str,
    agent: &str,
    live: &AgentLive,
) -> Result<bool, sqlx::Error> {
    let body = match &live.brown_out {
        Some(b) => {
            b.validate().map_err(|e| sqlx::Error::Encode(e.into()))?;
            Some(serde_json::to_value(b).map_err(|e| sqlx::Error::Encode(Box::new(e)))?)
        }
        None => None,
    };
    let written: i64 = sqlx::query_scalar(
        "WITH up AS (
            INSERT INTO soma_agent_live (namespace, agent, revision, brown_out)
            VALUES ($1, $2, $3, $4)
            ON CONFLICT (namespace, agent) DO UPDATE SET
                revision = EXCLUDED.revision, brown_out = EXCLUDED.brown_out, updated_at = now()
            WHERE soma_agent_live.revision < EXCLUDED.revision
              AND soma_agent_live.brown_out IS DISTINCT FROM EXCLUDED.brown_out
            RETURNING 1),
         n AS (SELECT pg_notify($5, $6::text || $1 || '/' || $2) FROM up)
         SELECT COUNT(*) FROM n",
    )
    .bind(namespace)
    .bind(agent)
    .bind(live.revision)
    .bind(body)
    .bind(CHANNEL)
    .bind(AGENT_NOTE)
    .fetch_one(pool)
    .await?;
    Ok(written > 0)
}

/// Removes the revocation of `digest` (the Capsule verifies again); notifies when it removed.
pub async fn reinstate_capsule(
    pool: &PgPool,
    namespace: &str,
    name: &str,
    digest: &str,
) -> Result<bool, sqlx::Error> {
    let removed: i64 = sqlx::query_scalar(
        "WITH del AS (
            DELETE FROM soma_capsule_revocations
             WHERE namespace = $1 AND name = $2 AND digest = $3 RETURNING 1),
         n AS (SELECT pg_notify($4, $5 || $1 || '/' || $2) FROM del)
         SELECT COUNT(*) FROM n",
    )
    .bind(namespace)
    .bind(name)
    .bind(digest)
    .bind(CHANNEL)
    .bind(CAPSULE_NOTE_PREFIX)
    .fetch_one(pool)
    .await?;
    Ok(removed > 0)
}

/// The revocations in force for Capsules `(name, digest)` of `namespace`.
pub async fn capsule_revocations(
    pool: &PgPool,
    namespace: &str,
    held: &[(String, String)],
) -> Result<Vec<CapsuleRevocation>, sqlx::Error> {
    if held.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<&str> = held.iter().map(|(n, _)| n.as_str()).collect();
    let digests: Vec<&str> = held.iter().map(|(_, d)| d.as_str()).collect();
    let rows = sqlx::query(
        "SELECT r.name, r.digest, r.reason FROM soma_capsule_revocations r
           JOIN unnest($2::text[], $3::text[]) AS h(name, digest)
             ON r.name = h.name AND r.digest = h.digest
          WHERE r.namespace = $1
          ORDER BY r.name, r.digest",
    )
    .bind(namespace)
    .bind(&names)
    .bind(&digests)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| CapsuleRevocation {
            namespace: namespace.to_owned(),
            name: r.get(0),
            digest: r.get(1),
            reason: r.get(2),
        })
        .collect())
}

/// The live row of Agent `namespace/agent`, if the operator wrote one. A brown-out that does
/// not read back (or that the sidecar could not enforce) is an error, so the caller keeps
/// what it has.
pub async fn agent_live(
    pool: &PgPool,
    namespace: &str,
    agent: &str,
) -> Result<Option<AgentLive>, sqlx::Error> {
    let row: Option<(i64, Option<serde_json::Value>)> = sqlx::query_as(
        "SELECT revision, brown_out FROM soma_agent_live WHERE namespace = $1 AND agent = $2",
    )
    .bind(namespace)
    .bind(agent)
    .fetch_optional(pool)
    .await?;
    let Some((revision, body)) = row else {
        return Ok(None);
    };
    let brown_out = match body {
        None => None,
        Some(v) => {
            let b: soma_contract::load::BrownOut =
                serde_json::from_value(v).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            b.validate().map_err(|e| sqlx::Error::Decode(e.into()))?;
            Some(b)
        }
    };
    Ok(Some(AgentLive {
        revision,
        brown_out,
    }))
}

/// The Agents (`namespace`, `name`, revision) whose live row holds a brown-out in force.
pub async fn agents_browned_out(pool: &PgPool) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT namespace, agent, revision FROM soma_agent_live WHERE brown_out IS NOT NULL
          ORDER BY namespace, agent",
    )
    .fetch_all(pool)
    .await
}
