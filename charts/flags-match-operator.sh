#!/usr/bin/env bash
# Every flag the chart passes to the operator exists in `soma-operator run --help`, in both
# RBAC modes and with the optional values set, so a chart and a binary cannot drift apart.
# Usage: charts/flags-match-operator.sh PATH-TO-soma-operator
set -euo pipefail
bin=$1
cd "$(dirname "${BASH_SOURCE[0]}")"
help=$("$bin" run --help)
failed=0
for values in "" "--set watchNamespaces={a,b} --set leaderElection.enabled=false --set replicas=1" \
    "-f tests/values/everything.yaml"; do
    # shellcheck disable=SC2086
    # The operator container's flags (the verify-images init container runs `soma`, not the operator).
    flags=$(helm template soma soma -n soma-system $values | "${SOMA_CACHE:-$HOME/.cache/soma}/venv/bin/python" -c '
import re, sys, yaml
for d in yaml.safe_load_all(sys.stdin):
    if d and d.get("kind") == "Deployment" and d["metadata"]["name"].endswith("-operator"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            if c["name"] == "operator":
                print("\n".join(sorted({m.group(0) for a in c["args"] if (m := re.match(r"--[a-z-]+", a))})))
')
    [[ -n $flags ]] || { echo "no flags rendered (${values:-defaults})"; exit 1; }
    for flag in $flags; do
        if ! grep -qE -- "(^|\s)$flag(\s|$)" <<<"$help"; then
            echo "chart passes $flag (${values:-defaults}) but soma-operator run has no such flag"
            failed=1
        fi
    done
done

# The price table the chart renders is one the operator reads: render an Agent with it.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
helm template soma soma -n soma-system -f tests/values/everything.yaml --show-only templates/settings.yaml |
    "${SOMA_CACHE:-$HOME/.cache/soma}/venv/bin/python" -c \
        'import sys, yaml; print(next(d for d in yaml.safe_load_all(sys.stdin) if d and "prices.yaml" in d.get("data", {}))["data"]["prices.yaml"])' >"$tmp/prices.yaml"
# Rendered whole first: under pipefail, `render | grep -q` fails whenever grep stops reading early.
rendered=$("$bin" render -f ../examples/agent.yaml --prices-file "$tmp/prices.yaml")
if ! grep -q '"outputPerMTok": 10000000' <<<"$rendered"; then
    echo "the chart's prices.yaml was not handed to the sidecar by soma-operator render"
    failed=1
fi
[[ $failed -eq 0 ]] && echo "every chart flag is an operator flag; the chart's price table reaches the sidecar"
exit $failed
