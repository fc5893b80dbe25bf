#!/usr/bin/env bash
# Installs WordLlama (the real embedding model of bench/capsule-recall) into its own venv:
#
#   ${SOMA_CACHE:-$HOME/.cache/soma}/wordllama-venv   <- wordllama==$WORDLLAMA_VERSION (PyPI)
#
# The PyPI wheel itself ships the model: wordllama/weights/l2_supercat_256.safetensors (a
# 32,000 x 256 float16 token-embedding table) and its tokenizer
# (wordllama/tokenizers/l2_supercat_tokenizer_config.json), so nothing is fetched at run time.
# MIT licence (the wheel's METADATA). Its own venv because it needs numpy>=2 and pydantic>=2,
# which must not move the test venv's pins. Idempotent: when the venv already imports the
# pinned version, nothing is installed. On Debian, python3-venv is apt-installed when venv
# support is missing (needs root).
#
# Usage: scripts/test-deps/wordllama.sh   then   $SOMA_CACHE/wordllama-venv/bin/python ...
set -euo pipefail

WORDLLAMA_VERSION=0.4.0.post1
CACHE=${SOMA_CACHE:-$HOME/.cache/soma}
VENV=$CACHE/wordllama-venv
PY=${PYTHON:-python3}

log() { printf 'wordllama-deps: %s\n' "$*" >&2; }

installed() {
    [[ -x $VENV/bin/python ]] && [[ $("$VENV/bin/python" -c \
        'import importlib.metadata as m; print(m.version("wordllama"))' 2>/dev/null) == "$WORDLLAMA_VERSION" ]]
}

if installed; then
    log "wordllama $WORDLLAMA_VERSION already installed in $VENV"
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
    log "installing wordllama==$WORDLLAMA_VERSION into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "wordllama==$WORDLLAMA_VERSION"
    installed || { log "wordllama $WORDLLAMA_VERSION did not install"; exit 1; }
fi
echo "wordllama: $VENV/bin/python ($WORDLLAMA_VERSION)"
