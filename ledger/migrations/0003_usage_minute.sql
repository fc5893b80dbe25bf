-- Per-minute rollups of usage_records (PRODUCT.md's usage_ledger), maintained by the ledger
-- writer in the same statement as the per-request insert: only rows actually inserted (not
-- redelivered duplicates) are added, so the rollup always equals the per-request sum.
CREATE TABLE IF NOT EXISTS usage_minute (
    namespace TEXT NOT NULL,
    agent TEXT NOT NULL,
    model TEXT NOT NULL,
    minute TIMESTAMPTZ NOT NULL,
    requests BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    cached_input_tokens BIGINT NOT NULL,
    cache_write_input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    cost_micros BIGINT NOT NULL,
    PRIMARY KEY (namespace, agent, model, minute)
);

-- Rows delivered before this migration are rolled up once, here.
INSERT INTO usage_minute
SELECT namespace, agent, model, date_trunc('minute', started_at), COUNT(*),
       SUM(input_tokens), SUM(cached_input_tokens), SUM(cache_write_input_tokens),
       SUM(output_tokens), SUM(reasoning_tokens), SUM(cost_micros)
FROM usage_records
GROUP BY 1, 2, 3, 4
ON CONFLICT DO NOTHING;
