"""The only place that knows device kinds: names, communication backends, visible-device variables,
Ray resource names and the environment each kind needs. Nobody else branches on the device."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

from ascend_rl.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Platform:
    name: str  # torch device type
    comm_backend: str  # torch.distributed backend for device tensors
    visible_devices_var: str | None
    ray_resource: str | None
    noset_visible_devices_var: str | None = None  # makes Ray leave the visible-devices variable alone
    worker_env: tuple[tuple[str, str], ...] = ()  # what every worker needs on this device, unless set already
    deterministic_env: tuple[tuple[str, str], ...] = ()  # trainer.deterministic: what makes kernels repeatable

    @property
    def process_group_backend(self) -> str:
        """The workers' group: the device backend for device tensors, gloo for the few CPU ones (metrics,
        checkpoint metadata)."""
        return "gloo" if self.name == "cpu" else f"cpu:gloo,{self.name}:{self.comm_backend}"


PLATFORMS: dict[str, Platform] = {
    "cpu": Platform("cpu", "gloo", None, None),
    "cuda": Platform("cuda", "nccl", "CUDA_VISIBLE_DEVICES", "GPU", "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES",
                     deterministic_env=(("CUBLAS_WORKSPACE_CONFIG", ":4096:8"),)),  # cuBLAS needs it for repeatability
    "npu": Platform("npu", "hccl", "ASCEND_RT_VISIBLE_DEVICES", "NPU",
                    "RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES",
                    # the seed's mandatory variables: two processes per NPU (trainer + SGLang) need their own
                    # HCCL ports, and Ray must not narrow the visible devices it cannot see itself
                    worker_env=(("HCCL_HOST_SOCKET_PORT_RANGE", "60000-60050"),
                                ("HCCL_NPU_SOCKET_PORT_RANGE", "61000-61050"),
                                ("RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES", "1"),
                                ("PYTORCH_NPU_ALLOC_CONF", "expandable_segments:True")),
                    # verl's and the Ascend consistency guide's switches: ordered reductions in HCCL/LCCL,
                    # no K-shift or K-shuffle in matmuls
                    deterministic_env=(("HCCL_DETERMINISTIC", "true"), ("LCCL_DETERMINISTIC", "1"),
                                       ("CLOSE_MATMUL_K_SHIFT", "1"), ("ATB_MATMUL_SHUFFLE_K_ENABLE", "0"))),
}


# OpenMP's worker threads wait for work by spinning. On a machine where any other process is busy, a spinning
# thread takes the core the working one needs, and a step of the main job ran 20-30× slower; waiting passively
# keeps a busy neighbour to its fair share (benchmarks/threads_under_load.py; the numbers in
# docs/performance.md). It has to be in the environment before torch starts its OpenMP runtime.
CPU_THREAD_DEFAULTS = (("OMP_WAIT_POLICY", "PASSIVE"),)


def apply_cpu_thread_defaults(environ) -> list[str]:
    """Set the defaults the user has not (this process, its workers and the servers it starts inherit them);
    returns what was set."""
    env, defaulted = _with_defaults(CPU_THREAD_DEFAULTS, environ)
    environ.update(env)
    return defaulted


def get_platform(name: str) -> Platform:
    try:
        return PLATFORMS[name]
    except KeyError:
        raise UserError(f"trainer.device={name!r}: expected one of {', '.join(sorted(PLATFORMS))}") from None


DETERMINISTIC_VAR = "ASCEND_RL_DETERMINISTIC"  # tells worker processes to turn on torch's deterministic mode


def worker_env(device: str, environ, deterministic: bool = False) -> tuple[dict[str, str], list[str]]:
    """The environment workers on `device` get: the driver's value where set, else the platform's default
    (with `deterministic`, the platform's switches too); and the names that took the default (to say so in
    one log line)."""
    platform = get_platform(device)
    return _with_defaults(platform.worker_env + (_deterministic_env(platform) if deterministic else ()), environ)


def _deterministic_env(platform: Platform) -> tuple[tuple[str, str], ...]:
    return platform.deterministic_env + ((DETERMINISTIC_VAR, "1"),)


def _with_defaults(wanted, environ) -> tuple[dict[str, str], list[str]]:
    env, defaulted = {}, []
    for name, default in wanted:
        env[name] = environ.get(name) or default
        if not environ.get(name):
            defaulted.append(f"{name}={default}")
    return env, defaulted


def detect_device() -> str:
    """npu when torch_npu is installed and sees a device, else cuda when available, else cpu."""
    import torch

    if importlib.util.find_spec("torch_npu") is not None:
        import torch_npu  # noqa: F401  (registers torch.npu)

        if torch.npu.is_available():
            return "npu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(requested: str | None) -> str:
    """`trainer.device` when set (validated), else what this machine has."""
    return get_platform(requested).name if requested else detect_device()


def usable_device(requested: str | None) -> str:
    """As `resolve_device`, for a run that will compute there: a device kind this machine lacks is an error now,
    not a traceback after minutes of set-up."""
    device = resolve_device(requested)
    if device != "cpu" and (present := detect_device()) != device:
        raise UserError(f"trainer.device={device}: this machine has no usable {device} device (torch sees "
                        f"{present} only); set trainer.device={present} or run where there is one")
    return device


def total_memory_bytes(device: str) -> int:
    """The memory of one device (RAM on CPU)."""
    import os

    import torch

    if device == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return getattr(torch, device).mem_get_info()[1]  # torch.cuda and torch.npu (torch_npu) share the call


def device_index(platform: Platform, local_rank: int, environ, assigned_ids: list[str]) -> int:
    """Which of the visible devices a worker takes: the one Ray assigned it where Ray did (counted within the
    visible-devices variable, which Ray narrows to that device unless RAY_EXPERIMENTAL_NOSET_* is set), else
    its rank on the node."""
    if not assigned_ids:
        return local_rank
    visible = [v.strip() for v in environ.get(platform.visible_devices_var or "", "").split(",") if v.strip()]
    if not visible:
        return int(assigned_ids[0])
    if assigned_ids[0] not in visible:
        raise UserError(f"{platform.visible_devices_var}={','.join(visible)} does not list device {assigned_ids[0]}, "
                        f"which Ray gave this worker")
    return visible.index(assigned_ids[0])


def select_worker_device(device: str) -> str:
    """In a worker process: take this worker's device (LOCAL_RANK, or Ray's assignment) and make it current;
    returns the torch device to place tensors on."""
    import os

    import torch

    platform = get_platform(device)
    if platform.name == "cpu":
        return "cpu"
    index = device_index(platform, int(os.environ.get("LOCAL_RANK", "0")), os.environ,
                         _ray_accelerator_ids(platform.ray_resource))
    getattr(torch, platform.name).set_device(index)
    return f"{platform.name}:{index}"


def release_cached_memory(device: str) -> None:
    """Hand the device memory torch's caching allocator keeps for reuse back to the device, for a process
    beside this one (the colocated rollout engine); nothing to do on a CPU."""
    import torch

    kind = torch.device(device).type
    if kind != "cpu":
        getattr(torch, kind).empty_cache()


def _ray_accelerator_ids(resource: str | None) -> list[str]:
    """The accelerator ids Ray assigned to this process (none outside Ray)."""
    if importlib.util.find_spec("ray") is None:
        return []
    import ray

    if not ray.is_initialized():
        return []
    return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get(resource or "", [])]


def make_deterministic(device: str, environ) -> list[str]:
    """trainer.deterministic in this process: the platform's switches in `environ` (where unset), which worker
    processes started later inherit, and torch's deterministic algorithms. Returns the names set."""
    env, defaulted = _with_defaults(_deterministic_env(get_platform(device)), environ)
    environ.update(env)
    follow_deterministic_mode(environ)
    return defaulted


def deterministic_requested(environ) -> bool:
    return environ.get(DETERMINISTIC_VAR) == "1"


def follow_deterministic_mode(environ) -> None:
    """In the driver and in every worker: torch's deterministic algorithms when trainer.deterministic asked
    for them (warn, not fail, on an op without such a kernel)."""
    import torch

    if deterministic_requested(environ):
        torch.use_deterministic_algorithms(True, warn_only=True)


# --- reduced-precision compute on the CPU -------------------------------------------------------------

# The CPU features that make a 16-bit matmul fast: with them, oneDNN runs bf16 at 6-8× fp32's FLOP/s (AMX tiles)
# or ~2× (AVX-512 BF16); without them bf16 is emulated and slower than fp32. x86 names as torch's cpuinfo and
# /proc/cpuinfo spell them; on Arm, /proc/cpuinfo's "bf16" feature.
CPU_UNITS = {"bfloat16": ("amx_bf16", "avx512_bf16", "bf16"), "float16": ("amx_fp16", "avx512_fp16", "fphp")}
_fallbacks_logged: set[str] = set()
DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
               "float16": "float16"}


def dtype_named(key: str, name):
    """The torch dtype verl's spelling `name` means (fp32, float32, bf16, bfloat16, fp16, float16, ...)."""
    import torch

    try:
        return getattr(torch, DTYPE_NAMES[str(name)])
    except KeyError:
        raise UserError(f"{key}={name}: expected one of {', '.join(DTYPE_NAMES)}") from None


def cpu_units(dtype_name: str, capabilities: dict | None = None, cpuinfo: str | None = None) -> list[str]:
    """The CPU's units for `dtype_name` ("bfloat16" or "float16"), best first; empty: none (the arguments
    stand in for torch's cpuinfo and /proc/cpuinfo in tests)."""
    wanted = CPU_UNITS[dtype_name]
    if capabilities is None:
        capabilities = _torch_cpu_capabilities()
    flags = set(cpuinfo.split()) if cpuinfo is not None else _proc_cpuinfo_flags()
    return [unit for unit in wanted if capabilities.get(unit) or unit in flags]


def _torch_cpu_capabilities() -> dict:
    import torch

    try:
        return dict(torch.cpu.get_capabilities())
    except (AttributeError, RuntimeError):  # older torch, or cpuinfo could not read the CPU
        return {}


def _proc_cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {word for line in f if line.startswith(("flags", "Features")) for word in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def compute_dtype(device: str, dtype, key: str):
    """The dtype to compute in for `key`'s setting `dtype` (a torch.dtype): as asked on accelerators and on CPUs
    with 16-bit matmul units; fp32 on a CPU without them, said once per key in one log line."""
    import torch

    names = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
    if device != "cpu" or dtype not in names:
        return dtype
    units = cpu_units(names[dtype])
    if units:
        return dtype
    if key not in _fallbacks_logged:
        _fallbacks_logged.add(key)
        log.warning("%s=%s: this CPU has no %s matmul units (%s), computing in float32", key, names[dtype],
                    names[dtype], " / ".join(CPU_UNITS[names[dtype]]))
    return torch.float32
