#!/usr/bin/env bash
# Plots a frontier CSV (soma-autoscale-sim --frontier-csv) as a PNG, installing the pinned
# matplotlib into its own venv first (idempotent: a stamp holding the requirements' hash).
#
#   ${SOMA_CACHE:-$HOME/.cache/soma}/venv-autoscaler-plot  <- requirements-plot.txt
#
# Usage: autoscaler/scripts/plot-frontier.sh FRONTIER.csv OUT.png
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
reqs=$here/requirements-plot.txt
venv=${SOMA_CACHE:-$HOME/.cache/soma}/venv-autoscaler-plot
[[ $# -eq 2 ]] || { echo "usage: $0 FRONTIER.csv OUT.png" >&2; exit 2; }

if [[ ! -x $venv/bin/python ]]; then
    python3 -m venv "$venv"
fi
want=$(sha256sum "$reqs" | cut -d' ' -f1)
stamp=$venv/.soma-plot-deps
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$reqs" >&2
    echo "$want" > "$stamp"
fi
exec "$venv/bin/python" "$here/plot_frontier.py" "$1" "$2"
