-- Per-request usage records delivered from each sidecar's outbox. `id` is the outbox row's
-- idempotency key: a record delivered twice (a sidecar that crashed between the insert here
-- and marking its outbox row) is inserted once. Per-minute rollups (PRODUCT.md's
-- usage_ledger) are computed off the request path from this table; not built yet.
CREATE TABLE IF NOT EXISTS usage_records (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    agent TEXT NOT NULL,
    budgets TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ,
    input_tokens BIGINT NOT NULL,
    cached_input_tokens BIGINT NOT NULL,
    cache_write_input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    cost_micros BIGINT NOT NULL,
    estimated BOOLEAN NOT NULL,
    outcome TEXT,
    http_status INTEGER,
    delivered_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS ix_usage_records_agent_started
    ON usage_records (namespace, agent, started_at);
