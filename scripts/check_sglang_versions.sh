#!/usr/bin/env bash
# Optional check against real SGLang releases (not part of the test suite, which never imports SGLang):
# for each version, a venv with the CPU torch, `sglang==V --no-deps` and the light packages its ServerArgs
# import needs; then the ServerArgs kwargs `plan` computes for the four Ascend recipes must construct, and
# the version's field list must equal the committed one.
#   bash scripts/check_sglang_versions.sh [VERSION ...]      (default: 0.5.23, the newest release checked)
# SGLang <= 0.5.19 also imports torchvision, which needs a build matching the CPU torch (PyTorch's CPU index).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VERSIONS=("${@:-0.5.23}")
LIGHT=(triton numpy orjson psutil pybase64 requests packaging pillow starlette msgspec pydantic pyzmq tqdm ipython aiohttp)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -c "from ascend_rl.data.tiny_model import build_tiny_model; build_tiny_model('$work/model')" >/dev/null
for script in examples/ascend/*.sh; do
  ASCEND_RL_COMMAND="plan --json" WORKSPACE_HOME="$work" PATH="$PWD/.venv/bin:$PATH" bash "$script" \
    > "$work/$(basename "$script" .sh).json"
done
status=0
for v in "${VERSIONS[@]}"; do
  venv=".venv-sglang-$v"
  if [ ! -x "$venv/bin/python" ]; then
    python3.11 -m venv "$venv"
    "$venv/bin/pip" install -q "torch==2.13.0"
    "$venv/bin/pip" install -q --no-deps "sglang==$v"
    "$venv/bin/pip" install -q "${LIGHT[@]}"
  fi
  "$venv/bin/python" scripts/sglang_fields.py check "$work/model" "$work"/*.json || status=1
done
exit $status
