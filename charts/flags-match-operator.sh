#!/usr/bin/env bash
# Every flag the chart passes to the operator exists in `soma-operator run --help`, in both
# RBAC modes and with the optional values set, so a chart and a binary cannot drift apart.
# Usage: charts/flags-match-operator.sh PATH-TO-soma-operator
set -euo pipefail
bin=$1
cd "$(dirname "${BASH_SOURCE[0]}")"
help=$("$bin" run --help)
failed=0
for values in "" "--set watchNamespaces={a,b} --set leaderElection.enabled=false --set replicas=1"; do
    # shellcheck disable=SC2086
    flags=$(helm template soma soma -n soma-system $values | grep -oE -- '^\s+- --[a-z-]+' | sed 's/.*- //' | sort -u)
    [[ -n $flags ]] || { echo "no flags rendered (${values:-defaults})"; exit 1; }
    for flag in $flags; do
        if ! grep -qE -- "(^|\s)$flag(\s|$)" <<<"$help"; then
            echo "chart passes $flag (${values:-defaults}) but soma-operator run has no such flag"
            failed=1
        fi
    done
done
[[ $failed -eq 0 ]] && echo "every chart flag is an operator flag"
exit $failed
