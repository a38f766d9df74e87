"""Megatron dist checkpoints (`megatron.core.dist_checkpointing`): a model's weights and its optimizer's state
stored by global tensor, so a checkpoint written at one TP/PP/EP layout loads at another. verl's formats:

- weights only (`save_dist_weights`, `load_dist_weights`): one dist checkpoint directory, what verl's
  `scripts/converter_hf_to_mcore.py` and `ascend-rl convert hf-to-mcore` write and
  `actor.megatron.dist_checkpointing_path` names (the model's `sharded_state_dict()`, no content metadata);
- a training checkpoint (`save_dist_checkpoint`, `load_dist_checkpoint`): verl's layout v2, `model/dist_ckpt/`
  and `optimizer/dist_ckpt/` (the optimizer's state under "optimizer"), both with the content metadata verl
  writes and reads back to rebuild the same sharded state dicts. verl's `extra/dist_ckpt/` (RNG states), the LR
  scheduler and `ckpt_contents.json` are the trainer's.

The keys are Megatron's: the local layer spec names its norms as Transformer Engine's layers do
(`self_attention.linear_qkv.layer_norm_weight`), so verl's TE models and ours read each other's checkpoints;
MoE layers' pre-MLP norm is the exception, renamed here. The embedding and output layer load across vocabulary
paddings (Megatron's `allow_shape_mismatch`): verl pads nothing, we pad to a multiple of 128 × TP.

The optimizer's state: a non-distributed optimizer's is stored per model tensor and loads at any layout; the
distributed optimizer's `dp_reshardable` format (verl's default) at the TP/PP/EP it was saved at (any DP), its
`fully_reshardable` one at any (gathered over gloo, Megatron's memory-efficient variant: what works on the CPU).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ascend_rl.errors import UserError, first_line

MODEL_DIR = Path("model", "dist_ckpt")
OPTIMIZER_DIR = Path("optimizer", "dist_ckpt")
LAYOUT_KEY = "ascend_rl_model_parallel"  # content metadata: the layout a dp_reshardable optimizer state needs
OPTIMIZERS_KEY = "ascend_rl_optimizers"  # content metadata: how many optimizers Megatron chained (experts' own)


def save_dist_weights(path: str | os.PathLike, model) -> None:
    """The model's weights as a new dist checkpoint directory at `path` (collective: every rank calls it)."""
    from megatron.core import dist_checkpointing

    with _new_checkpoint_dir(path) as tmp:
        dist_checkpointing.save(_model_state(model, None), str(tmp))


def load_dist_weights(path: str | os.PathLike, model) -> None:
    """The weights of a dist checkpoint directory (ours, or verl's converter's) into `model`, at its layout."""
    path = Path(path)
    _require_checkpoint(path, hint=_training_checkpoint_hint(path))
    _module(model).load_state_dict(_load(path, _model_state(model, None), "model"), strict=True)


def save_dist_checkpoint(path: str | os.PathLike, model, optimizer=None, *, fully_reshardable: bool = False) -> None:
    """A new training checkpoint at `path`: the weights, and the optimizer's state when given (Megatron's, over
    the DistributedDataParallel `model`). `fully_reshardable`: the distributed optimizer's state loads at any
    layout, not only at this TP/PP/EP."""
    from megatron.core import dist_checkpointing

    metadata = _content_metadata(optimizer, fully_reshardable)
    model_state = {"model": _model_state(model, metadata)}  # verl's nesting (its common.pt keeps it)
    saves = [(MODEL_DIR, model_state)]
    if optimizer is not None:  # built before any save, which alters the state dicts it is given
        saves.append((OPTIMIZER_DIR, {"optimizer": optimizer.sharded_state_dict(model_state, metadata=metadata)}))
    with _new_checkpoint_dir(path, [sub for sub, _ in saves]) as tmp:
        for sub, state in saves:
            dist_checkpointing.save(state, str(tmp / sub), content_metadata=metadata)


def load_dist_checkpoint(path: str | os.PathLike, model, optimizer=None) -> None:
    """A training checkpoint (ours or verl's layout v2) into `model` and, when given, `optimizer`."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    model_dir, optimizer_dir = path / MODEL_DIR, path / OPTIMIZER_DIR
    if not path.is_dir():
        raise UserError(f"{path}: no such checkpoint directory")
    _require_checkpoint(model_dir)
    with _reading(model_dir, "model"):
        metadata = dist_checkpointing.load_content_metadata(str(model_dir)) or {}
    if optimizer is not None and _distributed(optimizer):
        # verl's fallback for checkpoints from before Megatron recorded the format
        metadata.setdefault("distrib_optim_sharding_type", "fully_sharded_model_space")
    loaded = _load(model_dir, {"model": _model_state(model, metadata)}, "model")
    _module(model).load_state_dict(loaded["model"], strict=True)
    if optimizer is None:
        return
    _require_checkpoint(optimizer_dir)
    _check_optimizer_layout(optimizer_dir, metadata, optimizer)
    # a new model state dict: loading replaced some of the tensors in the first (the vocabulary's, resized)
    model_state = {"model": _model_state(model, metadata)}
    _init_torch_adam_state(optimizer)
    state = {"optimizer": optimizer.sharded_state_dict(model_state, is_loading=True, metadata=metadata)}
    optimizer.load_state_dict(_load(optimizer_dir, state, "optimizer")["optimizer"])


def refuse_existing_checkpoint(target: str | os.PathLike) -> None:
    """Where a checkpoint is about to be written: nothing, or an empty directory (never over another one)."""
    target = Path(target)
    if os.path.lexists(target) and not (target.is_dir() and not any(target.iterdir())):
        raise UserError(f"{target} exists; a checkpoint is written to a new (or empty) directory and never over "
                        "another one (choose another path or move it away)")


# --- sharded state dicts ---------------------------------------------------------------------------------------


def _module(model):
    """The GPTModel inside DistributedDataParallel / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _model_state(model, metadata: dict | None) -> dict:
    """The model's sharded state dict, with Transformer Engine's key for MoE layers' pre-MLP norm: the local
    spec maps `pre_mlp_layernorm` to `mlp.linear_fc1.layer_norm_weight` in every layer (a dense TE layer's fused
    norm), but TE's MoE layers keep a separate `pre_mlp_layernorm`, which verl's MoE checkpoints hold."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    module = _module(model)
    state = module.sharded_state_dict(metadata=None if metadata is None else dict(metadata))  # Megatron adds to it
    if module.config.num_moe_experts:
        for value in nested_values(state):
            if isinstance(value, ShardedTensor) and value.key == "decoder.layers.mlp.linear_fc1.layer_norm_weight":
                value.key = "decoder.layers.pre_mlp_layernorm.weight"
    return state


def _distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def _init_torch_adam_state(optimizer) -> None:
    """The state torch's Adam makes on its first step, for a distributed optimizer over one that has not stepped:
    Megatron reads the step from each parameter's state before loading over it (TE's and apex's Adam, which
    Megatron expects, keep it in param_groups; without them it uses torch's)."""
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for each in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = each.optimizer
        if isinstance(each, DistributedOptimizer) and isinstance(adam, torch.optim.Adam) and not adam.state:
            each.init_state_fn(adam, each.config)
            for state in adam.state.values():
                state["step"] = torch.tensor(0.0)


def _content_metadata(optimizer, fully_reshardable: bool) -> dict:
    """verl's (MegatronCheckpointManager._build_sharded_state_dict_metadata), plus the model-parallel sizes a
    dp_reshardable optimizer state can be loaded at."""
    from megatron.core import parallel_state

    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if optimizer is not None:
        metadata[OPTIMIZERS_KEY] = len(getattr(optimizer, "chained_optimizers", [optimizer]))
    if optimizer is not None and _distributed(optimizer):
        if fully_reshardable:
            metadata["distrib_optim_sharding_type"] = "fully_reshardable"
            metadata["distrib_optim_fully_reshardable_mem_efficient"] = True  # gathered over gloo
        else:
            metadata["distrib_optim_sharding_type"] = "dp_reshardable"
            metadata[LAYOUT_KEY] = _model_parallel_sizes(parallel_state)
    return metadata


def _model_parallel_sizes(parallel_state) -> dict:
    return {"tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
            "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size()}


def _check_optimizer_layout(path: Path, metadata: dict, optimizer) -> None:
    from megatron.core import parallel_state

    saved, now = metadata.get(OPTIMIZERS_KEY), len(getattr(optimizer, "chained_optimizers", [optimizer]))
    if saved not in (None, now):  # Megatron gives experts an optimizer of their own under expert parallelism
        raise UserError(f"{path}: the optimizer's state was saved as {saved} optimizer(s) and this run has {now}: "
                        "an MoE's experts have an optimizer of their own only with expert_model_parallel_size > 1; "
                        "resume with expert parallelism as it was saved (on or off), or load the weights only")
    saved, now = metadata.get(LAYOUT_KEY), _model_parallel_sizes(parallel_state)
    if metadata.get("distrib_optim_sharding_type") == "dp_reshardable" and saved not in (None, now):
        raise UserError(f"{path}: the distributed optimizer's state was saved at {_sizes(saved)} and loads only "
                        f"there (any data parallel size), not at {_sizes(now)}; save it with fully_reshardable "
                        "(verl: dist_ckpt_optim_fully_reshardable) to change layouts, or load the weights only")


def _sizes(sizes: dict) -> str:
    return ", ".join(f"{name}={n}" for name, n in sizes.items())


# --- reading: one error naming the path, not a traceback from inside Megatron -------------------------------


def _training_checkpoint_hint(path: Path) -> str:
    weights = path / MODEL_DIR
    return f"; it is a training checkpoint: its weights are in {weights}" if weights.is_dir() else ""


def _require_checkpoint(path: Path, hint: str = "") -> None:
    from megatron.core import dist_checkpointing

    if not path.is_dir():
        raise UserError(f"{path}: no such directory (a Megatron dist checkpoint)")
    try:
        is_checkpoint = dist_checkpointing.check_is_distributed_checkpoint(str(path))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: an unreadable Megatron dist checkpoint: {first_line(err)}") from None
    if not is_checkpoint:
        raise UserError(f"{path}: not a Megatron dist checkpoint (no metadata.json){hint}")


def _load(path: Path, state: dict, what: str) -> dict:
    """`dist_checkpointing.load` of `state` from `path` once every tensor it asks for is there in its shape."""
    from megatron.core import dist_checkpointing

    problems = _mismatches(path, state)
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise UserError(f"{path}: the checkpoint does not fit this {what}: {'; '.join(problems[:4])}{more}")
    with _reading(path, what):
        return dist_checkpointing.load(state, str(path))


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Megatron's and torch's errors from the files of a checkpoint that passed the checks (a damaged file) as
    one line; torch's CheckpointException, a BaseException, holds every rank's traceback."""
    import pickle

    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (CheckpointingException, CheckpointException, pickle.UnpicklingError, EOFError) as err:
        failures = getattr(err, "failures", None)
        cause = next(iter(failures.values()))[0] if failures else err
        reason = first_line(cause)  # its type's name when it says nothing
        if reason != type(cause).__name__:
            reason = f"{type(cause).__name__}: {reason}"
        raise UserError(f"{path}: cannot load the {what}, a damaged file? {reason}") from err


def _mismatches(path: Path, state: dict) -> list[str]:
    """What `state` asks for that the checkpoint lacks or holds in another global shape (vocabulary rows aside),
    and the weights it holds that no rank asks for (another architecture). The same list on every rank, so all
    refuse together instead of some waiting in the load's collectives."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensor, apply_factories

    saved = _saved_shapes(path)
    wanted = dict_list_map_outplace(lambda v: v, state)  # the factories are applied to a copy: load applies its own
    apply_factories(wanted)
    problems, asked = [], set()
    for value in nested_values(wanted):
        if not isinstance(value, ShardedBase) or value.key in asked:
            continue
        asked.add(value.key)
        if value.key not in saved:
            problems.append(f"no {value.key}")
        elif isinstance(value, ShardedTensor) and saved[value.key] is not None:
            have, want = saved[value.key], tuple(value.global_shape)
            if have != want and not (value.allow_shape_mismatch and have[1:] == want[1:]):  # vocabulary rows
                problems.append(f"{value.key} is {have}, not {want}")
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, (asked, problems))
    asked = set().union(*(keys for keys, _ in every_rank))
    problems = list(dict.fromkeys(problem for _, found in every_rank for problem in found))
    return problems + [f"unexpected {key}" for key in saved if key not in asked and not key.endswith("._extra_state")]


def _saved_shapes(path: Path) -> dict[str, tuple | None]:
    """The checkpoint's keys: each tensor's global shape (None for objects)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    try:
        metadata = load_sharded_metadata(str(path))
    except Exception as err:  # a foreign or damaged directory fails in as many ways as its files can
        raise UserError(f"{path}: an unreadable Megatron dist checkpoint: {first_line(err)}") from err
    return {v.key: tuple(v.global_shape) if isinstance(v, ShardedTensor) else None for v in metadata.values()}


# --- writing: never over an existing checkpoint ------------------------------------------------------------------


@contextmanager
def _new_checkpoint_dir(path: str | os.PathLike, subdirs: Sequence[Path] = ()) -> Iterator[Path]:
    """A hidden directory beside `path` that every rank writes into, renamed to `path` once all have: a crash
    leaves no half checkpoint under the real name. `path` must not exist, or be empty."""
    import torch.distributed as dist

    target = Path(path)
    refuse_existing_checkpoint(target)
    tmp = _on_rank0(lambda: _make_tmp(target, subdirs))
    try:
        yield tmp
        dist.barrier()  # every rank's shards are written
        _on_rank0(lambda: _rename(tmp, target))
    finally:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)


def _on_rank0(fn):
    """fn() run by rank 0 (the directory is shared): its result, or its UserError, on every rank."""
    import torch.distributed as dist

    outcome = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = (fn(), None)
        except UserError as err:
            outcome[0] = (None, str(err))
    dist.broadcast_object_list(outcome, src=0)
    result, problem = outcome[0]
    if problem:
        raise UserError(problem)
    return result


def _make_tmp(target: Path, subdirs: Sequence[Path]) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
        for sub in subdirs:
            (tmp / sub).mkdir(parents=True)
    except OSError as err:
        raise UserError(f"{target}: cannot create the checkpoint directory: {err.strerror}") from None
    return tmp


def _rename(tmp: Path, target: Path) -> None:
    refuse_existing_checkpoint(target)  # appeared while we wrote
    try:
        tmp.rename(target)  # replaces an empty directory, never a full one
    except OSError as err:
        raise UserError(f"{target}: cannot write the checkpoint there: {err.strerror}") from None
