-- The audit chain (crate soma-ledger, src/record.rs and src/audit.rs). Each sidecar numbers its
-- records and links each to the one before by hash; records delivered before this version have
-- no holder and are reported by `soma audit verify` as not chained.
ALTER TABLE usage_records
    ADD COLUMN holder TEXT,
    ADD COLUMN seq BIGINT,
    ADD COLUMN prev_hash TEXT,
    ADD COLUMN hash TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS ux_usage_records_holder_seq
    ON usage_records (holder, seq) WHERE holder IS NOT NULL;

-- Seals, written by the operator off the request path: for one Budget window, the records
-- charged to it so far (count and sums) and the head of every sidecar's chain that charged it,
-- signed with the operator's Ed25519 key and chained to the seal before.
CREATE TABLE IF NOT EXISTS ledger_seals (
    seq BIGINT PRIMARY KEY,
    sealed_at_ms BIGINT NOT NULL,
    budget TEXT NOT NULL,
    budget_uid TEXT NOT NULL,
    window_start_ms BIGINT NOT NULL,
    window_end_ms BIGINT NOT NULL,
    records BIGINT NOT NULL,
    tokens BIGINT NOT NULL,
    cost_micros BIGINT NOT NULL,
    heads JSONB NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    key_id TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_ledger_seals_budget
    ON ledger_seals (budget, budget_uid, window_start_ms, seq);

-- The public keys seals were signed with, as the operator published them. A verifier should
-- take the key from elsewhere (the operator's ConfigMap, a file): a key found only here proves
-- only that the seals are consistent with each other.
CREATE TABLE IF NOT EXISTS ledger_seal_keys (
    key_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
