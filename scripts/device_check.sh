#!/usr/bin/env bash
# The GPU check (issue 21) as one prepared run, for a CUDA machine whose python3 holds torch and that reaches no
# package index: installs ascend-rl beside that torch from the wheels in .whl/ (bash scripts/device_wheels.sh
# fetches them here), then runs, each step under its own time limit, 8 minutes in all:
#   machine  the GPU, driver, CUDA, torch
#   install  the missing packages from .whl/ and ascend-rl itself (--no-deps -e .); torch is never touched
#   pytest   pytest -m cuda (tests/test_cuda.py, tests/test_cuda_megatron.py)
#   train    30 steps of the embedded default with trainer.device=cuda
#   bench    benchmarks/rollout_gpu.py: native engine vs transformers generate on a ~100 M-parameter Qwen3,
#            and the fraction of the HBM-bandwidth bound (HBM_GBPS, default 4800: an H200)
# and writes OUT_DIR/summary.md and OUT_DIR/summary.json (scripts/device_summary.py). A failed step is recorded
# with its log's tail and the next step runs. OUT_DIR also gets each step's log and bench.json.
#
#   bash scripts/device_check.sh OUT_DIR             # on the GPU machine
#   bash scripts/device_check.sh --dry-run OUT_DIR   # anywhere: every step's commands, and whether the wheel
#                                                    # list meets ascend-rl's requirements on the GPU image
#   bash scripts/device_check.sh --list-wheels       # the carried wheels, one a line
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
HBM_GBPS=${HBM_GBPS:-4800}

# What ascend-rl needs that the GPU image lacks (it has torch 2.11 + CUDA 13, transformers 5.17, numpy, pyarrow,
# safetensors, tqdm, matplotlib, tensorboard, anyio, click, h11, annotated-doc, packaging, pyyaml, sympy, ...;
# scripts/device_deps.py holds its list). All pure Python but pydantic-core and megatron-core (cp312); versions as
# the CPU venv runs them. typing-extensions only where the image's is older than pydantic's >= 4.16 (pip decides).
WHEELS=(
  hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
  tensordict==0.15.3 pyvers==0.2.3
  math-verify==0.9.0 latex2sympy2_extended==1.11.0
  pebble==5.2.3
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 opentelemetry-api==1.45.2 typing-extensions==4.16.0 uvicorn==0.54.0
  megatron-core==0.16.1
)
STEPS=(machine install pytest train bench)
declare -A BUDGET=([machine]=30 [install]=40 [pytest]=160 [train]=130 [bench]=90)  # seconds
SUMMARY_BUDGET=20
TOTAL_LIMIT=480  # 8 minutes: the steps and the summary
TRAIN_STEPS=30

usage() { echo "usage: bash scripts/device_check.sh [--dry-run] OUT_DIR | --list-wheels" >&2; exit 2; }

DRY_RUN=0 STEP=""
case "${1:-}" in
  --list-wheels) printf '%s\n' "${WHEELS[@]}"; exit 0 ;;
  --dry-run) DRY_RUN=1; shift ;;
  --step) STEP=${2:?}; shift 2 ;;  # internal: one step's body, under `timeout`
esac
[ $# -eq 1 ] || usage
if [ "$DRY_RUN" = 1 ]; then OUT=$1; else OUT=$(mkdir -p "$1" && cd "$1" && pwd); fi

run() {  # a command of a step: shown, then run unless this is a dry run
  printf '    $ %s\n' "$*"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

check() {  # a check: shown and run, in a dry run too
  printf '    $ %s\n' "$*"
  "$@"
}

# --- the steps (each runs as `bash scripts/device_check.sh --step NAME OUT_DIR` under its time limit) ---------

step_machine() {
  run "$PYTHON" scripts/device_summary.py machine "$WORK/machine.json"
}

torch_identity() {  # version and location of the installed torch: the same before and after the install
  "$PYTHON" -c 'import importlib.metadata as m; d = m.distribution("torch"); print(d.version, d.locate_file(""))'
}

step_install() {
  local simulate=() needed=()
  [ "$DRY_RUN" = 1 ] && simulate=(--simulate-machine)  # off the machine: against the GPU image's package list
  # which carried wheels this machine lacks (missing, or older than required), every requirement followed; an
  # unmet one fails the step at its end, after installing what can be (the tests then show what it costs)
  local unmet=0
  check "$PYTHON" scripts/device_deps.py check "${simulate[@]}" --wheels-dir .whl --needed "$WORK/needed.txt" \
    "${WHEELS[@]}" || unmet=1
  mapfile -t needed <"$WORK/needed.txt"
  local before
  before=$(torch_identity)
  # --no-deps throughout: pip never resolves the image's own packages (walking torch's requirements without an
  # index fails wherever the image is not exactly consistent) and so never reaches for a torch. Its dry run
  # still says what it would install, and a torch among that is refused.
  local target=()  # off the machine: as for it (CPython 3.12, x86-64), into nowhere
  [ "$DRY_RUN" = 1 ] && target=(--target "$WORK/target" --python-version 3.12 --implementation cp
                                --platform manylinux2014_x86_64 --only-binary=:all:)
  if [ ${#needed[@]} -gt 0 ]; then
    check "$PYTHON" -m pip install -q --dry-run --no-index --no-deps "${target[@]}" \
      --report "$WORK/pip-report.json" "${needed[@]}"
    check "$PYTHON" scripts/device_deps.py pip-report "$WORK/pip-report.json"
    run "$PYTHON" -m pip install -q --no-index --no-deps "${needed[@]}"
  elif [ "$DRY_RUN" = 1 ] && [ ! -d .whl ]; then
    echo "    (no .whl/ here: bash scripts/device_wheels.sh fetches it; pip's dry run skipped)"
  fi
  if ! run "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e .; then
    echo "the editable install failed (setuptools on the machine?): the next steps import ascend_rl from $ROOT"
    touch "$WORK/use-pythonpath"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  fi
  [ "$DRY_RUN" = 1 ] && return "$unmet"
  # now every requirement is met by the machine itself, and ascend-rl imports
  check "$PYTHON" scripts/device_deps.py check --wheels-dir .whl "${WHEELS[@]}" || unmet=1
  check "$PYTHON" -c "import ascend_rl.cli.main, ascend_rl.trainer.components, ascend_rl.rollout.http_server" \
    || unmet=1
  local after
  after=$(torch_identity)
  if [ "$before" != "$after" ]; then
    echo "error: torch changed during the install: $before → $after" >&2
    return 1
  fi
  echo "torch untouched: $after"
  return "$unmet"
}

step_pytest() {
  local timeout_flag=()
  # pytest-timeout ends a hanging test with a failure instead of the whole step at its limit
  "$PYTHON" -c 'import pytest_timeout' 2>/dev/null && timeout_flag=(--timeout=150)
  # only tests/test_cuda.py: other test modules import dev-only packages the GPU image lacks
  run "$PYTHON" -m pytest -m cuda tests/test_cuda.py tests/test_cuda_megatron.py -v -rA -p no:cacheprovider "${timeout_flag[@]}" \
    -o junit_family=xunit1 --junitxml="$WORK/pytest.xml"
}

step_train() {
  run "$PYTHON" -m ascend_rl train --no-progress trainer.device=cuda trainer.total_training_steps=$TRAIN_STEPS \
    trainer.save_freq=$TRAIN_STEPS trainer.default_local_dir="$WORK/embedded"
}

step_bench() {
  # its own budget a little under the step's: the model build and CUDA start-up come first
  run "$PYTHON" benchmarks/rollout_gpu.py --device cuda --size 100m --repeats 2 --hbm-gbps "$HBM_GBPS" \
    --time-budget $((BUDGET[bench] - 30)) --json "$OUT/bench.json" --markdown "$WORK/bench.md"
}

prepare_environment() {
  # no network there: never wait on the Hugging Face hub
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  export ASCEND_RL_CACHE="$WORK/cache"  # the embedded default's model and data, built fresh
  if [ -f "$WORK/use-pythonpath" ]; then export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"; fi
}

if [ -n "$STEP" ]; then
  WORK=${WORK:?}
  prepare_environment
  "step_$STEP"
  exit
fi

total=$SUMMARY_BUDGET
for name in "${STEPS[@]}"; do total=$((total + BUDGET[$name])); done
if [ "$total" -gt "$TOTAL_LIMIT" ]; then
  echo "error: the step budgets add up to $total s, over $TOTAL_LIMIT s" >&2
  exit 2
fi

if [ "$DRY_RUN" = 1 ]; then
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  echo "dry run: the steps, $total s in all (limit $TOTAL_LIMIT s); nothing is installed or written to $OUT"
  for name in "${STEPS[@]}"; do
    echo "step $name (${BUDGET[$name]} s)"
    "step_$name"
  done
  echo "step summary (${SUMMARY_BUDGET} s)"
  echo "    \$ $PYTHON scripts/device_summary.py write --work WORK --out $OUT  → $OUT/summary.md, $OUT/summary.json"
  exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ascend-rl-device-check.XXXXXX")
export WORK PYTHON HBM_GBPS
: >"$WORK/steps.tsv"
echo "work directory $WORK; logs and the summary in $OUT"
for name in "${STEPS[@]}"; do
  start=$(date +%s%N)
  code=0
  timeout --kill-after=10 "${BUDGET[$name]}" bash "$ROOT/scripts/device_check.sh" --step "$name" "$OUT" \
    >"$OUT/$name.log" 2>&1 || code=$?
  ms=$((($(date +%s%N) - start) / 1000000))
  seconds=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
  printf '%s\t%s\t%s\t%s\n' "$name" "$code" "$seconds" "${BUDGET[$name]}" >>"$WORK/steps.tsv"
  printf 'step %-8s exit %3s  %6.1f s of %s s\n' "$name" "$code" "$seconds" "${BUDGET[$name]}"
done
if ! timeout "$SUMMARY_BUDGET" "$PYTHON" scripts/device_summary.py write --work "$WORK" --out "$OUT" \
  --train-steps "$TRAIN_STEPS" >/dev/null; then
  echo "error: the summary could not be written; the steps' logs are in $OUT, their results in $WORK" >&2
  exit 1
fi
echo "summary: $OUT/summary.md, $OUT/summary.json"
