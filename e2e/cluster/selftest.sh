#!/usr/bin/env bash
# Offline self-test of e2e/cluster/checks.py against fixtures/ (no cluster needed):
# each check must accept its good fixture and reject its bad one.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
checks=$here/checks.py
fx=$here/fixtures
passed=0
failed=0
expect() { # expect pass|fail NAME FIXTURE CHECK [ARG...]
    local want=$1 name=$2 fixture=$3
    shift 3
    if "$checks" "$@" <"$fx/$fixture" >/dev/null 2>&1; then got=pass; else got=fail; fi
    if [[ $got == "$want" ]]; then
        passed=$((passed + 1)); echo "ok   $name"
    else
        failed=$((failed + 1)); echo "FAIL $name (check ${got}ed, want $want)"
    fi
}
expect pass "sandboxed accepts a hardened pod" deployment-sandboxed.json sandboxed
expect fail "sandboxed rejects a privileged pod with a token" deployment-unsandboxed.json sandboxed
expect pass "egress-restricted accepts a default-deny egress policy" networkpolicy-deny-egress.json egress-restricted
expect fail "egress-restricted rejects an ingress-only, select-all policy" networkpolicy-open.json egress-restricted
expect pass "controlled-by accepts children owned by the Agent" children.json controlled-by u-1
expect fail "controlled-by rejects another owner" children.json controlled-by u-2
expect pass "without-budget copies an Agent" agent.json without-budget e2e-no-budget
expect pass "sandboxed accepts a Job's hardened pod" job-sandboxed.json sandboxed
expect pass "controlled-by accepts a batch/v1 Job owned by its Job" job-sandboxed.json controlled-by j-1 Job
expect fail "controlled-by rejects a Job's child checked against an Agent" job-sandboxed.json controlled-by j-1
expect pass "job-waits accepts a Pending Job that says why" sjob-pending.json job-waits CapsuleNotReady
expect fail "job-waits rejects another reason" sjob-pending.json job-waits BudgetExhausted
expect fail "job-waits rejects a finished Job" sjob-deadline.json job-waits DeadlineExceeded
expect pass "job-failed accepts a Job stopped at its deadline" sjob-deadline.json job-failed DeadlineExceeded
expect fail "job-failed rejects a waiting Job" sjob-pending.json job-failed DeadlineExceeded
expect fail "drill-state rejects a Pending drill for another reason" sjob-pending.json drill-state
expect fail "drill-state rejects a Succeeded drill whose report failed" sjob-drill-lying.json drill-state
expect pass "vault-login-sidecar-only accepts a token mounted by the sidecar alone" deployment-vault.json vault-login-sidecar-only
expect fail "vault-login-sidecar-only rejects a token the agent container mounts" deployment-vault-leaky.json vault-login-sidecar-only
expect fail "vault-login-sidecar-only rejects a pod without Vault login material" deployment-sandboxed.json vault-login-sidecar-only
expect pass "readyz accepts a ready sidecar" readyz-ready.json readyz
expect fail "readyz rejects a refused login when ready is wanted" readyz-login-failed.json readyz
expect pass "readyz accepts the reason it is told" readyz-login-failed.json readyz VaultLoginFailed
expect fail "readyz rejects another reason" readyz-login-failed.json readyz VaultPathNotFound
d=sha256:$(printf 'a%.0s' {1..64})
expect pass "recall-hit accepts a best hit with the whole provenance" recall-hit.json recall-hit e2e-qdrant-kb "$d" refunds.md#0
expect fail "recall-hit rejects another best chunk" recall-hit.json recall-hit e2e-qdrant-kb "$d" shipping.md#0
expect fail "recall-hit rejects hits of another digest" recall-hit.json recall-hit e2e-qdrant-kb "sha256:$(printf 'b%.0s' {1..64})" refunds.md#0
expect fail "recall-hit rejects a hit without version, document and offsets" recall-hit-no-provenance.json recall-hit e2e-qdrant-kb "$d" refunds.md#0
expect pass "recall-refused accepts 410 capsule_revoked" recall-revoked.json recall-refused 410 capsule_revoked
expect fail "recall-refused rejects another status" recall-revoked.json recall-refused 409 capsule_revoked
expect fail "recall-refused rejects an answer" recall-hit.json recall-refused 410 capsule_revoked
expect pass "qdrant-loaded accepts a loaded collection of the verified digest" capsule-qdrant-loaded.json qdrant-loaded "soma_ns_sha256_${d#sha256:}"
expect fail "qdrant-loaded rejects another collection" capsule-qdrant-loaded.json qdrant-loaded "soma_other_sha256_${d#sha256:}"
expect fail "qdrant-loaded rejects a collection not loaded" capsule-qdrant-unavailable.json qdrant-loaded "soma_ns_sha256_${d#sha256:}"
out=$("$checks" without-budget e2e-no-budget <"$fx/agent.json")
if python3 -c '
import json, sys
a = json.loads(sys.argv[1])
assert a["metadata"] == {"name": "e2e-no-budget", "namespace": "ns"}, a["metadata"]
assert a["spec"]["budgetRef"] == {"name": "e2e-missing-budget"}
assert "status" not in a
' "$out"; then
    passed=$((passed + 1)); echo "ok   without-budget output: fresh metadata, missing budget, no status"
else
    failed=$((failed + 1)); echo "FAIL without-budget output"
fi
echo
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
