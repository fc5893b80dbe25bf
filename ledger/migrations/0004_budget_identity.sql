-- Budget identity is namespace/name, plus the Budget's uid where spend is kept, so tenants
-- never share a window (PRODUCT.md invariant 8). Until this version a Budget was keyed by its
-- bare name, and every Budget of a chain was in the Agent's own namespace.

-- Usage records: each bare name in the chain becomes namespace/name (the record's namespace).
UPDATE usage_records
   SET budgets = (SELECT string_agg(usage_records.namespace || '/' || b, ',' ORDER BY o)
                    FROM unnest(string_to_array(usage_records.budgets, ',')) WITH ORDINALITY AS t(b, o))
 WHERE budgets <> '' AND strpos(budgets, '/') = 0;

-- Windows and leases are keyed by (namespace/name, uid, window). Rows written before the uid
-- was known get ''. A bare-named window is attributed to every namespace whose records charged
-- its Budget inside it. A window that two namespaces shared under one bare name (the
-- collision this version ends) is copied to each, keeping the combined spend: each tenant is
-- held to at least what was spent, never less, until its period rolls over. A window no record
-- can be attributed to is dropped: its replicas report their spend again at their next
-- heartbeat, and their outboxes still hold it.
ALTER TABLE budget_leases DROP CONSTRAINT IF EXISTS budget_leases_budget_window_start_ms_fkey;
ALTER TABLE budget_windows DROP CONSTRAINT IF EXISTS budget_windows_pkey;
ALTER TABLE budget_leases DROP CONSTRAINT IF EXISTS budget_leases_pkey;
ALTER TABLE budget_windows ADD COLUMN budget_uid TEXT NOT NULL DEFAULT '';
ALTER TABLE budget_leases ADD COLUMN budget_uid TEXT NOT NULL DEFAULT '';

CREATE TEMPORARY TABLE window_namespaces ON COMMIT DROP AS
SELECT DISTINCT w.budget, w.window_start_ms, r.namespace
  FROM budget_windows w
  JOIN usage_records r
    ON (r.namespace || '/' || w.budget) = ANY (string_to_array(r.budgets, ','))
   AND r.started_at >= to_timestamp(w.window_start_ms / 1000.0)
   AND r.started_at < to_timestamp(w.window_end_ms / 1000.0)
 WHERE strpos(w.budget, '/') = 0;

INSERT INTO budget_windows (budget, budget_uid, window_start_ms, window_end_ms, cap_tokens,
                            cap_micros, granted_tokens, granted_micros)
SELECT n.namespace || '/' || w.budget, '', w.window_start_ms, w.window_end_ms, w.cap_tokens,
       w.cap_micros, w.granted_tokens, w.granted_micros
  FROM budget_windows w JOIN window_namespaces n USING (budget, window_start_ms);

INSERT INTO budget_leases (budget, budget_uid, window_start_ms, holder, granted_tokens,
                           granted_micros, used_tokens, used_micros, expires_at)
SELECT n.namespace || '/' || l.budget, '', l.window_start_ms, l.holder, l.granted_tokens,
       l.granted_micros, l.used_tokens, l.used_micros, l.expires_at
  FROM budget_leases l JOIN window_namespaces n USING (budget, window_start_ms);

DELETE FROM budget_leases WHERE strpos(budget, '/') = 0;
DELETE FROM budget_windows WHERE strpos(budget, '/') = 0;

ALTER TABLE budget_windows ADD PRIMARY KEY (budget, budget_uid, window_start_ms);
ALTER TABLE budget_leases ADD PRIMARY KEY (budget, budget_uid, window_start_ms, holder);
ALTER TABLE budget_leases ADD FOREIGN KEY (budget, budget_uid, window_start_ms)
    REFERENCES budget_windows (budget, budget_uid, window_start_ms);

-- What each replica reserved (in flight) at its last report, and how many requests it refused
-- or browned out in the window: the operator reads these for Budget status and metrics.
ALTER TABLE budget_leases
    ADD COLUMN reserved_tokens BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN reserved_micros BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN refusals BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN brownouts BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN namespace TEXT NOT NULL DEFAULT '',
    ADD COLUMN agent TEXT NOT NULL DEFAULT '';

-- The live definition of every Budget, kept by the operator's Budget controller. Sidecars read
-- the rows of their chain (woken by NOTIFY soma_live), so an edit reaches running pods within
-- seconds, and the cluster authority grants against these caps when a row exists.
CREATE TABLE IF NOT EXISTS soma_budgets (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    uid TEXT NOT NULL,
    generation BIGINT NOT NULL,
    definition JSONB NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name)
);

-- Per-Budget, per-minute spend: maintained by the ledger writer in the same statement as the
-- per-request insert (like usage_minute), so a Budget's spend in any window is a short sum.
CREATE TABLE IF NOT EXISTS budget_spend_minute (
    budget TEXT NOT NULL,
    budget_uid TEXT NOT NULL,
    minute TIMESTAMPTZ NOT NULL,
    requests BIGINT NOT NULL,
    tokens BIGINT NOT NULL,
    cost_micros BIGINT NOT NULL,
    PRIMARY KEY (budget, budget_uid, minute)
);

INSERT INTO budget_spend_minute
SELECT split_part(b, '@', 1), split_part(b, '@', 2), date_trunc('minute', r.started_at),
       COUNT(*), SUM(r.input_tokens + r.output_tokens), SUM(r.cost_micros)
  FROM usage_records r, unnest(string_to_array(r.budgets, ',')) AS b
 WHERE b <> ''
 GROUP BY 1, 2, 3
ON CONFLICT DO NOTHING;
