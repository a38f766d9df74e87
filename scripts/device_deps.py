"""What scripts/device_check.sh installs on a GPU machine that cannot reach a package index, and the checks that
keep it off that machine's torch.

    python scripts/device_deps.py requirements                 # ascend-rl's requirements (pyproject), one a line
    python scripts/device_deps.py check [--simulate-machine] [--needed FILE] --wheels-dir .whl SPEC...
    python scripts/device_deps.py missing --wheels-dir .whl SPEC...   # the specs without a wheel there
    python scripts/device_deps.py stale --wheels-dir .whl SPEC...     # the wheels there no spec names
    python scripts/device_deps.py pip-report REPORT.json               # what `pip install --dry-run --report` would do

`check` follows ascend-rl's requirements as the GPU machine sees them (CPython 3.12, x86-64 Linux). Each is met
by a carried wheel (SPEC, NAME==VERSION), whose own requirements are followed from the wheel's METADATA (else from
the same version installed here; in a simulation without either, not followed), or by the machine: with
--simulate-machine, the GPU image's package list below (a developer's dry run); without it, this interpreter's
installed distributions (on the GPU machine). torch and what is built with it (`protected`) are never carried.
Exit status 1 names each unmet requirement. --needed FILE: the carried wheels' paths to install, one a line (on the
machine: those of the missing or too old distributions).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]

# The GPU machine: CPython 3.12.3 on x86-64 Linux, its image's packages as listed for it on 2026-11-17, with the
# versions that were read there (the others are checked on the machine itself, by pip).
MACHINE_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                   "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
MACHINE_VERSIONS = {"torch": "2.11.0", "transformers": "5.17.0", "numpy": "2.5.2", "safetensors": "0.8.0",
                    "huggingface-hub": "1.33.0", "tokenizers": "0.23.2", "accelerate": "1.15.0", "triton": "3.6.0"}
IMAGE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp"""
MACHINE_PACKAGES = frozenset(canonicalize_name(n) for n in IMAGE_PACKAGES.split())


def protected(name: str) -> bool:
    """torch and the packages built against it: the machine's own builds stay."""
    name = canonicalize_name(name)
    return name in {"torch", "torchvision", "torchaudio", "triton"} or name.startswith(("nvidia-", "cuda-"))


def project_requirements(root: Path = ROOT) -> list[str]:
    with open(root / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def parse_specs(specs: list[str]) -> dict[str, tuple[str, str]]:
    """NAME==VERSION → {canonical name: (name, version)}; anything else is a usage error."""
    out = {}
    for spec in specs:
        name, sep, version = spec.partition("==")
        if not sep or not name or not version:
            raise SystemExit(f"device_deps: {spec!r}: expected NAME==VERSION")
        out[canonicalize_name(name)] = (name, version)
    return out


def wheels_in(directory: Path) -> dict[str, tuple[str, Path]]:
    """{canonical name: (version, path)} of the wheels in `directory` (none when it does not exist)."""
    found = {}
    for path in sorted(directory.glob("*.whl")) if directory.is_dir() else []:
        name, version, _, _ = parse_wheel_filename(path.name)
        found[canonicalize_name(name)] = (str(version), path)
    return found


def wheel_requires(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as wheel:
        metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = wheel.read(metadata).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class Plan:
    carried: dict[str, str] = field(default_factory=dict)  # name → version, the wheels the requirements use
    machine: dict[str, str] = field(default_factory=dict)  # name → version ("?" where not known here)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan(specs: list[str], wheels_dir: Path, simulate_machine: bool, requirements: list[str] | None = None) -> Plan:
    carried = parse_specs(specs)
    wheels = wheels_in(wheels_dir)
    markers = MACHINE_MARKERS if simulate_machine else {"extra": ""}
    result = Plan()
    for name, (spec_name, version) in carried.items():
        if protected(name):
            result.problems.append(f"{spec_name}=={version} is carried: the machine's own {spec_name} must stay")
    queue = [(Requirement(r), "ascend-rl") for r in (requirements or project_requirements())]
    followed: set[str] = set()
    while queue:
        req, needed_by = queue.pop(0)
        if req.marker is not None and not req.marker.evaluate(markers):
            continue
        name = canonicalize_name(req.name)
        if simulate_machine:
            on_machine = MACHINE_VERSIONS.get(name, "?") if name in MACHINE_PACKAGES else None
        else:
            on_machine = installed_version(name)
        satisfied = on_machine is not None and (on_machine == "?" or req.specifier.contains(on_machine, True))
        # On the machine pip keeps an installed distribution that satisfies; in a simulation its version is
        # mostly unknown, so a carried wheel is checked as the one that will be used.
        if name in carried and (simulate_machine or not satisfied):
            spec_name, version = carried[name]
            if not req.specifier.contains(version, prereleases=True):
                result.problems.append(f"{needed_by} needs {req}, but {spec_name}=={version} is carried")
            if name not in followed:
                followed.add(name)
                result.carried[spec_name] = version
                requires = carried_requires(name, spec_name, version, wheels, result, simulate_machine)
                queue.extend((Requirement(r), spec_name) for r in requires)
        elif satisfied:
            result.machine[name] = on_machine
        elif on_machine is None:
            result.problems.append(f"{req} (needed by {needed_by}) is neither carried nor on the machine")
        else:
            result.problems.append(f"{needed_by} needs {req}; the machine has {req.name} {on_machine}")
    unused = sorted(f"{n}=={v}" for c, (n, v) in carried.items() if n not in result.carried and not protected(c))
    if unused:
        result.notes.append(f"carried but not needed here: {', '.join(unused)}")
    return result


def carried_requires(name: str, spec_name: str, version: str, wheels: dict, result: Plan,
                     simulate_machine: bool) -> list[str]:
    """A carried distribution's requirements: from its wheel, else from the same version installed here. Off the
    machine without either, they are not followed (a note); on the machine, that is a problem."""
    if name in wheels and wheels[name][0] == version:
        return wheel_requires(wheels[name][1])
    if installed_version(spec_name) == version:
        return importlib.metadata.requires(spec_name) or []
    message = f"{spec_name}=={version}: no wheel in .whl/ (bash scripts/device_wheels.sh) and not installed here"
    if simulate_machine:
        result.notes.append(f"{message}: its own requirements are not followed")
    else:
        result.problems.append(message)
    return []


def pip_report(path: Path) -> tuple[list[str], list[str]]:
    """From `pip install --dry-run --report PATH`: what it would install, and which of those are protected."""
    report = json.loads(path.read_text())
    names = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in report.get("install", [])]
    return names, [n for n in names if protected(n.partition("==")[0])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("requirements")
    for name in ("check", "missing", "stale"):
        p = sub.add_parser(name)
        p.add_argument("--wheels-dir", type=Path, default=ROOT / ".whl")
        p.add_argument("specs", nargs="*")
        if name == "check":
            p.add_argument("--simulate-machine", action="store_true")
            p.add_argument("--needed", type=Path, help="write the wheels to install here, one path a line")
    sub.add_parser("pip-report").add_argument("report", type=Path)
    args = parser.parse_args(argv)

    if args.command == "requirements":
        print("\n".join(project_requirements()))
        return 0
    if args.command in ("missing", "stale"):
        wanted, present = parse_specs(args.specs), wheels_in(args.wheels_dir)
        if args.command == "missing":
            lines = [f"{n}=={v}" for c, (n, v) in wanted.items() if present.get(c, ("",))[0] != v]
        else:
            lines = [str(p) for c, (v, p) in present.items() if wanted.get(c, ("", ""))[1] != v]
        print("\n".join(lines))
        return 0
    if args.command == "pip-report":
        names, bad = pip_report(args.report)
        print(f"pip would install: {', '.join(names) or 'nothing'}")
        if bad:
            print(f"error: pip would replace the machine's {', '.join(bad)}: refusing", file=sys.stderr)
            return 1
        return 0
    result = plan(args.specs, args.wheels_dir, args.simulate_machine)
    if args.needed:
        present = wheels_in(args.wheels_dir)
        paths = [present[c][1] for c in map(canonicalize_name, result.carried) if c in present]
        args.needed.write_text("".join(f"{path}\n" for path in paths))
    where = "the GPU image's package list" if args.simulate_machine else "this interpreter's packages"
    print(f"carried wheels the requirements use: {', '.join(f'{n}=={v}' for n, v in sorted(result.carried.items()))}")
    print(f"from the machine ({where}): {', '.join(f'{n} {v}' for n, v in sorted(result.machine.items()))}")
    for note in result.notes:
        print(f"note: {note}")
    for problem in result.problems:
        print(f"problem: {problem}", file=sys.stderr)
    if result.problems:
        return 1
    print("ok: every requirement is met, and torch is not among the carried wheels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
