//! Live Budget definitions: the operator's Budget controller keeps one row per Budget in
//! `soma_budgets` and notifies `soma_live`; each sidecar listens and reads the rows of its
//! chain, so a changed cap, threshold, action or parent reaches running pods in milliseconds,
//! without a restart. The cluster authority also grants leases against these caps.
//!
//! ```text
//!  Budget edited ─► operator: upsert soma_budgets (only if the definition changed) + NOTIFY soma_live 'ns/name'
//!  sidecar: LISTEN soma_live ─► read its chain's rows ─► newer generation? ─► redefine the ledgers
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
