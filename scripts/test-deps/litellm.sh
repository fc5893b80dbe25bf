#!/usr/bin/env bash
# Installs LiteLLM's proxy (the peer of bench/proxy-vs-litellm) into its own venv:
#
#   ${SOMA_CACHE:-$HOME/.cache/soma}/litellm-venv   <- litellm[proxy]==$LITELLM_VERSION
#
# Its own venv because litellm[proxy] pins dozens of packages (fastapi, pydantic, openai, ...)
# that must not move the test venv's exact pins. Idempotent: when the venv already imports the
# pinned version, nothing is installed. On Debian, python3-venv is apt-installed when venv
# support is missing (needs root). LiteLLM's database-backed features need Prisma engines that
# download at run time; the benchmark runs LiteLLM without a database (docs/benchmarks.md).
#
# Usage: scripts/test-deps/litellm.sh   then   $SOMA_CACHE/litellm-venv/bin/litellm --config ...
set -euo pipefail

LITELLM_VERSION=1.106.2
CACHE=${SOMA_CACHE:-$HOME/.cache/soma}
VENV=$CACHE/litellm-venv
PY=${PYTHON:-python3}

log() { printf 'litellm-deps: %s\n' "$*" >&2; }

installed() {
    [[ -x $VENV/bin/litellm ]] && [[ $("$VENV/bin/python" -c \
        'import importlib.metadata as m; print(m.version("litellm"))' 2>/dev/null) == "$LITELLM_VERSION" ]]
}

if installed; then
    log "litellm $LITELLM_VERSION already installed in $VENV"
else
    if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        log "python3 venv support missing: installing python3-venv"
        if [[ $(id -u) -ne 0 ]]; then
            log "not root: run 'apt-get install -y python3-venv' and retry"
            exit 1
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    fi
    if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        log "creating venv $VENV"
        rm -rf "$VENV"
        "$PY" -m venv "$VENV"
    fi
    log "installing litellm[proxy]==$LITELLM_VERSION into $VENV (a few minutes)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "litellm[proxy]==$LITELLM_VERSION"
    installed || { log "litellm $LITELLM_VERSION did not install"; exit 1; }
fi
echo "litellm: $VENV/bin/litellm ($LITELLM_VERSION)"
