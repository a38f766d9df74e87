"""The rows of `ascend-rl doctor`: each check reads a `Machine` (and, when overrides are given, the
config) and says OK / WARN / FAIL with the exact fix. A registry: one function per row, each naming the
devices it applies to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from ascend_rl.doctor.probe import Machine
from ascend_rl.stack import ascend_at_least, versions

OK, WARN, FAIL = "OK", "WARN", "FAIL"
INSTALL_NPU = "scripts/install_sglang_npu.sh (see docs/ascend/quickstart.md)"
INSTALL_MEGATRON_NPU = "USE_MEGATRON=1 bash scripts/install_sglang_npu.sh"


@dataclass(frozen=True)
class Row:
    check: str
    status: str
    found: str
    fix: str = ""


@dataclass(frozen=True)
class Context:
    device: str  # cpu | cuda | npu: what the machine is checked for
    config: object | None = None  # the composed config when overrides were given
    plan: object | None = None


Check = Callable[[Machine, Context], list[Row]]
CHECKS: list[tuple[str, frozenset[str], Check]] = []


def check(name: str, devices: str = "cpu cuda npu"):
    def register(fn: Check) -> Check:
        CHECKS.append((name, frozenset(devices.split()), fn))
        return fn
    return register


def run_checks(machine: Machine, ctx: Context) -> list[Row]:
    return [row for _, devices, fn in CHECKS if ctx.device in devices for row in fn(machine, ctx)]


def _v(text: str | None) -> Version | None:
    try:
        return Version(text) if text else None
    except InvalidVersion:
        return None


def _at_least(found: str, minimum: str) -> bool:
    """False also for a version pip's rules cannot read (reported rather than crashing on)."""
    v = _v(found)
    return v is not None and v >= Version(minimum)


def _range(bounds: dict) -> str:
    """A versions.toml table's `minimum` … `below` as a pip specifier."""
    return f">={bounds['minimum']},<{bounds['below']}"


def _base(text: str | None) -> str | None:
    v = _v(text)
    return v.base_version if v else None


MIN = versions()["minimum"]
PINS = versions()["pins"]
MEGATRON = versions()["megatron"]


@check("python")
def _python(m: Machine, ctx: Context) -> list[Row]:
    major_minor = ".".join(m.python.split(".")[:2])
    if ctx.device == "npu" and major_minor != MIN["python"]:
        return [Row("python", FAIL, m.python, f"SGLang's NPU build needs Python {MIN['python']}: "
                                              f"conda create -n ascend-rl python={MIN['python']}")]
    return [Row("python", OK, m.python)]


@check("torch")
def _torch(m: Machine, ctx: Context) -> list[Row]:
    found = m.packages["torch"]
    if found is None:
        return [Row("torch", FAIL, "not installed", _torch_fix(ctx.device))]
    if ctx.device == "npu" and not _at_least(found, MIN["torch"]):
        return [Row("torch", FAIL, found, f"needs >= {MIN['torch']}: {_torch_fix('npu')}")]
    return [Row("torch", OK, found)]


def _torch_fix(device: str) -> str:
    pins = PINS["npu"]
    return {"npu": f"pip install torch=={pins['torch']} torch_npu=={pins['torch_npu']}",
            "cuda": f"pip install 'ascend-rl[sglang]' (SGLang {PINS['cuda']['sglang']} brings torch "
                    f"{PINS['cuda']['torch']})",
            "cpu": "pip install torch==2.13.0 (the CPU build; scripts/setup.sh does this)"}[device]


@check("torch_npu", "npu")
def _torch_npu(m: Machine, ctx: Context) -> list[Row]:
    found, torch = m.packages["torch_npu"], m.packages["torch"]
    if found is None:
        return [Row("torch_npu", FAIL, "not installed", _torch_fix("npu"))]
    if not _at_least(found, MIN["torch_npu"]):
        return [Row("torch_npu", FAIL, found, f"needs >= {MIN['torch_npu']}: {_torch_fix('npu')}")]
    if torch and _base(found) != _base(torch):
        return [Row("torch_npu", FAIL, f"{found} with torch {torch}",
                    f"torch_npu is built for one torch release: pip install torch=={_base(found)}")]
    return [Row("torch_npu", OK, found)]


@check("NPU devices", "npu")
def _npu_devices(m: Machine, ctx: Context) -> list[Row]:
    if m.packages["torch_npu"] is None:
        return []  # the torch_npu row already fails
    if m.npu_devices:
        return [Row("NPU devices", OK, f"torch_npu sees {m.npu_devices}")]
    why = m.npu_probe_error or "torch.npu.is_available() is False"
    return [Row("NPU devices", FAIL, why, "check the driver (npu-smi info), ASCEND_RT_VISIBLE_DEVICES, and in a "
                                          "container the /dev/davinci* and /dev/davinci_manager devices")]


@check("CANN", "npu")
def _cann(m: Machine, ctx: Context) -> list[Row]:
    if m.cann is None:
        return [Row("CANN", FAIL, m.cann_error or "unknown", "source /usr/local/Ascend/ascend-toolkit/set_env.sh "
                                                             "(and /usr/local/Ascend/nnal/atb/set_env.sh)")]
    if not ascend_at_least(m.cann, MIN["cann"]):
        return [Row("CANN", FAIL, m.cann, f"needs >= {MIN['cann']}: install CANN {PINS['npu']['cann']} "
                                          f"(toolkit, kernels, NNAL)")]
    return [Row("CANN", OK, m.cann)]


@check("HDK (driver)", "npu")
def _hdk(m: Machine, ctx: Context) -> list[Row]:
    if m.hdk is None:
        return [Row("HDK (driver)", FAIL, m.npu_smi_error or "unknown",
                    "install the Ascend driver and firmware (HDK) and put npu-smi on PATH")]
    if not ascend_at_least(m.hdk, MIN["hdk"]):
        return [Row("HDK (driver)", FAIL, m.hdk, f"needs >= {MIN['hdk']}: upgrade the driver and firmware")]
    return [Row("HDK (driver)", OK, m.hdk)]


@check("NPU kind", "npu")
def _npu_kind(m: Machine, ctx: Context) -> list[Row]:
    if m.npu_kind is None:
        return [Row("NPU kind", WARN, "npu-smi listed no chips", "run `npu-smi info -m` to see the chips")]
    dies = len(m.chips)
    found = f"{m.npu_kind}: {len({c.npu_id for c in m.chips})} card(s), {dies} die(s)"
    if ctx.config is not None and ctx.config.trainer.n_gpus_per_node > dies:
        return [Row("NPU kind", FAIL, found, f"trainer.n_gpus_per_node={ctx.config.trainer.n_gpus_per_node} but "
                                             f"this node has {dies} dies")]
    note = f"trainer.n_gpus_per_node counts dies: up to {dies} here" + (" (two per A3 card)" if m.npu_kind == "A3"
                                                                         else "")
    return [Row("NPU kind", OK, found, note)]


@check("IPC (weight sync)", "npu")
def _ipc(m: Machine, ctx: Context) -> list[Row]:
    need = versions()["ipc"]
    if m.hdk is None or m.cann is None:
        return [Row("IPC (weight sync)", FAIL, "HDK or CANN unknown", "fix the HDK and CANN rows first")]
    if ascend_at_least(m.hdk, need["hdk"]) and ascend_at_least(m.cann, need["cann"]):
        return [Row("IPC (weight sync)", OK, f"HDK {m.hdk}, CANN {m.cann}")]
    return [Row("IPC (weight sync)", FAIL, f"HDK {m.hdk}, CANN {m.cann}",
                f"passing weights to SGLang by device handle needs HDK >= {need['hdk']} and CANN >= {need['cann']}")]


@check("sglang", "cuda npu")
def _sglang(m: Machine, ctx: Context) -> list[Row]:
    found, pinned = m.packages["sglang"], MIN["sglang"]
    wanted = ctx.config is None or ctx.config.actor_rollout_ref.rollout.name == "sglang"
    fix = INSTALL_NPU if ctx.device == "npu" else f"pip install 'sglang=={PINS['cuda']['sglang']}'"
    if found is None:
        return [Row("sglang", FAIL if wanted else WARN, "not installed", fix)]
    if _base(found) != pinned:
        return [Row("sglang", WARN, found, f"the recipes were written for {pinned}; ServerArgs are checked "
                                           f"against the installed version")]
    return [Row("sglang", OK, found)]


@check("sgl-kernel-npu", "npu")
def _sgl_kernel_npu(m: Machine, ctx: Context) -> list[Row]:
    rows = []
    for dist, what in (("sgl_kernel_npu", "SGLang's NPU kernels"), ("deep_ep", "DeepEP for MoE expert parallelism")):
        found = m.packages[dist]
        status = OK if found else (FAIL if dist == "sgl_kernel_npu" else WARN)
        rows.append(Row(dist, status, found or "not installed", "" if found else f"{what}: {INSTALL_NPU}"))
    return rows


@check("torch_memory_saver", "cuda npu")
def _memory_saver(m: Machine, ctx: Context) -> list[Row]:
    found = m.packages["torch_memory_saver"]
    if found is None:
        return [Row("torch_memory_saver", FAIL, "not installed",
                    "SGLang's release/resume of memory needs it: " + (f"the NPU build from sgl-kernel-npu, "
                    f"{INSTALL_NPU}" if ctx.device == "npu" else "pip install torch_memory_saver"))]
    # The PyPI wheel is the CUDA build; sgl-kernel-npu builds the NPU one.
    if ctx.device == "npu" and any("cuda" in f.lower() for f in m.package_files.get("torch_memory_saver", [])):
        return [Row("torch_memory_saver", FAIL, f"{found} (CUDA build)",
                    f"pip uninstall -y torch_memory_saver, then install the NPU build: {INSTALL_NPU}")]
    return [Row("torch_memory_saver", OK, found)]


@check("triton", "npu")
def _triton(m: Machine, ctx: Context) -> list[Row]:
    if m.packages["triton"] and m.packages["triton_ascend"]:
        return [Row("triton", FAIL, f"triton {m.packages['triton']} next to triton-ascend",
                    "pip uninstall -y triton (it shadows triton-ascend)")]
    if m.packages["triton"]:
        return [Row("triton", FAIL, f"triton {m.packages['triton']} (CUDA)",
                    f"pip uninstall -y triton && pip install triton-ascend=={PINS['npu']['triton_ascend']}")]
    if not m.packages["triton_ascend"]:
        return [Row("triton", WARN, "triton-ascend not installed",
                    f"pip install triton-ascend=={PINS['npu']['triton_ascend']}")]
    return [Row("triton", OK, f"triton-ascend {m.packages['triton_ascend']}")]


@check("transformers")
def _transformers(m: Machine, ctx: Context) -> list[Row]:
    found, rng = m.packages["transformers"], versions()["transformers"]
    wanted = _range(rng)
    if found is None:
        return [Row("transformers", FAIL, "not installed", f"pip install 'transformers{wanted}'")]
    if not _at_least(found, rng["minimum"]) or _at_least(found, rng["below"]):
        return [Row("transformers", FAIL, found, f"pip install 'transformers{wanted}'")]
    return [Row("transformers", OK, found)]


# --- Megatron (actor.strategy=megatron): optional, so a missing one fails only when the config asks for it -----


def _megatron_wanted(ctx: Context) -> bool:
    return ctx.config is not None and ctx.config.actor_rollout_ref.actor.strategy == "megatron"


def _mismatch_status(ctx: Context) -> str:
    """Without overrides the machine is checked for everything; a config without Megatron does not need it."""
    return WARN if ctx.config is not None and not _megatron_wanted(ctx) else FAIL


def _megatron_range(device: str) -> str:
    """The megatron-core versions the engine runs on here: on the CPU, the one its CPU patches are written for."""
    return f"=={MEGATRON['tested']}" if device == "cpu" else _range(MEGATRON)


def _fits(found: str, specifier: str) -> bool:
    v = _v(found)
    return v is not None and SpecifierSet(specifier).contains(v, prereleases=True)


@check("megatron-core")
def _megatron_core(m: Machine, ctx: Context) -> list[Row]:
    found, need = m.packages["megatron_core"], _megatron_range(ctx.device)
    fix = INSTALL_MEGATRON_NPU if ctx.device == "npu" else f"pip install 'megatron-core=={MEGATRON['tested']}'"
    if found is None:
        if _megatron_wanted(ctx):
            return [Row("megatron-core", FAIL, "not installed", f"actor.strategy=megatron needs megatron-core "
                                                                f"{need}: {fix}")]
        return [Row("megatron-core", OK, "not installed", f"needed only for actor.strategy=megatron: {fix}")]
    if not _fits(found, need):
        return [Row("megatron-core", _mismatch_status(ctx), found,
                    f"ascend-rl's Megatron engine needs megatron-core {need}"
                    f"{' (its CPU patches are pinned to it)' if ctx.device == 'cpu' else ''}: {fix}")]
    return [Row("megatron-core", OK, found)]


@check("MindSpeed", "npu")
def _mindspeed(m: Machine, ctx: Context) -> list[Row]:
    """Megatron on Ascend runs through MindSpeed, installed with `pip install -e` from a branch of its git
    repository. Relied on: its setup.py version follows the Megatron core line the branch adapts (0.16.0 on
    core_r0.16.0), so it must fall in megatron-core's range; the branch is read from the checkout too."""
    found, pin, branch = m.packages["mindspeed"], PINS["npu"]["mindspeed"], m.git_branches.get("mindspeed")
    fix = f"MindSpeed {pin} (Megatron core {MEGATRON['minimum']}): {INSTALL_MEGATRON_NPU}"
    if found is None:
        if _megatron_wanted(ctx) or m.packages["megatron_core"]:
            status = FAIL if _megatron_wanted(ctx) else WARN
            return [Row("MindSpeed", status, "not installed", f"Megatron on Ascend runs through {fix}")]
        return [Row("MindSpeed", OK, "not installed", f"needed only for actor.strategy=megatron: {fix}")]
    shown = f"{found} ({branch})" if branch else found
    if not _fits(found, _range(MEGATRON)):
        return [Row("MindSpeed", _mismatch_status(ctx), shown,
                    f"this MindSpeed adapts another Megatron core line; ascend-rl's engine needs {fix}")]
    if branch and branch != pin:
        return [Row("MindSpeed", WARN, shown, f"pinned: {fix}")]
    cann = PINS["npu"]["megatron"]["cann"]
    if m.cann and not ascend_at_least(m.cann, cann):
        return [Row("MindSpeed", WARN, f"{shown} on CANN {m.cann}", f"its sources run MindSpeed {pin} on CANN >= "
                                                                     f"{cann} (versions.toml [pins.npu.megatron])")]
    return [Row("MindSpeed", OK, shown)]


@check("ray")
def _ray(m: Machine, ctx: Context) -> list[Row]:
    if m.packages["ray"]:
        return [Row("ray", OK, m.packages["ray"])]
    if ctx.device == "cpu":
        return [Row("ray", OK, "not installed", "needed only for more than one process: pip install 'ascend-rl[ray]'")]
    return [Row("ray", WARN, "not installed", "needed for more than one device: pip install 'ascend-rl[ray]'")]


@check("C++ compiler", "cpu")
def _cxx(m: Machine, ctx: Context) -> list[Row]:
    """The native engine's fused CPU decode kernels are built at first use (rollout/cpu_kernels.py)."""
    if m.cxx:
        return [Row("C++ compiler", OK, m.cxx)]
    return [Row("C++ compiler", WARN, "not found", "the native engine's CPU decode kernels are built with it; without "
                "one it runs eager ops (~1.5× slower on small models): install g++ (e.g. apt install g++) or set CXX")]


@check("environment", "npu")
def _environment(m: Machine, ctx: Context) -> list[Row]:
    """The variables the seed makes mandatory (and, with overrides, what this config needs)."""
    from ascend_rl.config import load_config
    from ascend_rl.config.environment import check_environment

    cfg = ctx.config if ctx.config is not None else load_config(["actor_rollout_ref.model.path=/unused",
                                                                  "actor_rollout_ref.rollout.name=sglang"])
    findings = check_environment(cfg, "npu", m.environ)
    if ctx.config is None:  # no config: only what every run needs, not counts against a default config
        findings = [f for f in findings if f.problem == "missing"]
    rows = [Row(f.variable, FAIL, f.problem, f.message) for f in findings]
    return rows or [Row("environment", OK, "the mandatory variables are set")]


@check("config", "cpu cuda npu")
def _config(m: Machine, ctx: Context) -> list[Row]:
    if ctx.plan is None:
        return []
    problems = ctx.plan.errors + ctx.plan.unsupported
    if not problems:
        return [Row("config", OK, "plan finds no errors")]
    return [Row("config", FAIL, p, "see `ascend-rl plan` with the same overrides") for p in problems]
