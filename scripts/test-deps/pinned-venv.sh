# Sourced by the installers of tools that live in their own venv (litellm.sh, wordllama.sh):
# one pinned PyPI distribution in ${SOMA_CACHE:-$HOME/.cache/soma}/<name>-venv, so that its
# dependencies never move the test venv's exact pins. Idempotent: when the venv already has the
# pinned version, nothing is installed. On Debian, python3-venv is apt-installed when venv
# support is missing (needs root).
#
#   pinned_venv NAME DIST VERSION REQUIREMENT ENTRY [NOTE]
#     NAME         the venv is $CACHE/NAME-venv; log lines start "NAME-deps:"
#     DIST         the distribution whose installed version is checked
#     VERSION      the pinned version
#     REQUIREMENT  what pip installs (e.g. "litellm[proxy]==1.2.3")
#     ENTRY        the executable in the venv's bin/ that must exist (and is printed)
#     NOTE         appended to the "installing" log line (e.g. " (a few minutes)")

pinned_venv() {
    local name=$1 dist=$2 version=$3 requirement=$4 entry=$5 note=${6:-}
    local venv=${SOMA_CACHE:-$HOME/.cache/soma}/$name-venv py=${PYTHON:-python3}
    log() { printf '%s-deps: %s\n' "$name" "$*" >&2; }
    installed() {
        [[ -x $venv/bin/$entry ]] && [[ $("$venv/bin/python" -c \
            "import importlib.metadata as m; print(m.version('$dist'))" 2>/dev/null) == "$version" ]]
    }
    if installed; then
        log "$dist $version already installed in $venv"
    else
        if ! "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
            log "python3 venv support missing: installing python3-venv"
            if [[ $(id -u) -ne 0 ]]; then
                log "not root: run 'apt-get install -y python3-venv' and retry"
                return 1
            fi
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
        fi
        if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
            log "creating venv $venv"
            rm -rf "$venv"
            "$py" -m venv "$venv"
        fi
        log "installing $requirement into $venv$note"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$requirement"
        installed || { log "$dist $version did not install"; return 1; }
    fi
    echo "$name: $venv/bin/$entry ($version)"
}
