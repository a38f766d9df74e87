"""Patches that let Megatron-core run on a CPU build of torch with gloo: a Megatron run on a laptop (device
cpu), and the tests. Applied only when the training device is the CPU (docs/distributed.md says so); a GPU or NPU
run leaves Megatron as it ships.

Megatron-core assumes CUDA in a few places even on its local (no Transformer Engine) layer spec. Each patch
below replaces one such symbol with the CPU equivalent and says where it bites. They are pinned to the version
they were written against: `missing()` lists the patched symbols that no longer exist (a test fails on any),
and `apply` refuses another version.
"""

from __future__ import annotations

import inspect
import textwrap

import torch

MEGATRON_CORE = "0.16.1"


def _current_device() -> str:
    return "cpu"


def _synchronize(device=None) -> None:
    """Nothing to wait for: CPU work is done when its call returns."""


def _causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _get_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(state)


def _tracker_add(self, name: str, seed: int) -> None:
    """CudaRNGStatesTracker.add with a CPU generator's state (the original reads torch.cuda's)."""
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    self._is_initialized = True
    self.seeds_.add(seed)
    self.states_[name] = torch.Generator().manual_seed(seed).get_state()


def _dtoh_on_cpu(self, point: str, tokens_per_expert=None):
    """MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize without its CUDA side stream: the counts are on
    the CPU already, but the CUDA path also turns the split sizes into numpy arrays, which all_to_all_single
    takes as sizes (a CPU tensor it refuses)."""
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for attr in ("input_splits", "output_splits", "output_splits_tp"):
            if torch.is_tensor(getattr(self, attr)):
                setattr(self, attr, getattr(self, attr).numpy())
    return tokens_per_expert


def _torch_norm(cls, config, hidden_size: int, eps: float = 1e-5, *args, **kwargs):
    """WrappedTorchNorm.__new__ without its refusal of sequence parallelism: a norm is per position, so it
    works on a sequence slice; its weight then gets only this slice's gradient, which Megatron sums over TP
    for parameters tagged `sequence_parallel`, as apex's and TE's norms tag theirs. In the model's dtype, as
    Megatron's own norms are (its 16-bit optimizer keeps fp32 copies of 16-bit parameters only)."""
    norm = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[config.normalization](
        hidden_size, eps=eps, dtype=config.params_dtype)
    for param in norm.parameters():
        param.sequence_parallel = config.sequence_parallel
    return norm


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t.contiguous()


def _gather_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
    """mappings._gather_along_first_dim for gloo, which all-gathers equal sizes only: the pieces are padded to
    the largest and cut back. The MoE dispatcher gathers uneven ones over ETP > 1 under EP (each rank received
    its own count of tokens)."""
    import torch.distributed as dist

    n = group.size()
    if n == 1:
        return input_
    sizes = output_split_sizes or [input_.shape[0]] * n
    out = input_.new_empty(n * max(sizes), *input_.shape[1:])
    # torch 2.13 renamed all_gather_into_tensor (the older name still works there, with a warning)
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, _pad_rows(input_, max(sizes)), group=group)
    return torch.cat([piece[:size] for piece, size in zip(out.chunk(n), sizes)])


def _reduce_scatter_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
    """mappings._reduce_scatter_along_first_dim for gloo, padded likewise (the dispatcher's combine, the
    backward of the gather above)."""
    import torch.distributed as dist

    n = group.size()
    if n == 1:
        return input_
    if input_split_sizes is None:
        assert input_.shape[0] % n == 0, "First dimension of the tensor should be divisible by tensor parallel size"
    sizes = input_split_sizes or [input_.shape[0] // n] * n
    padded = torch.cat([_pad_rows(piece, max(sizes)) for piece in input_.split(sizes)])
    out = input_.new_empty(max(sizes), *input_.shape[1:])
    getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)(out, padded, group=group)
    return out[:sizes[group.rank()]]


# Megatron's optimizer, gradient clipping and schedules write `device='cuda'` (or `.cuda()`) and compare
# `param.type()` with 'torch.cuda.FloatTensor' inside long functions, so these are recompiled from Megatron's own
# source with those literals (and only those) made the CPU's. Each function must still contain one of them
# (`missing` checks).
CUDA_LITERALS = {"device='cuda'": "device='cpu'", 'device="cuda"': 'device="cpu"', "'torch.cuda.": "'torch.",
                 ".cuda()": ".cpu()"}


def _on_cpu(function):
    """`function` recompiled from its source with the CUDA literals replaced; a method's bare `super()` is
    spelled out with its class (a function compiled outside its class body has no __class__ cell)."""
    raw = inspect.unwrap(function)
    source = textwrap.dedent(inspect.getsource(raw))
    for cuda, cpu in CUDA_LITERALS.items():
        source = source.replace(cuda, cpu)
    owner = raw.__qualname__.rpartition(".")[0]
    if owner:
        source = source.replace("super()", f"super({owner}, self)")
    first_line = inspect.getsourcelines(raw)[1]
    source = "\n" * (first_line - 1) + source  # tracebacks point into Megatron's file at the right lines
    namespace: dict = {}
    exec(compile(source, inspect.getsourcefile(raw), "exec"), raw.__globals__, namespace)  # noqa: S102
    function = namespace[raw.__name__]
    function.cuda_original = raw
    return function


def _cuda_literal_functions() -> list[tuple[object, str, object]]:
    """(owner, name, function) of each Megatron function with CUDA literals on the CPU update's path."""
    from megatron.core import utils
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.pipeline_parallel import schedules

    methods = [(optimizer.MixedPrecisionOptimizer, "__init__"), (optimizer.FP32Optimizer, "__init__"),
               # pipeline stages with tied embeddings: the last stage's copy is synced on the device (.cuda())
               (LanguageModule, "setup_embeddings_and_output_layer"),
               (optimizer.Float16OptimizerWithFloat16Params, "__init__"),
               (distrib_optimizer.DistributedOptimizer, "__init__"),
               (distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups")]
    found = [(owner, name, vars(owner)[name]) for owner, name in methods]
    # clip_grads' functions, also imported by name where they are called
    for name in ("get_grad_norm_fp32", "clip_grad_by_total_norm_fp32", "count_zeros_fp32"):
        found += [(module, name, getattr(clip_grads, name)) for module in (clip_grads, optimizer)]
    # Without apex or TE clip_grads computes norms with Megatron's local implementation, kept under its own name.
    found.append((clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm))
    # The schedules count tokens in a tensor made with device="cuda" (get_forward_backward_func returns them by
    # their module names).
    found += [(schedules, name, getattr(schedules, name))
              for name in ("forward_backward_no_pipelining", "forward_backward_pipelining_without_interleaving")]
    return [(owner, name, _original(function)) for owner, name, function in found]


def _original(function):
    """Megatron's function, also after `apply` replaced it (each recompiled one keeps its original)."""
    if isinstance(function, staticmethod):
        return staticmethod(_original(function.__func__))
    return getattr(function, "cuda_original", function)


def _recompiled(owner, name: str, original):
    function = _on_cpu(original.__func__ if isinstance(original, staticmethod) else original)
    return staticmethod(function) if isinstance(original, staticmethod) else function


@torch.no_grad()
def _set_main_param_and_optimizer_states(self, model_param, tensors: dict) -> None:
    """DistributedOptimizer's, for torch's Adam (without TE or apex, so no precision-aware optimizer), whose state
    holds a per-parameter `step`. load_state_dict restores it from param_groups just before this, as one tensor
    shared by every parameter (which Adam would advance once per parameter per step: each gets its own here),
    and the original then copies over it what `tensors` holds: nothing in the fully reshardable format
    (KeyError), the stale step of the template the load filled in the dp_reshardable one. Also without
    autograd: the fp32 main params are views of parameters that require grad."""
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    state = self.optimizer.state[main_param]
    if "step" in state:
        state["step"] = state["step"].clone()
    for key, dst in {"param": main_param, **state}.items():
        if key != "step":
            dst.copy_(tensors[key])


def patches() -> list[tuple[object, str, object]]:
    """(owner, attribute, CPU replacement) for each CUDA-ism the tests reach."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import mappings, random
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return [
        # Where Megatron allocates "on the current device": RotaryEmbedding.get_emb moves inv_freq there,
        # GlobalMemoryBuffer.get_tensor allocates the attention-score buffer there.
        (torch.cuda, "current_device", _current_device),
        # Dist checkpointing waits for its non-blocking device-to-host copies (FileSystemWriterAsync.preload_tensors).
        (torch.cuda, "synchronize", _synchronize),
        # The causal mask of the unfused softmax is built with device="cuda" (imported by name).
        (fused_softmax, "get_default_causal_mask", _causal_mask),
        # model_parallel_cuda_manual_seed and the RNG tracker's fork (dropout regions, recompute) save and
        # restore the CUDA generator; on CPU the tracked streams are CPU generator states.
        (random, "_get_cuda_rng_state", _get_rng_state),
        (random, "_set_cuda_rng_state", _set_rng_state),
        (random.CudaRNGStatesTracker, "add", _tracker_add),
        # The local spec's norm (torch's, without apex or TE) asserts that sequence parallelism is off.
        (WrappedTorchNorm, "__new__", _torch_norm),
        # The MoE all-to-all dispatcher creates a torch.cuda.Stream for its device-to-host copies (a class
        # attribute, made once when None) and uses it on every dispatch.
        (MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream", "no stream on the CPU"),
        (MoEAlltoAllTokenDispatcher, "_maybe_dtoh_and_synchronize", _dtoh_on_cpu),
        # Without Transformer Engine the router's gating GEMM reads `te_general_gemm`, which the failed TE
        # import left undefined (not CPU-specific: any machine without TE). None selects its torch.mm path.
        (moe_utils, "te_general_gemm", None),
        # Expert parallelism: gloo all-gathers and reduce-scatters equal-sized pieces only, and the dispatcher
        # moves uneven ones over the expert-tensor-parallel group (the tokens each rank got from the all-to-all).
        (mappings, "_gather_along_first_dim", _gather_first_dim),
        (mappings, "_reduce_scatter_along_first_dim", _reduce_scatter_first_dim),
        # The optimizer, gradient clipping and norms: their CUDA literals (see CUDA_LITERALS).
        *((owner, name, _recompiled(owner, name, original)) for owner, name, original in _cuda_literal_functions()),
        # Dist checkpoints (checkpoint.py): loading the distributed optimizer's state into torch's Adam, which
        # Megatron uses without apex or TE (see the function; not CUDA-specific, but a CPU has neither).
        (DistributedOptimizer, "_set_main_param_and_optimizer_states", _set_main_param_and_optimizer_states),
    ]


def missing() -> list[str]:
    """The patched symbols this Megatron-core no longer has or uses (each patch would silently do nothing)."""
    from megatron.core.transformer.moe import moe_utils

    # vars(), not hasattr: a class's own __new__ or method, not one it would inherit.
    gone = [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name, _ in patches()
            if owner is not moe_utils and name not in vars(owner)]
    if "te_general_gemm" not in moe_utils.RouterGatingLinearFunction.forward.__code__.co_names:
        gone.append("te_general_gemm in RouterGatingLinearFunction.forward")
    gone += [f"a CUDA literal in {getattr(owner, '__name__', owner)}.{name}"
             for owner, name, original in _cuda_literal_functions()
             if not any(cuda in inspect.getsource(inspect.unwrap(getattr(original, "__func__", original)))
                        for cuda in CUDA_LITERALS)]
    return gone


def apply(monkeypatch=None) -> None:
    """Install every patch, for the rest of the process, or through `monkeypatch` (pytest's: undone after
    the test). Idempotent."""
    import megatron.core

    if megatron.core.__version__ != MEGATRON_CORE:
        raise RuntimeError(f"ascend-rl's CPU patches are written for megatron-core {MEGATRON_CORE}, "
                           f"found {megatron.core.__version__}: pip install 'megatron-core=={MEGATRON_CORE}'")
    for owner, name, value in patches():
        if monkeypatch is not None:
            monkeypatch.setattr(owner, name, value, raising=False)  # te_general_gemm may not exist
        else:
            setattr(owner, name, value)
