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

# shellcheck source=scripts/test-deps/pinned-venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/pinned-venv.sh"
pinned_venv wordllama wordllama "$WORDLLAMA_VERSION" "wordllama==$WORDLLAMA_VERSION" python
