#!/usr/bin/env bash
# Installs the tools the signature tests and bench/signatures drive on 127.0.0.1, from Debian
# trixie's packages, unpacked with `dpkg -x` so nothing is installed system-wide and no service
# starts (they are static Go binaries):
#
#   cosign           -> $SOMA_CACHE/tools/signing/usr/bin/cosign            (cosign)
#   oras             -> $SOMA_CACHE/tools/signing/usr/bin/oras              (oras)
#   docker-registry  -> $SOMA_CACHE/tools/signing/usr/bin/docker-registry   (docker-registry)
#   openssl          -> the machine's openssl CLI (bookworm's `openssl`, apt-get installed if
#                       missing): the keyless tests make their stand-in Fulcio CA with it
#
# apt runs with a private sources list, state and archive folder under $SOMA_CACHE/apt-trixie,
# so the machine's own apt configuration is neither read nor changed.
# Upstream versions are pinned; the Debian revision is whatever trixie carries now (trixie
# rebuilds Go packages as binNMUs, `+bN`, and drops the old builds from its archive).
# Idempotent: nothing is downloaded when the pinned versions are already unpacked. Prints
# `SOMA_COSIGN=...`, `SOMA_ORAS=...` and `SOMA_REGISTRY=...`, one per line, for the caller to export.
# Usage: scripts/test-deps/signing-tools.sh        (SOMA_CACHE defaults to ~/.cache/soma)
set -euo pipefail

# name=upstream version (the Debian revision after it may change).
PACKAGES=(cosign=2.5.0 oras=1.2.0 docker-registry=2.8.3)

CACHE=${SOMA_CACHE:-$HOME/.cache/soma}
ROOT=$CACHE/tools/signing
APT=$CACHE/apt-trixie
STAMP=$ROOT/.installed-$(printf '%s_' "${PACKAGES[@]}" | tr -c 'A-Za-z0-9._-' '_')

log() { printf 'signing-tools: %s\n' "$*" >&2; }

install() {
    if [[ -f $STAMP && -x $ROOT/usr/bin/cosign && -x $ROOT/usr/bin/oras && -x $ROOT/usr/bin/docker-registry ]]; then
        log "cosign, oras and docker-registry already unpacked in $ROOT"
        return
    fi
    command -v apt-get >/dev/null 2>&1 || { log "needs apt-get (Debian)"; exit 1; }
    command -v dpkg >/dev/null 2>&1 || { log "needs dpkg (Debian)"; exit 1; }
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [[ -f $keyring ]] || { log "missing $keyring (apt-get install -y debian-archive-keyring)"; exit 1; }

    mkdir -p "$APT/lists/partial" "$APT/archives/partial" "$APT/cache" "$ROOT"
    echo "deb [signed-by=$keyring] http://deb.debian.org/debian trixie main" >"$APT/sources.list"
    local opts=(
        -o "Dir::Etc::sourcelist=$APT/sources.list"
        -o Dir::Etc::sourceparts=/dev/null
        -o "Dir::State::Lists=$APT/lists"
        -o "Dir::Cache::Archives=$APT/archives"
        -o Debug::NoLocking=1
        -o APT::Sandbox::User=root
    )
    log "reading Debian trixie's package lists"
    apt-get "${opts[@]}" update -qq >&2
    local wanted=() pkg name upstream candidate
    for pkg in "${PACKAGES[@]}"; do
        name=${pkg%%=*} upstream=${pkg#*=}
        candidate=$(apt-cache "${opts[@]}" -o "Dir::Cache=$APT/cache" policy "$name" |
            awk '/Candidate:/ {print $2}')
        case $candidate in
            "$upstream"-* | "$upstream"+*) wanted+=("$name=$candidate") ;;
            *) log "trixie offers $name ${candidate:-nothing}, not upstream $upstream"; exit 1 ;;
        esac
    done
    rm -f "$APT/archives/"*.deb
    log "downloading ${wanted[*]}"
    (cd "$APT/archives" && apt-get "${opts[@]}" download -qq "${wanted[@]}" >&2)
    local deb
    for pkg in "${PACKAGES[@]}"; do
        name=${pkg%%=*}
        deb=$(ls "$APT/archives/${name}_"*.deb | head -n 1)
        log "unpacking $(basename "$deb")"
        dpkg -x "$deb" "$ROOT"
    done
    touch "$STAMP"
}

install
missing=()
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || { log "need root to apt-get install ${missing[*]}"; exit 1; }
    log "installing ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
for tool in cosign oras docker-registry; do
    [[ -x $ROOT/usr/bin/$tool ]] || { log "$tool missing after install"; exit 1; }
done
echo "SOMA_COSIGN=$ROOT/usr/bin/cosign"
echo "SOMA_ORAS=$ROOT/usr/bin/oras"
echo "SOMA_REGISTRY=$ROOT/usr/bin/docker-registry"
