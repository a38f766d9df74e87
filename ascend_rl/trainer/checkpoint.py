"""Checkpoints: `global_step_N/actor/` (an HF model directory, safetensors, gathered on rank 0),
`global_step_N/actor/dcp/` (model and optimizer as torch.distributed.checkpoint shards, one file per rank:
what a resume reads, with any number of ranks) and `global_step_N/trainer_state.pt` (LR schedule, sampler
position, RNG states, step, ...), with verl's tracker file `latest_checkpointed_iteration.txt` beside them.
Several nodes need a shared filesystem for `trainer.default_local_dir`, as DCP does.

A checkpoint is written into a hidden directory and renamed into place, and the tracker is replaced
atomically after it: a crash mid-save leaves the previous checkpoint and tracker intact.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ascend_rl.errors import UserError

TRACKER = "latest_checkpointed_iteration.txt"
STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"global_step_(\d+)$")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(root: Path, step: int, write_model: Callable[[Path], None], state: dict,
                    max_to_keep: int | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"global_step_{step}"
    partial = root / f".global_step_{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    write_model(partial / "actor")
    torch.save({**state, "step": step}, partial / STATE_FILE)
    if final.exists():  # re-saving a step (after a resume): move the old one out of the way first
        stale = root / f".global_step_{step}.stale"
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)
        shutil.rmtree(stale)
    partial.rename(final)
    tracker_tmp = root / f".{TRACKER}.tmp"
    tracker_tmp.write_text(str(step))
    tracker_tmp.replace(root / TRACKER)
    if max_to_keep:
        for old in checkpoint_dirs(root)[:-max_to_keep]:
            shutil.rmtree(old)
    return final


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    found = [(int(m.group(1)), p) for p in root.glob("global_step_*") if (m := _STEP_DIR.search(p.name))
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    tracker = root / TRACKER
    if not tracker.is_file():
        return None
    path = root / f"global_step_{tracker.read_text().strip()}"
    return path if (path / STATE_FILE).is_file() else None


def checkpoint_to_resume(mode: str, root: Path, resume_from_path: str | None) -> Path | None:
    """trainer.resume_mode: auto (latest under default_local_dir, if any), disable, resume_path."""
    if mode == "disable":
        return None
    if mode == "auto":
        return latest_checkpoint(root)
    path = Path(resume_from_path or "")
    if not (path / STATE_FILE).is_file() or not (path / "actor").is_dir():
        raise UserError(f"trainer.resume_from_path={resume_from_path}: not a checkpoint (expected a global_step_N "
                        f"directory with {STATE_FILE} and actor/)")
    return path


def load_state(path: Path) -> dict:
    from ascend_rl.workers.actor import DCP_DIR

    if not (path / "actor" / DCP_DIR / ".metadata").is_file():
        raise UserError(f"{path}: no actor/{DCP_DIR}/ shards (model and optimizer state): the checkpoint is incomplete "
                        f"or from an ascend-rl before sharded checkpoints; its actor/ weights can still be exported "
                        f"or used as actor_rollout_ref.model.path")
    return torch.load(path / STATE_FILE, weights_only=False)
