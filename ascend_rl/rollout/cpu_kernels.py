"""Fused CPU kernels for the native engine's decode step (`csrc/decode_kernels.cpp`: RMS norm, q/k/v with
rotary embedding into the KV cache, single-token attention, SiLU gate, Gumbel-max sampling).

Compiled at first use with torch's extension builder (g++, ninja; ~10 s) for this machine's instruction set and
cached under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). Where no compiler is at hand, or with
ASCEND_RL_CPU_KERNELS=0, the engine runs the same math as eager ATen ops and one log line says so.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode_kernels.cpp"
SWITCH_ENV = "ASCEND_RL_CPU_KERNELS"  # "0": eager ops only
DTYPES = (torch.float32, torch.bfloat16)
# decode_step's row split (each thread runs the whole step on its rows) only for models up to this size: every
# thread then reads all the weights, cheap while they stay in a CPU's last-level cache, a multiple of the
# memory traffic beyond it.
ROW_SPLIT_MAX_BYTES = 16 * 2**20
# -march=native: built where it runs (the build is cached per machine type, see _machine_tag); no
# -ffast-math: the kernels rely on inf for masked keys.
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]


@functools.cache
def loaded() -> bool:
    """Builds (once per machine type) and loads the kernels; False, with one log line, where that fails."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        log.info("%s=0: the native engine decodes with eager ATen ops", SWITCH_ENV)
        return False
    from torch.utils.cpp_extension import load

    _put_ninja_on_path()
    name = f"ascend_rl_decode_{_machine_tag()}"
    log.info("loading the CPU decode kernels (built once per machine type, ~10 s)")
    try:
        load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False)
    except Exception as err:  # no compiler, no ninja, a read-only cache: the eager ops still work
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning("CPU decode kernels not built (%s); the native engine decodes with eager ATen ops "
                    "(slower on small models; set %s=0 to skip the attempt)", reason, SWITCH_ENV)
        return False
    return True


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors (on the CPU, in float32 or bfloat16) and are built."""
    return all(t.device.type == "cpu" and t.dtype in DTYPES for t in tensors) and loaded()


def _put_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the pip package's binary sits in the environment's bin, which is not
    on PATH when the interpreter is run by its full path without activating the environment."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _machine_tag() -> str:
    """The build is for this CPU's instruction set: a cache shared by different machines keeps one per flag set."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = "unknown"
    source = SOURCE.read_bytes()
    return hashlib.sha256(flags.encode() + source).hexdigest()[:12]


def decode_step(ids, embedding, weights: list, k_caches: list, v_caches: list, positions, inv_freq,
                rope_scale: float, key_mask, column: int, final_norm, lm_head, lm_head_bias, eps: float,
                split_rows: bool) -> torch.Tensor:
    """One token per row [rows] → next-token logits [rows, V]: the embedding, every decoder layer (the ops below)
    writing its K and V to `column`, the final norm and the LM head, in one call. `weights`: each layer's 18
    parameters in `lean_decoder.layer_weights` order, None where the model has none. `split_rows`: each thread
    runs the whole step on its share of the rows (see `splits_rows`) rather than every op splitting its work."""
    return torch.ops.ascend_rl_decode.decode_step(ids, embedding, weights, k_caches, v_caches, positions, inv_freq,
                                                  rope_scale, key_mask, column, final_norm, lm_head, lm_head_bias, eps,
                                                  split_rows)


def splits_rows(parameters) -> bool:
    """Whether a model with these parameters decodes with its rows split between threads: one parallel region
    per step instead of ~40 (the cost that dominates a small model's step), at the price of every thread reading
    every weight."""
    return sum(p.numel() * p.element_size() for p in parameters) <= ROW_SPLIT_MAX_BYTES


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.ascend_rl_decode.rms_norm(x, weight, eps)


def decode_qkv(q, k, v, q_norm, k_norm, cos, sin, k_cache, v_cache, column: int, eps: float) -> torch.Tensor:
    """One token per row: q, k, v projections [rows, heads × dim] → rotated q [rows, heads, dim] in float32;
    k (normalized with `k_norm` if given, rotated) and v are written to the cache's `column`. `cos`, `sin`:
    [rows, dim / 2] at each row's position."""
    return torch.ops.ascend_rl_decode.decode_qkv(q, k, v, q_norm, k_norm, cos, sin, k_cache, v_cache, column, eps)


def decode_attention(q, k_cache, v_cache, key_mask, length: int) -> torch.Tensor:
    """q [rows, heads, dim] over the cache's first `length` columns → [rows, heads × dim] in the cache's dtype."""
    return torch.ops.ascend_rl_decode.decode_attention(q, k_cache, v_cache, key_mask, length)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.ops.ascend_rl_decode.silu_mul(gate, up)


def sample_gumbel(logits, seeds, steps, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.ascend_rl_decode.sample_gumbel(logits, seeds, steps, temperature)
