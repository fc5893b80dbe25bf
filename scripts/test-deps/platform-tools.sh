#!/usr/bin/env bash
# Installs the tools the platform-team suites run for real (docs/observability.md, docs/release.md):
#
#   prometheus, promtool -> $SOMA_CACHE/tools/platform/usr/bin/{prometheus,promtool}
#                           (Debian's `prometheus`, unpacked with `dpkg -x`: no system user, no
#                           service, none of the web console's JavaScript packages)
#   umoci                -> $SOMA_CACHE/tools/platform/usr/bin/umoci   (Debian's `umoci`, dpkg -x;
#                           it needs only libc6)
#   lua5.1               -> /usr/bin/lua5.1   (apt-get install lua5.1: Argo CD's health checks run
#                           in gopher-lua, a Lua 5.1)
#   skopeo               -> /usr/bin/skopeo   (apt-get install skopeo: it links gpgme and
#                           device-mapper, so it is installed with its dependencies)
#
# The Debian versions are pinned upstream (the revision after them may move with stable
# updates); a different candidate fails the install instead of testing with another tool.
# Idempotent: nothing is downloaded or installed when the pinned versions are already there.
# Prints `SOMA_PROMETHEUS=`, `SOMA_PROMTOOL=`, `SOMA_UMOCI=`, `SOMA_SKOPEO=` and `SOMA_LUA=`,
# one per line, for the caller to export.
# Usage: scripts/test-deps/platform-tools.sh        (SOMA_CACHE defaults to ~/.cache/soma)
set -euo pipefail

# name=upstream version
UNPACKED=(prometheus=2.42.0 umoci=0.4.7)
SYSTEM=(lua5.1=5.1.5 skopeo=1.9.3)

CACHE=${SOMA_CACHE:-$HOME/.cache/soma}
ROOT=$CACHE/tools/platform
DEBS=$CACHE/apt-platform
STAMP=$ROOT/.installed-$(printf '%s_' "${UNPACKED[@]}" | tr -c 'A-Za-z0-9._-' '_')

log() { printf 'platform-tools: %s\n' "$*" >&2; }

updated=
apt_update() {
    [[ -n $updated ]] && return
    apt-get update -qq >&2
    updated=1
}

# candidate NAME: the version apt would install now.
candidate() { apt-cache policy "$1" | awk '/Candidate:/ {print $2}'; }

# matches VERSION UPSTREAM: VERSION is UPSTREAM with a Debian revision (or +ds, +bN, ...).
matches() { [[ $1 == "$2"-* || $1 == "$2"+* ]]; }

need_root() {
    [[ $(id -u) == 0 ]] || { log "need root to $*"; exit 1; }
}

unpack() {
    if [[ -f $STAMP ]] && [[ -x $ROOT/usr/bin/prometheus && -x $ROOT/usr/bin/promtool && -x $ROOT/usr/bin/umoci ]]; then
        log "prometheus, promtool and umoci already unpacked in $ROOT"
        return
    fi
    command -v dpkg >/dev/null 2>&1 || { log "needs dpkg (Debian)"; exit 1; }
    need_root "read Debian's package lists"
    local wanted=() pkg name upstream version
    for pkg in "${UNPACKED[@]}"; do
        name=${pkg%%=*} upstream=${pkg#*=}
        version=$(candidate "$name")
        if ! matches "$version" "$upstream"; then
            apt_update
            version=$(candidate "$name")
        fi
        matches "$version" "$upstream" || { log "Debian offers $name ${version:-nothing}, not upstream $upstream"; exit 1; }
        wanted+=("$name=$version")
    done
    rm -rf "$DEBS"
    mkdir -p "$DEBS" "$ROOT"
    log "downloading ${wanted[*]}"
    (cd "$DEBS" && apt-get download -qq -o APT::Sandbox::User=root "${wanted[@]}" >&2)
    local deb
    for pkg in "${UNPACKED[@]}"; do
        name=${pkg%%=*}
        deb=$(ls "$DEBS/${name}_"*.deb | head -n 1)
        log "unpacking $(basename "$deb")"
        dpkg -x "$deb" "$ROOT"
    done
    rm -f "$ROOT"/.installed-*
    touch "$STAMP"
}

install_system() {
    local pkg name upstream have missing=()
    for pkg in "${SYSTEM[@]}"; do
        name=${pkg%%=*} upstream=${pkg#*=}
        have=$(dpkg-query -W -f='${Version}' "$name" 2>/dev/null || true)
        if [[ -n $have ]]; then
            matches "$have" "$upstream" || { log "$name $have is installed, not upstream $upstream"; exit 1; }
            continue
        fi
        missing+=("$name")
    done
    ((${#missing[@]})) || return 0
    need_root "apt-get install ${missing[*]}"
    apt_update
    local pinned=() version
    for name in "${missing[@]}"; do
        for pkg in "${SYSTEM[@]}"; do [[ ${pkg%%=*} == "$name" ]] && upstream=${pkg#*=}; done
        version=$(candidate "$name")
        matches "$version" "$upstream" || { log "Debian offers $name ${version:-nothing}, not upstream $upstream"; exit 1; }
        pinned+=("$name=$version")
    done
    log "installing ${pinned[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pinned[@]}" >&2
}

unpack
install_system
for tool in "$ROOT/usr/bin/prometheus" "$ROOT/usr/bin/promtool" "$ROOT/usr/bin/umoci" /usr/bin/lua5.1 /usr/bin/skopeo; do
    [[ -x $tool ]] || { log "$tool missing after install"; exit 1; }
done
echo "SOMA_PROMETHEUS=$ROOT/usr/bin/prometheus"
echo "SOMA_PROMTOOL=$ROOT/usr/bin/promtool"
echo "SOMA_UMOCI=$ROOT/usr/bin/umoci"
echo "SOMA_SKOPEO=/usr/bin/skopeo"
echo "SOMA_LUA=/usr/bin/lua5.1"
