#!/usr/bin/env bash
# The main job on its embedded default. Until the training loop lands (the trainer issue) this resolves
# and checks the embedded config and prints its layout; arguments are config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ascend-rl plan "$@"
