"""What `doctor` reads from a machine: Python, installed packages, the NPU driver (`npu-smi`), the CANN
toolkit, the devices torch_npu sees, the environment. Everything goes through `environ` and `site_paths`,
so tests simulate an Ascend install (a fake npu-smi on PATH, a toolkit tree, fake packages)."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

PACKAGES = ("torch", "torch_npu", "torchvision", "sglang", "sgl_kernel_npu", "torch_memory_saver", "deep_ep",
            "triton", "triton_ascend", "transformers", "ray", "msgspec", "megatron_core", "mindspeed")
EDITABLE = ("mindspeed",)  # installed from a git checkout with `pip install -e`: its branch is read too


@dataclass
class Chip:
    npu_id: int
    chip_id: int
    name: str


@dataclass
class Machine:
    python: str
    environ: dict[str, str]
    packages: dict[str, str | None]
    package_files: dict[str, list[str]] = field(default_factory=dict)
    git_branches: dict[str, str | None] = field(default_factory=dict)  # of the EDITABLE installs' checkouts
    hdk: str | None = None  # npu-smi's "Software Version"
    npu_smi_error: str | None = None
    chips: list[Chip] = field(default_factory=list)
    cann: str | None = None
    cann_error: str | None = None
    npu_devices: int | None = None  # what torch_npu sees
    npu_probe_error: str | None = None
    cxx: str | None = None  # the C++ compiler torch's extension builder runs (the CPU decode kernels)

    @property
    def dies_per_card(self) -> int:
        per_card: dict[int, int] = {}
        for chip in self.chips:
            per_card[chip.npu_id] = per_card.get(chip.npu_id, 0) + 1
        return max(per_card.values(), default=0)

    @property
    def npu_kind(self) -> str | None:
        """A3 (two dies per card), A2 (910B), or None when npu-smi listed no chips."""
        if not self.chips:
            return None
        if self.dies_per_card >= 2:
            return "A3"
        return "A2" if any("910B" in c.name.replace(" ", "") for c in self.chips) else self.chips[0].name


def gather(environ: dict[str, str] | None = None, site_paths: list[str] | None = None,
           probe_devices: bool = True) -> Machine:
    environ = dict(os.environ if environ is None else environ)
    paths = site_paths if site_paths is not None else sys.path
    packages = {name: _dist_version(name, paths) for name in PACKAGES}
    machine = Machine(f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}", environ,
                      packages, {name: _dist_files(name, paths) for name in ("torch_memory_saver",)},
                      {name: _editable_branch(name, paths) for name in EDITABLE})
    machine.cxx = shutil.which(environ.get("CXX", "c++"))
    _read_npu_smi(machine)
    _read_cann(machine)
    if probe_devices and packages["torch_npu"]:
        _probe_npu_devices(machine, site_paths)
    return machine


def _dist(name: str, paths: list[str]):
    return next(iter(metadata.distributions(name=name, path=paths)), None)


def _dist_version(name: str, paths: list[str]) -> str | None:
    dist = _dist(name, paths)
    return dist.version if dist else None


def _dist_files(name: str, paths: list[str]) -> list[str]:
    dist = _dist(name, paths)
    return [str(f) for f in (dist.files or [])] if dist else []


def _editable_branch(name: str, paths: list[str]) -> str | None:
    """The branch checked out where `pip install -e` installed `name` from: pip records the directory in the
    dist-info's direct_url.json (PEP 610), git the branch in its .git/HEAD. None for a wheel, a detached HEAD
    or anything unreadable."""
    dist = _dist(name, paths)
    text = dist.read_text("direct_url.json") if dist else None
    try:
        url = urlparse(json.loads(text).get("url", "")) if text else None
        head = (Path(unquote(url.path)) / ".git" / "HEAD").read_text() if url and url.scheme == "file" else ""
    except (OSError, ValueError, AttributeError):  # AttributeError: a direct_url.json that is no JSON object
        return None
    prefix = "ref: refs/heads/"
    return head.strip().removeprefix(prefix) if head.startswith(prefix) else None


def _run(argv: list[str], environ: dict[str, str], timeout_s: float = 30) -> str:
    out = subprocess.run(argv, env=environ, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {out.returncode}: {out.stderr.strip()[:200]}")
    return out.stdout


def _read_npu_smi(m: Machine) -> None:
    exe = shutil.which("npu-smi", path=m.environ.get("PATH", ""))
    if exe is None:
        m.npu_smi_error = "npu-smi not found on PATH"
        return
    try:
        board = _run([exe, "info", "-t", "board", "-i", "0"], m.environ)
        chips = _run([exe, "info", "-m"], m.environ)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        m.npu_smi_error = str(err)
        return
    found = re.search(r"Software Version\s*:\s*(\S+)", board)
    m.hdk = found.group(1) if found else None
    if m.hdk is None:
        m.npu_smi_error = "npu-smi printed no 'Software Version'"
    m.chips = parse_chip_table(chips)


def parse_chip_table(text: str) -> list[Chip]:
    """Rows of `npu-smi info -m` (NPU ID, Chip ID, Chip Logic ID, Chip Name); the MCU rows, which have no
    logic id, are not dies."""
    chips = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].isdigit() and parts[1].isdigit() and parts[2].isdigit():
            chips.append(Chip(int(parts[0]), int(parts[1]), " ".join(parts[3:])))
    return chips


def _read_cann(m: Machine) -> None:
    m.cann, m.cann_error = cann_version(m.environ)


def cann_version(environ: dict[str, str]) -> tuple[str | None, str | None]:
    """(the CANN toolkit's version, None) or (None, why it is unknown); the install script asks it too."""
    home = environ.get("ASCEND_HOME_PATH") or environ.get("ASCEND_TOOLKIT_HOME")
    if not home:
        return None, "ASCEND_HOME_PATH is not set (the toolkit's set_env.sh was not sourced)"
    infos = sorted(glob.glob(os.path.join(home, "*-linux", "ascend_toolkit_install.info")))
    if not infos:
        return None, f"no */ascend_toolkit_install.info under ASCEND_HOME_PATH={home}"
    found = re.search(r"^version=(\S+)", Path(infos[0]).read_text(), re.MULTILINE)
    return (found.group(1), None) if found else (None, f"{infos[0]} has no version= line")


# In a child process: importing torch_npu can hang or abort on a broken driver, and it patches torch.
_DEVICE_PROBE = "import torch, torch_npu; print(torch.npu.device_count() if torch.npu.is_available() else 0)"


def _probe_npu_devices(m: Machine, site_paths: list[str] | None) -> None:
    env = dict(m.environ)
    if site_paths is not None:
        env["PYTHONPATH"] = os.pathsep.join(site_paths)
    try:
        m.npu_devices = int(_run([sys.executable, "-c", _DEVICE_PROBE], env, timeout_s=120).strip().splitlines()[-1])
    except (RuntimeError, OSError, ValueError, IndexError, subprocess.TimeoutExpired) as err:
        m.npu_probe_error = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
