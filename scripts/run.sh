#!/usr/bin/env bash
# The main job on its embedded default: builds (first run only) a tiny Qwen3-architecture model, the
# arithmetic task and an SFT warm-up in the cache (ASCEND_RL_CACHE, default ~/.cache/ascend-rl), then
# trains it with GRPO on this machine. Arguments are config overrides, e.g. trainer.seed=2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ascend-rl train "$@"
