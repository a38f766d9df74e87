from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run directory (its latest complete checkpoint) or a global_step_N directory")
    parser.add_argument("out", help="where to write the Hugging Face model directory (must not exist)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from ascend_rl.errors import UserError
    from ascend_rl.files import new_dir, refuse_existing
    from ascend_rl.trainer.checkpoint import latest_checkpoint, verify
    from ascend_rl.workers.actor import DCP_DIR

    source, out = Path(args.checkpoint), Path(args.out)
    refuse_existing(out, "ascend-rl export")
    if (source / "actor").is_dir():
        # What is shipped must be what training saved: every file of actor/ against the checkpoint's manifest.
        if problem := verify(source, only="actor/"):
            raise UserError(f"cannot export {source}: {problem}")
        step_dir = source
    else:  # latest_checkpoint verifies what it returns
        step_dir = latest_checkpoint(source)
        if step_dir is None:
            raise UserError(f"{source}: neither a global_step_N checkpoint nor a run directory with a complete one")
    model = step_dir / "actor"
    if not (model / "config.json").is_file() or not list(model.glob("*.safetensors")):
        raise UserError(f"{model}: no config.json and safetensors weights; the checkpoint is incomplete")
    # Checkpoints hold whole tensors gathered from every rank, so the model directory is already an HF one;
    # the sharded training state beside them is not part of a model.
    with new_dir(out, "ascend-rl export") as tmp:
        shutil.copytree(model, tmp, ignore=shutil.ignore_patterns(DCP_DIR), dirs_exist_ok=True)
        if problem := _copy_differs(tmp, step_dir):
            raise UserError(f"export of {model} is not an exact copy: {problem}")
    print(f"exported {model} to {out} (load it with transformers' from_pretrained, or serve it: "
          f"ascend-rl serve --model-path {out})")
    return 0


def _copy_differs(copy, step_dir) -> str | None:
    """Each copied file against the checkpoint's manifest (verified just before): a copy cut short by a full
    disk or changed by a failing device is caught here, not by whoever loads the model."""
    from ascend_rl.trainer.checkpoint import read_manifest, sha256_file

    saved = read_manifest(step_dir)
    for path in sorted(p for p in copy.rglob("*") if p.is_file()):
        name = f"actor/{path.relative_to(copy)}"
        if saved.get(name) != (path.stat().st_size, sha256_file(path)):
            return f"{name} differs from the checkpoint's"
    return None
