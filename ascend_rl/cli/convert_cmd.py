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


MCORE_TO_HF = """\
a Megatron dist checkpoint as a Hugging Face model directory (safetensors, config, tokenizer), what verl's
`python -m verl.model_merger merge --backend megatron` does (its --local_dir, --target_dir and
--hf_model_config_path spellings work here too). LOCAL_DIR is a training checkpoint in verl's layout
(model/dist_ckpt inside: verl's actor/ directory, or ascend-rl's actor/dcp/) or a weights-only one (what
hf-to-mcore writes), saved at any tensor/expert parallel layout. The Hugging Face config (and tokenizer) comes
from --hf-config, else from LOCAL_DIR/model/huggingface (verl's layout), LOCAL_DIR/huggingface, or the
ascend-rl actor/ directory around a dcp/ one. One process, on the CPU."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


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
    mcore = sub.add_parser("mcore-to-hf", description=MCORE_TO_HF, formatter_class=DefaultsHelpFormatter,
                           help="a Megatron dist checkpoint as a Hugging Face model (verl's model_merger)")
    mcore.add_argument("--local-dir", "--local_dir", dest="local_dir", required=True, metavar="DIR",
                       help="the dist checkpoint: a training checkpoint (model/dist_ckpt inside) or a weights-only one")
    mcore.add_argument("--target-dir", "--target_dir", dest="target_dir", required=True, metavar="DIR",
                       help="the Hugging Face model directory to write (must not exist)")
    mcore.add_argument("--hf-config", "--hf_model_config_path", dest="hf_config", default=None, metavar="DIR",
                       help="the model's config.json (and tokenizer) directory; default: found beside the checkpoint")
    mcore.set_defaults(run=_mcore_to_hf)


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


def _mcore_to_hf(args: argparse.Namespace) -> int:
    from ascend_rl.files import new_dir, refuse_existing
    from ascend_rl.workers.megatron.checkpoint import MODEL_DIR, load_dist_checkpoint, load_dist_weights
    from ascend_rl.workers.megatron.gather import hf_weights
    from ascend_rl.workers.megatron.model import MegatronParallel, build_gpt_model

    source, out = Path(args.local_dir), Path(args.target_dir)
    refuse_existing(out, "ascend-rl convert mcore-to-hf")
    config_dir = _config_dir(source, args.hf_config)
    config = _hf_config(config_dir)
    _require_megatron()
    dtype = _config_dtype(config, config_dir)
    parallel = MegatronParallel()
    with _megatron_on_cpu(parallel):
        model = build_gpt_model(config, parallel, dtype)
        training = (source / MODEL_DIR).is_dir()
        (load_dist_checkpoint if training else load_dist_weights)(source, model)
        state = {name: tensor.clone() for name, tensor in hf_weights(model, config)}
    with new_dir(out, "ascend-rl convert mcore-to-hf") as tmp:
        from huggingface_hub import save_torch_state_dict

        save_torch_state_dict(state, tmp)
        config.save_pretrained(tmp)
        tokenizer = _copy_tokenizer(config_dir, tmp)
    print(f"wrote {out} ({config.model_type}, {str(dtype).removeprefix('torch.')}, from the "
          f"{'training' if training else 'weights-only'} checkpoint {source}; "
          f"{'tokenizer from ' + str(config_dir) if tokenizer else 'no tokenizer: ' + str(config_dir) + ' has none'})")
    return 0


def _config_dir(source: Path, given: str | None) -> Path:
    """--hf-config, else the first of verl's and ascend-rl's places for it that holds a config.json."""
    from ascend_rl.errors import UserError
    from ascend_rl.workers.trained import DCP_DIR

    if given is not None:
        return Path(given)
    if not source.is_dir():
        raise UserError(f"{source}: no such directory (a Megatron dist checkpoint)")
    places = [source / "model" / "huggingface", source / "huggingface"]
    if source.name == DCP_DIR:
        places.append(source.parent)  # ascend-rl's checkpoint: actor/ holds the HF export beside actor/dcp/
    for place in places:
        if (place / "config.json").is_file():
            return place
    raise UserError(f"{source}: no Hugging Face config beside it (looked in {', '.join(map(str, places))}); "
                    f"pass --hf-config DIR (the model's config.json directory)")


def _config_dtype(config, config_dir: Path) -> torch.dtype:
    """The dtype the config names (transformers 5's `dtype`, 4's `torch_dtype`), fp32 if none."""
    import torch

    from ascend_rl.platform import dtype_named

    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return named if isinstance(named, torch.dtype) else dtype_named(f"{config_dir}/config.json dtype", named)


def _copy_tokenizer(config_dir: Path, target: Path) -> bool:
    """The tokenizer and generation config beside the config, as verl's merger saves them; False without one."""
    import transformers

    from ascend_rl.errors import UserError, first_line

    # transformers builds an empty tokenizer of the config's class from a directory with none: look first
    if not any((config_dir / name).is_file() for name in TOKENIZER_FILES):
        return False
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(config_dir)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{config_dir}: cannot load its tokenizer: {first_line(err)}") from None
    tokenizer.save_pretrained(target)
    if (config_dir / "generation_config.json").is_file():
        transformers.GenerationConfig.from_pretrained(config_dir).save_pretrained(target)
    return True


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
