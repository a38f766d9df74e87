"""One source of truth for the stack: versions.toml agrees with pyproject, the requirements files, the
Dockerfiles and the install script, whose dry run prints the whole plan for A2 and A3."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.version import Version

from ascend_rl.stack import versions

ROOT = Path(__file__).resolve().parents[1]
V = versions()
MIN, NPU, CUDA, MEGATRON = V["minimum"], V["pins"]["npu"], V["pins"]["cuda"], V["megatron"]


def requirements(name: str) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    return {re.split(r"[<>=!\[]", line, maxsplit=1)[0]: line for line in lines if line}


def test_pyproject_lower_bounds_are_the_seed_matrix():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for ds in project["optional-dependencies"].values() for d in ds]
    assert f"torch>={MIN['torch']}" in deps and f"torch_npu>={MIN['torch_npu']}" in deps
    assert f"sglang>={MIN['sglang']}" in deps and project["requires-python"] == f">={MIN['python']}"


def test_requirements_files_use_the_pins():
    npu, cuda = requirements("requirements-npu.txt"), requirements("requirements-cuda.txt")
    assert npu["triton-ascend"] == f"triton-ascend=={NPU['triton_ascend']}"
    rng = V["transformers"]
    assert npu["transformers"] == f"transformers>={rng['minimum']},<{rng['below']}"
    assert "torch" not in npu and "torch_npu" not in npu  # the install script puts the pinned builds first
    assert cuda["sglang"] == f"sglang=={CUDA['sglang']}"


def test_the_npu_requirements_hold_every_core_dependency():
    """The NPU install is `pip install --no-deps -e .` and then this file: a dependency missing here is missing
    on the NPU machine."""
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!\[ ]", dep, maxsplit=1)[0] for dep in core} - {"torch"}
    assert names <= set(requirements("requirements-npu.txt")), names - set(requirements("requirements-npu.txt"))


@pytest.mark.parametrize("device", ["a2", "a3"])
def test_npu_dockerfiles_use_the_base_image_and_the_install_script(device):
    text = (ROOT / "docker" / f"Dockerfile.npu-{device}").read_text()
    assert re.search(r"^FROM (\S+)$", text, re.M).group(1) == NPU[device]["base_image"]
    assert f"NPU_DEVICE={device.upper()} " in text and "scripts/install_sglang_npu.sh" in text
    assert f"py{MIN['python']}" in NPU[device]["base_image"]


def test_cuda_dockerfile():
    text = (ROOT / "docker" / "Dockerfile.cuda").read_text()
    assert re.search(r"^FROM (\S+)$", text, re.M).group(1) == CUDA["base_image"]
    assert f"python{MIN['python']}" in text and "requirements-cuda.txt" in text


def dry_run(device: str, megatron: str = "0", **env_vars) -> str:
    env = {**os.environ, "NPU_DEVICE": device, "USE_MEGATRON": megatron, "PYTHON": sys.executable, **env_vars}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "install_sglang_npu.sh"), "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("device", ["A2", "A3"])
def test_install_dry_run_prints_every_step_with_the_pins(device):
    out = dry_run(device)
    for pin in (f"torch=={NPU['torch']}", f"torch_npu=={NPU['torch_npu']}", f"torchvision=={NPU['torchvision']}",
                f"-b v{NPU['sglang']}", f"git checkout {NPU['sgl_kernel_npu']}", f"triton-ascend=={NPU['triton_ascend']}",
                NPU[device.lower()]["sgl_kernel_npu_build"], "pyproject_other.toml", "pip uninstall -y triton",
                "--no-deps -e", "requirements-npu.txt", "doctor --device npu"):
        assert pin in out, pin
    assert "MindSpeed + Megatron-LM: skipped" in out
    mega = dry_run(device, "1")
    assert f"-b {NPU['mindspeed']} https://gitcode.com/Ascend/MindSpeed.git" in mega
    assert f"Megatron-LM.git@{NPU['megatron_lm']}" in mega
    torch_line = next(line for line in mega.splitlines() if "torch==" in line)
    assert mega.count("torch==") == 1 and f"torch=={NPU['megatron']['torch']}" in torch_line  # the pinned torch only


def test_megatron_pins_agree():
    """One tested megatron-core for the `megatron` extra and the CPU patches, inside the engine's range; on NPUs
    MindSpeed's and Megatron-LM's branches are that core line, and the pair runs on the pinned torch (else the
    script must install another)."""
    from ascend_rl.workers.megatron.cpu_patches import MEGATRON_CORE

    tested = MEGATRON["tested"]
    assert tested == MEGATRON_CORE
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"megatron-core=={tested}" in extras["megatron"]
    assert Version(MEGATRON["minimum"]) <= Version(tested) < Version(MEGATRON["below"])
    assert NPU["mindspeed"] == NPU["megatron_lm"] == f"core_r{MEGATRON['minimum']}.0"  # the same core line
    assert NPU["megatron"]["torch"] == NPU["torch"]


@pytest.mark.parametrize("cann,noted", [("8.3.RC1", True), (NPU["megatron"]["cann"], False), ("9.0.0", False)])
def test_install_notes_a_cann_older_than_the_megatron_pair_is_run_on(tmp_path, cann, noted):
    (tmp_path / "x86_64-linux").mkdir()
    (tmp_path / "x86_64-linux" / "ascend_toolkit_install.info").write_text(f"version={cann}\n")
    note = f"note: CANN {cann} here; MindSpeed {NPU['mindspeed']}'s sources run it on CANN >= {NPU['megatron']['cann']}"
    assert (note in dry_run("A3", "1", ASCEND_HOME_PATH=str(tmp_path))) == noted
    assert "note: CANN" not in dry_run("A3", "0", ASCEND_HOME_PATH=str(tmp_path))


def test_install_script_rejects_unknown_devices():
    env = {**os.environ, "NPU_DEVICE": "A5"}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "install_sglang_npu.sh"), "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "NPU_DEVICE=A5: expected A2 or A3" in out.stderr


def test_shell_scripts_pass_bash_n_and_shellcheck():
    scripts = sorted(str(p) for p in [*(ROOT / "scripts").glob("*.sh"), *(ROOT / "examples").rglob("*.sh")])
    for script in scripts:
        assert subprocess.run(["bash", "-n", script]).returncode == 0, script
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    out = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
