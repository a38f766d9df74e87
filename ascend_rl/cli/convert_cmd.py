from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ascend_rl.cli.argtypes import DefaultsHelpFormatter

if TYPE_CHECKING:
    import torch

HF_TO_MCORE = """\
a Hugging Face model (Qwen2/Qwen2.5, Qwen3, Llama, Qwen3-MoE) as a Megatron dist checkpoint: what
actor.megatron.use_dist_checkpointing=True with actor.megatron.dist_checkpointing_path=OUTPUT loads, at any
tensor/expert parallel layout. The same directory as verl's scripts/converter_hf_to_mcore.py writes (whose
--hf_model_path and --output_path spellings work here too), in the model's own dtype. One process, on the CPU."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter
    sub = parser.add_subparsers(dest="convert_command", required=True, metavar="WHAT")
    hf = sub.add_parser("hf-to-mcore", help="a Hugging Face model as a Megatron dist checkpoint (verl's converter)",
                        description=HF_TO_MCORE, formatter_class=DefaultsHelpFormatter)
    hf.add_argument("--hf-model", "--hf_model_path", dest="hf_model", required=True, metavar="DIR",
                    help="the Hugging Face model directory (config.json and its weights)")
    hf.add_argument("--output", "--output_path", dest="output", required=True, metavar="DIR",
                    help="the dist checkpoint directory to write (must not exist, or be empty)")
    hf.set_defaults(run=_hf_to_mcore)


def _hf_to_mcore(args: argparse.Namespace) -> int:
    from ascend_rl.workers.megatron.checkpoint import refuse_existing_checkpoint, save_dist_weights
    from ascend_rl.workers.megatron.model import MegatronParallel, build_gpt_model, load_hf_weights

    source, out = Path(args.hf_model), Path(args.output)
    refuse_existing_checkpoint(out)
    config = _hf_config(source)
    _require_megatron()
    state, dtype = _hf_weights(source)
    parallel = MegatronParallel()
    with _megatron_on_cpu(parallel):
        model = build_gpt_model(config, parallel, dtype)
        load_hf_weights(model, state, config, parallel)
        save_dist_weights(out, model)
    print(f"wrote {out} ({config.model_type}, {str(dtype).removeprefix('torch.')}): load it with "
          f"actor.megatron.use_dist_checkpointing=True actor.megatron.dist_checkpointing_path={out}")
    return 0


def _hf_config(source: Path):
    """The model's config, refused unless the converter knows its architecture."""
    import transformers

    from ascend_rl.errors import UserError, first_line
    from ascend_rl.workers.megatron.arch import architecture

    if not source.is_dir():
        raise UserError(f"{source}: no such directory (a Hugging Face model directory)")
    if not (source / "config.json").is_file():
        raise UserError(f"{source}: no config.json; not a Hugging Face model directory")
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{source}/config.json: {first_line(err)}") from None
    try:
        architecture(config)
    except NotImplementedError as err:
        raise UserError(f"{source}: {err}") from None
    return config


def _hf_weights(source: Path) -> tuple[dict, torch.dtype]:
    """The weights by the names transformers gives them (it converts the hub's, e.g. Qwen3-MoE's experts), and
    their dtype: the checkpoint keeps it, as the conversion is then exact."""
    import transformers

    from ascend_rl.errors import UserError, first_line

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    except (OSError, ValueError) as err:
        raise UserError(f"{source}: cannot load the model: {first_line(err)}") from None
    return model.state_dict(), model.dtype


def _require_megatron() -> None:
    import importlib.util

    from ascend_rl.errors import UserError

    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        raise UserError("converting needs megatron-core: pip install 'ascend-rl[megatron]'")


@contextmanager
def _megatron_on_cpu(parallel):
    """Megatron's process groups over a one-process gloo group, undone afterwards, with its CPU patches (for the
    rest of this process): the conversion runs on the CPU whatever the machine has."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from ascend_rl.workers.megatron import cpu_patches
    from ascend_rl.workers.megatron.model import init_model_parallel

    cpu_patches.apply()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        init_model_parallel(parallel)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
