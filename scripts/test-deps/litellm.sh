#!/usr/bin/env bash
# Installs LiteLLM's proxy (the peer of bench/proxy-vs-litellm) into its own venv:
#
#   ${SOMA_CACHE:-$HOME/.cache/soma}/litellm-venv   <- litellm[proxy]==$LITELLM_VERSION
#
# Its own venv (scripts/test-deps/pinned-venv.sh) because litellm[proxy] pins dozens of
# packages (fastapi, pydantic, openai, ...) that must not move the test venv's exact pins. Idempotent: when the venv already imports the
# pinned version, nothing is installed. On Debian, python3-venv is apt-installed when venv
# support is missing (needs root). LiteLLM's database-backed features need Prisma engines that
# download at run time; the benchmark runs LiteLLM without a database (docs/benchmarks.md).
#
# Usage: scripts/test-deps/litellm.sh   then   $SOMA_CACHE/litellm-venv/bin/litellm --config ...
set -euo pipefail

LITELLM_VERSION=1.106.2

# shellcheck source=scripts/test-deps/pinned-venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/pinned-venv.sh"
pinned_venv litellm litellm "$LITELLM_VERSION" "litellm[proxy]==$LITELLM_VERSION" litellm " (a few minutes)"
