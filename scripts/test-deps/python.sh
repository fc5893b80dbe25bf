#!/usr/bin/env bash
# Installs the Python side of Soma's tests into one shared venv:
#
#   ${SOMA_CACHE:-$HOME/.cache/soma}/venv   <- scripts/test-deps/requirements.txt (exact pins)
#
# Used by e2e/apiserver (the kmock-based Kubernetes API stand-in and its tests).
# Idempotent: when the venv already holds exactly the pinned set (a stamp holding
# the requirements' hash says so), nothing is installed. Works on a fresh Debian
# bookworm (python3.11): Debian splits venv/ensurepip into python3-venv, which is
# apt-installed when missing (needs root).
#
# Usage: scripts/test-deps/python.sh   then   $SOMA_CACHE/venv/bin/python -m pytest e2e/apiserver
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REQS=$HERE/requirements.txt
CACHE=${SOMA_CACHE:-$HOME/.cache/soma}
VENV=$CACHE/venv
PY=${PYTHON:-python3}

log() { printf 'python-deps: %s\n' "$*" >&2; }

ensure_venv() {
    if [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        return
    fi
    if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        log "python3 venv support missing: installing python3-venv"
        if [[ $(id -u) -ne 0 ]]; then
            log "not root: run 'apt-get install -y python3-venv' and retry"
            exit 1
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    fi
    log "creating venv $VENV"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
}

install_reqs() {
    local want stamp
    want=$(sha256sum "$REQS" | cut -d' ' -f1)
    stamp=$VENV/.soma-python-deps
    if [[ -f $stamp && $(cat "$stamp") == "$want" ]] \
        && "$VENV/bin/python" -c 'import kmock, pytest, yaml, requests' >/dev/null 2>&1; then
        log "pinned requirements already installed in $VENV"
        return
    fi
    log "installing $(grep -c '==' "$REQS") pinned packages into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS"
    echo "$want" >"$stamp"
}

ensure_venv
install_reqs
echo "python: $VENV/bin/python ($("$VENV/bin/python" -c 'import kmock; print("kmock", kmock.__version__)'))"
