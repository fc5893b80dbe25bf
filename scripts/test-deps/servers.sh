#!/usr/bin/env bash
# Installs the servers the sidecar's integration tests start on 127.0.0.1 (each test in its
# own temporary folder, stopped by PID): PostgreSQL 15 and nats-server (JetStream).
#
#   PostgreSQL  -> initdb/pg_ctl/postgres on PATH already (for example /usr/local/bin), or
#                  Debian's postgresql-15 (/usr/lib/postgresql/15/bin); psql from
#                  postgresql-client-15
#   nats-server -> Debian's nats-server
#
# Idempotent: nothing is installed when the binaries are already there. Prints the folder
# holding PostgreSQL's binaries and the nats-server path, one per line, as
# `SOMA_PG_BIN=...` and `SOMA_NATS_SERVER=...` for the caller to export.
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

bin=$(pg_bin)
[ -n "$bin" ] || { log "PostgreSQL binaries not found after install"; exit 1; }
echo "SOMA_PG_BIN=$bin"
echo "SOMA_NATS_SERVER=$(command -v nats-server)"
