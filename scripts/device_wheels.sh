#!/usr/bin/env bash
# Fetch into .whl/ the wheels scripts/device_check.sh installs on the GPU machine, which reaches no package index:
# the list that `device_check.sh --list-wheels` prints, for CPython 3.12 on x86-64 Linux. Run it here (PyPI
# reachable), then take .whl/ along with the working tree (git ignores it). Wheels already there are kept; other
# versions of the listed packages are removed (two versions of one package stop pip's install).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# Published as source only (hydra-core's and omegaconf's pin): built here into a pure-Python wheel.
SOURCE_ONLY=(antlr4-python3-runtime)

mapfile -t wheels < <(bash scripts/device_check.sh --list-wheels)
mkdir -p .whl
while read -r stale; do
  [ -n "$stale" ] && { echo "removing $stale (not in the list)"; rm -f "$stale"; }
done < <("$PYTHON" scripts/device_deps.py stale --wheels-dir .whl "${wheels[@]}")
mapfile -t missing < <("$PYTHON" scripts/device_deps.py missing --wheels-dir .whl "${wheels[@]}")
for spec in "${missing[@]}"; do
  [ -n "$spec" ] || continue
  if [[ " ${SOURCE_ONLY[*]} " == *" ${spec%%==*} "* ]]; then
    "$PYTHON" -m pip wheel -q --no-deps --no-binary :all: -w .whl "$spec"
  else
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
  fi
done
# every requirement met by these wheels and the GPU image, torch not among them
"$PYTHON" scripts/device_deps.py check --simulate-machine --wheels-dir .whl "${wheels[@]}"
du -sh .whl
