-- Capsules the sidecars must stop serving: written by the operator's Capsule controller when a
-- Capsule is revoked (spec.revoked) or its signature stops verifying, removed when it verifies
-- again. Sidecars read the rows of the Capsules they hold (woken by NOTIFY soma_live with
-- 'capsule:<namespace>/<name>'), so recall answers 410 within seconds, without a restart.
CREATE TABLE IF NOT EXISTS soma_capsule_revocations (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    digest TEXT NOT NULL,
    reason TEXT NOT NULL,
    revoked_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name, digest)
);
