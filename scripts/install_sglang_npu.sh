#!/usr/bin/env bash
# Install the Ascend NPU stack for ascend-rl: torch + torch_npu, SGLang (NPU build), sgl-kernel-npu (kernels,
# DeepEP, the NPU torch_memory_saver), triton-ascend, optionally MindSpeed + megatron-core, then ascend-rl itself.
# Versions come from ascend_rl/versions.toml.
#
#   NPU_DEVICE=A3|A2 USE_MEGATRON=0|1 bash scripts/install_sglang_npu.sh [--dry-run]
#
# Before: install the driver/firmware (HDK) and CANN, then
#   source /usr/local/Ascend/ascend-toolkit/set_env.sh; source /usr/local/Ascend/nnal/atb/set_env.sh
# and activate a Python 3.11 environment (e.g. conda create -n ascend-rl python=3.11).
# Idempotent: a step whose result is already installed is skipped, so after fixing a failed step, run it again.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
NPU_DEVICE=${NPU_DEVICE:-A3}
USE_MEGATRON=${USE_MEGATRON:-0}
PYTHON=${PYTHON:-python3}
WORKDIR=${WORKDIR:-$ROOT/.npu-build}
PIP="$PYTHON -m pip"

case "$NPU_DEVICE" in A2|A3) ;; *) echo "NPU_DEVICE=$NPU_DEVICE: expected A2 or A3" >&2; exit 2;; esac
case "$USE_MEGATRON" in 0|1) ;; *) echo "USE_MEGATRON=$USE_MEGATRON: expected 0 or 1" >&2; exit 2;; esac

# The pins, as shell variables (tomllib: Python 3.11, which this stack needs anyway).
eval "$("$PYTHON" - "$NPU_DEVICE" <<'EOF'
import shlex, sys, tomllib
v = tomllib.load(open("ascend_rl/versions.toml", "rb"))
pins, device = v["pins"]["npu"], v["pins"]["npu"][sys.argv[1].lower()]
values = {"PY_VERSION": v["minimum"]["python"], "TORCH": pins["torch"], "TORCH_NPU": pins["torch_npu"],
          "TORCHVISION": pins["torchvision"], "SGLANG": pins["sglang"], "SGL_KERNEL_NPU": pins["sgl_kernel_npu"],
          "TRITON_ASCEND": pins["triton_ascend"], "MINDSPEED": pins["mindspeed"],
          "MEGATRON_LM": pins["megatron_lm"], "MEGATRON_LINE": v["megatron"]["minimum"],
          "MEGATRON_CANN": pins["megatron"]["cann"], "KERNEL_BUILD": device["sgl_kernel_npu_build"]}
print("\n".join(f"{k}={shlex.quote(str(x))}" for k, x in values.items()))
EOF
)" || { echo "cannot read ascend_rl/versions.toml with $PYTHON (needs Python 3.11)" >&2; exit 2; }

STEP=""
step() {  # step NAME DONE_CHECK: announce a step; returns 1 (skip) when DONE_CHECK succeeds
  STEP=$1
  echo
  echo "== $STEP"
  if [ "$DRY_RUN" = 0 ] && [ -n "$2" ] && eval "$2" >/dev/null 2>&1; then
    echo "   already done ($2)"
    return 1
  fi
  return 0
}

run() {  # run one command (printed in --dry-run); stop at the first failure with how to go on by hand
  echo "   \$ $*"
  [ "$DRY_RUN" = 1 ] && return 0
  if ! (eval "$*"); then
    echo >&2
    echo "FAILED in step '$STEP': $*" >&2
    echo "Fix the cause (the output above says what), then either run this command and the rest of the step" >&2
    echo "by hand (bash $0 --dry-run lists them) or run this script again: finished steps are skipped." >&2
    exit 1
  fi
}

installed() {  # installed DIST VERSION: pip has exactly this version
  $PIP show "$1" 2>/dev/null | grep -qx "Version: $2"
}

cann_note() {  # one line when this machine's CANN is older than any the MindSpeed + Megatron pair is run on
  "$PYTHON" - "$MEGATRON_CANN" "$MINDSPEED" 2>/dev/null <<'EOF' || true
import os, sys
from ascend_rl.doctor.probe import cann_version
from ascend_rl.stack import ascend_at_least
found, _ = cann_version(dict(os.environ))
if found and not ascend_at_least(found, sys.argv[1]):
    print(f"   note: CANN {found} here; MindSpeed {sys.argv[2]}'s sources run it on CANN >= {sys.argv[1]} "
          "(ascend_rl/versions.toml [pins.npu.megatron]); installing it anyway")
EOF
}

echo "Ascend NPU stack for $NPU_DEVICE (Megatron: $USE_MEGATRON)$([ "$DRY_RUN" = 1 ] && echo ', dry run: nothing is changed')"

if step "check prerequisites" ""; then
  run "$PYTHON -c 'import sys; assert sys.version_info[:2] == tuple(map(int, \"$PY_VERSION\".split(\".\"))), \"Python $PY_VERSION is required, found \" + sys.version.split()[0]'"
  run "test -n \"\${ASCEND_HOME_PATH:-}\" || { echo 'source /usr/local/Ascend/ascend-toolkit/set_env.sh first' >&2; false; }"
  run "command -v git"
  run "mkdir -p '$WORKDIR'"
fi

if step "torch $TORCH, torch_npu $TORCH_NPU, torchvision $TORCHVISION" "installed torch_npu $TORCH_NPU && installed torch $TORCH"; then
  run "$PIP install torch==$TORCH torchvision==$TORCHVISION --index-url https://download.pytorch.org/whl/cpu"
  run "$PIP install torch_npu==$TORCH_NPU pyyaml"
fi

if step "SGLang $SGLANG (NPU build, from source)" "installed sglang $SGLANG"; then
  run "rm -rf '$WORKDIR/sglang' && git clone --depth 1 -b v$SGLANG https://github.com/sgl-project/sglang.git '$WORKDIR/sglang'"
  run "cd '$WORKDIR/sglang/python' && cp pyproject_other.toml pyproject.toml"
  run "$PIP install -e '$WORKDIR/sglang/python[srt_npu]'"
fi

if step "sgl-kernel-npu $SGL_KERNEL_NPU (kernels, DeepEP, NPU torch_memory_saver) for $NPU_DEVICE" "$PYTHON -c 'import sgl_kernel_npu, deep_ep, torch_memory_saver'"; then
  run "rm -rf '$WORKDIR/sgl-kernel-npu' && git clone https://github.com/sgl-project/sgl-kernel-npu.git '$WORKDIR/sgl-kernel-npu'"
  run "cd '$WORKDIR/sgl-kernel-npu' && git checkout $SGL_KERNEL_NPU"
  run "cd '$WORKDIR/sgl-kernel-npu' && $KERNEL_BUILD && bash build.sh -a memory-saver"
  run "$PIP install '$WORKDIR'/sgl-kernel-npu/output/torch_memory_saver*.whl '$WORKDIR'/sgl-kernel-npu/output/sgl_kernel_npu*.whl '$WORKDIR'/sgl-kernel-npu/output/deep_ep*.whl"
  # deep_ep's C++ extension is installed beside the package, where its import does not look
  run "cd \"\$($PYTHON -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')\" && ln -sf deep_ep/deep_ep_cpp*.so ."
  run "$PYTHON -c 'import deep_ep, sgl_kernel_npu, torch_memory_saver'"
fi

if step "triton-ascend $TRITON_ASCEND (instead of triton)" "installed triton-ascend $TRITON_ASCEND && ! $PIP show triton"; then
  run "$PIP uninstall -y triton timm || true"
  run "$PIP install triton-ascend==$TRITON_ASCEND"
fi

# Megatron-LM from git at the branch verl HEAD installs (megatron.core and megatron.training: MindSpeed patches
# both; the megatron-core wheel has only the first). On the pinned torch (MindSpeed's own pairing for
# this branch); a CANN older than the pair's sources use gets a note, not a refusal: nothing shows it failing
# there, and CANN is the host's to change (ascend_rl/versions.toml [pins.npu.megatron]). Done when both are
# there for Megatron core $MEGATRON_LINE (MindSpeed's version follows the core line its branch adapts).
if [ "$USE_MEGATRON" = 0 ]; then
  echo; echo "== MindSpeed + Megatron-LM: skipped (USE_MEGATRON=0)"
elif step "MindSpeed $MINDSPEED + Megatron-LM $MEGATRON_LM" "$PIP show megatron-core | grep -q '^Version: $MEGATRON_LINE\.' && $PIP show mindspeed | grep -q '^Version: $MEGATRON_LINE\.'"; then
  cann_note
  run "rm -rf '$WORKDIR/MindSpeed' && git clone --depth 1 -b $MINDSPEED https://gitcode.com/Ascend/MindSpeed.git '$WORKDIR/MindSpeed'"
  run "$PIP install -e '$WORKDIR/MindSpeed'"
  run "$PIP install 'git+https://github.com/NVIDIA/Megatron-LM.git@$MEGATRON_LM'"
fi

if step "ascend-rl" ""; then
  run "$PIP install --no-deps -e '$ROOT'"
  run "$PIP install -r '$ROOT/requirements-npu.txt'"
fi

if step "check the result" ""; then
  # Informational: devices are not visible everywhere this runs (e.g. inside `docker build`).
  run "$PYTHON -m ascend_rl doctor --device npu || echo 'doctor lists what is left to fix above'"
fi
echo
echo "done$([ "$DRY_RUN" = 1 ] && echo ' (dry run)')"
