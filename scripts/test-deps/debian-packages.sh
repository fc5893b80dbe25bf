#!/usr/bin/env bash
# Installs Debian packages a benchmark needs, when something they provide is missing.
# Usage: scripts/test-deps/debian-packages.sh CALLER PACKAGE...
# (the caller checks what it needs first and names itself for the messages). Debian's
# package registry is reachable here; root is needed to install.
set -euo pipefail
caller=$1
shift
[[ $# -gt 0 ]] || { echo "debian-packages: name at least one package" >&2; exit 2; }
[[ $(id -u) == 0 ]] || {
    echo "$caller: needs the Debian package(s) $*; run as root or apt-get install them" >&2
    exit 1
}
echo "$caller: installing $*" >&2
apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
