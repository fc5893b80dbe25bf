-- The live configuration the operator's scaling loop asks of one Agent's sidecars: today the
-- brown-out (the contract's BrownOut as JSON; NULL when none is in force). One row per Agent,
-- keyed by namespace and name. `revision` only grows (the loop writes max(now in ms, last + 1)),
-- so a sidecar, or an operator that lost its leadership, never takes an older decision over a
-- newer one. Each write is followed by NOTIFY soma_live 'agent:namespace/name'.
CREATE TABLE IF NOT EXISTS soma_agent_live (
    namespace TEXT NOT NULL,
    agent TEXT NOT NULL,
    revision BIGINT NOT NULL,
    brown_out JSONB,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, agent)
);
