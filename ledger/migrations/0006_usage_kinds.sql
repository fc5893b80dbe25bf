-- Usage the sidecar meters beyond tokens (crate soma-ledger, src/record.rs): the one-hour part
-- of cache writes, server-tool uses billed per use, and the usage fields the sidecar saw but
-- did not meter (comma-separated paths, empty when none). Records hashed before this version
-- have all of them zero or empty and keep their hashes (the canonical form adds them only
-- when one is set).
ALTER TABLE usage_records
    ADD COLUMN IF NOT EXISTS cache_write_1h_input_tokens BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS web_search_requests BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS web_fetch_requests BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS unmetered TEXT NOT NULL DEFAULT '';
