from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run directory (its latest checkpoint) or a global_step_N directory")
    parser.add_argument("out", help="where to write the Hugging Face model directory (must not exist)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from ascend_rl.errors import UserError
    from ascend_rl.trainer.checkpoint import latest_checkpoint
    from ascend_rl.workers.actor import DCP_DIR

    source, out = Path(args.checkpoint), Path(args.out)
    step_dir = source if (source / "actor").is_dir() else latest_checkpoint(source)
    if step_dir is None:
        raise UserError(f"{source}: neither a global_step_N checkpoint nor a run directory with a complete one")
    model = step_dir / "actor"
    if not (model / "config.json").is_file() or not list(model.glob("*.safetensors")):
        raise UserError(f"{model}: no config.json and safetensors weights; the checkpoint is incomplete")
    if out.exists():
        raise UserError(f"{out} exists; export writes a new directory and never overwrites one")
    # Checkpoints hold whole tensors gathered from every rank, so the model directory is already an HF one;
    # the sharded training state beside them is not part of a model.
    shutil.copytree(model, out, ignore=shutil.ignore_patterns(DCP_DIR))
    print(f"exported {model} to {out} (load it with transformers' from_pretrained, or serve it: "
          f"ascend-rl serve --model-path {out})")
    return 0
