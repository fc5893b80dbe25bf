-- The cluster budget authority (src/cluster.rs, src/lease.rs). One row per Budget per period
-- window: its caps and how much of them is granted to sidecar replicas as leases. The
-- invariant, kept by every statement running under this row's lock: granted <= cap (for each
-- cap that is set), and granted = SUM(budget_leases.granted) for the window.
CREATE TABLE IF NOT EXISTS budget_windows (
    budget TEXT NOT NULL,
    window_start_ms BIGINT NOT NULL,
    window_end_ms BIGINT NOT NULL,
    cap_tokens BIGINT,
    cap_micros BIGINT,
    granted_tokens BIGINT NOT NULL DEFAULT 0,
    granted_micros BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (budget, window_start_ms)
);

-- One replica's slice of a Budget window. `used` is what the replica last reported as settled
-- plus reserved; `granted - used` is what it may still spend without asking. A lease whose
-- `expires_at` passed (the replica stopped renewing it) is cut back to `used` and the rest
-- returned to the window.
CREATE TABLE IF NOT EXISTS budget_leases (
    budget TEXT NOT NULL,
    window_start_ms BIGINT NOT NULL,
    holder TEXT NOT NULL,
    granted_tokens BIGINT NOT NULL,
    granted_micros BIGINT NOT NULL,
    used_tokens BIGINT NOT NULL,
    used_micros BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (budget, window_start_ms, holder),
    FOREIGN KEY (budget, window_start_ms) REFERENCES budget_windows (budget, window_start_ms)
);
