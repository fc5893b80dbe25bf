#!/usr/bin/env bash
# Installs what building the workspace needs beyond Rust: pkg-config and OpenSSL's headers
# (soma-signatures links OpenSSL through the sigstore crate's native-tls crypto backend).
# Idempotent: apt-get runs only when something is missing. Used by scripts/up and scripts/test.
set -euo pipefail

missing=()
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || { echo "build-deps: need root to apt-get install ${missing[*]}" >&2; exit 1; }
    echo "build-deps: installing ${missing[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
