"""Checkpoints: `global_step_N/actor/` (an HF model directory, safetensors, gathered on rank 0),
`global_step_N/actor/dcp/` (model and optimizer as torch.distributed.checkpoint shards, one file per rank:
what a resume reads, with any number of ranks), `global_step_N/trainer_state.pt` (LR schedule, sampler
position, RNG states, step, ...; plain types and tensors only, loaded with `weights_only=True`) and
`global_step_N/manifest.json` (size and SHA-256 of every file), with verl's tracker file
`latest_checkpointed_iteration.txt` beside them. Several nodes need a shared filesystem for
`trainer.default_local_dir`, as DCP does.

A checkpoint is written into a hidden directory and renamed into place; the manifest is its last file, so a
checkpoint without one is incomplete. A resume finds the newest checkpoint whose files match their manifest
from the directories themselves (the tracker is written for verl's tools, never trusted): a truncated or
damaged newest checkpoint is named in the log and the previous complete one is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ascend_rl.errors import UserError, first_line

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
METRICS_FILE = "metrics.jsonl"
_STEP_DIR = re.compile(r"global_step_(\d+)$")


# --- RNG state as plain types, so that trainer_state.pt loads with weights_only=True ------------------

def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


# --- manifests ---------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_all(paths: list[Path]) -> list[str]:
    """Hash files on several threads (hashlib releases the GIL): a checkpoint of many shards hashes at disk
    speed rather than one core's."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, len(paths) or 1)) as pool:
        return list(pool.map(sha256_file, paths))


def write_manifest(directory: Path, step: int | None = None) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": digest}
               for p, digest in zip(files, _sha256_all(files))}
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "step": step, "files": entries}, indent=1))


def read_manifest(directory: Path) -> dict[str, tuple[int, str]]:
    """File name (relative) → (bytes, sha256) as saved."""
    entries = json.loads((directory / MANIFEST).read_text())["files"]
    return {str(name): (int(e["bytes"]), str(e["sha256"])) for name, e in entries.items()}


def verify(directory: Path, only: str = "") -> str | None:
    """Why `directory` does not match its manifest (one line naming the file), or None when it does.
    `only` restricts the check to files under that sub-path (e.g. "actor/" for an export)."""
    manifest = directory / MANIFEST
    try:
        entries = read_manifest(directory)
    except FileNotFoundError:
        return f"{manifest}: missing (the checkpoint is incomplete, or from an ascend-rl before manifests)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{manifest}: unreadable ({type(err).__name__}: {err})"
    checked = {directory / name: entry for name, entry in entries.items() if name.startswith(only)}
    for path, (size, _) in checked.items():  # the cheap checks first
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != size:
            return f"{path}: {path.stat().st_size} bytes, {size} when saved (truncated or damaged)"
    for (path, (_, sha256)), digest in zip(checked.items(), _sha256_all(list(checked))):
        if digest != sha256:
            return f"{path}: content differs from when it was saved (checksum mismatch)"
    return None


# --- saving ------------------------------------------------------------------------------------------

def save_checkpoint(root: Path, step: int, write_models: Callable[[Path], None], state: dict,
                    max_to_keep: int | None = None) -> Path:
    """Write `global_step_{step}`: `write_models(dir)` writes `dir/actor` (and `dir/critic`); a failure (full disk, read-only directory) removes the partial checkpoint,
    keeps every earlier one and raises a one-line UserError."""
    final = root / f"global_step_{step}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=root, prefix=f".global_step_{step}.", suffix=".partial"))
    except OSError as err:
        raise UserError(f"trainer.default_local_dir={root}: cannot write checkpoints there: {err.strerror}") from None
    try:
        write_models(partial)
        torch.save({**state, "step": step}, partial / STATE_FILE)
        write_manifest(partial, step)
        _publish(root, partial, final)
    except OSError as err:
        raise UserError(f"checkpoint of step {step} could not be written to {root} ({err.strerror or err}); "
                        f"earlier checkpoints are kept") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    if max_to_keep:
        for old in checkpoint_dirs(root)[:-max_to_keep]:
            shutil.rmtree(old)
    return final


def _publish(root: Path, partial: Path, final: Path) -> None:
    """Rename the finished checkpoint into place. Re-saving a step (after resuming from an earlier one)
    replaces that step's directory; the tracker never names a directory that is not there."""
    replaced = None
    if final.exists():
        others = [p for p in checkpoint_dirs(root) if p != final]
        _write_tracker(root, others[-1] if others else None)
        replaced = final.rename(final.with_name(f".{final.name}.replaced"))
    try:
        partial.rename(final)
    except OSError:
        if replaced is not None:  # put the old one back: a failed save loses nothing
            replaced.rename(final)
            _write_tracker(root, checkpoint_dirs(root)[-1])
        raise
    _write_tracker(root, final)
    if replaced is not None:
        shutil.rmtree(replaced)


def _write_tracker(root: Path, checkpoint: Path | None) -> None:
    tracker = root / TRACKER
    if checkpoint is None:
        tracker.unlink(missing_ok=True)
        return
    tmp = root / f".{TRACKER}.tmp"
    tmp.write_text(_STEP_DIR.search(checkpoint.name).group(1))
    tmp.replace(tracker)


def check_run_dir(root: Path) -> None:
    """At start-up, not at the first save: `trainer.default_local_dir` must be a directory we can write."""
    key = f"trainer.default_local_dir={root}"
    if root.exists() and not root.is_dir():
        raise UserError(f"{key}: exists and is not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as err:
        raise UserError(f"{key}: cannot write there ({err.strerror or err})") from None


# --- finding what to resume --------------------------------------------------------------------------

def checkpoint_dirs(root: Path) -> list[Path]:
    """Checkpoints under root that have a manifest (finished writing), oldest first; not yet verified."""
    found = [(int(m.group(1)), p) for p in root.glob("global_step_*") if (m := _STEP_DIR.search(p.name))
             and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint whose files all match their manifest; the damaged ones skipped on the way are
    logged, naming the file."""
    for path in reversed(checkpoint_dirs(root)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s; falling back to the previous one", path.name, problem)
    return None


def checkpoint_to_resume(mode: str, root: Path, resume_from_path: str | None) -> Path | None:
    """trainer.resume_mode: auto (newest complete checkpoint under default_local_dir, if any), disable,
    resume_path. Starting afresh where an earlier run left checkpoints or metrics is refused: its files
    would be overwritten."""
    if mode == "resume_path":
        path = Path(resume_from_path or "")
        if not (path / STATE_FILE).is_file() or not (path / "actor").is_dir():
            raise UserError(f"trainer.resume_from_path={resume_from_path}: not a checkpoint (expected a "
                            f"global_step_N directory with {STATE_FILE} and actor/)")
        if problem := verify(path):
            raise UserError(f"trainer.resume_from_path={resume_from_path}: {problem}")
        return path
    path = latest_checkpoint(root) if mode == "auto" else None
    if path is None:
        _refuse_earlier_run(root, mode)
    return path


def _refuse_earlier_run(root: Path, mode: str) -> None:
    earlier = sorted(p.name for p in root.glob("global_step_*")) + \
        [name for name in (METRICS_FILE, TRACKER) if (root / name).exists()]
    if not earlier:
        return
    why = ("trainer.resume_mode=disable" if mode == "disable"
           else "none of its checkpoints is complete to resume from" if any(n.startswith("global_step_") for n in earlier)
           else "it has no checkpoint to resume from")
    shown = ", ".join(earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
    raise UserError(f"trainer.default_local_dir={root} holds an earlier run ({shown}) and {why}: a fresh run "
                    f"would overwrite it; choose a new trainer.default_local_dir (or trainer.experiment_name) "
                    f"or move the earlier run away")


def load_state(path: Path, roles: tuple[str, ...] = ("actor",)) -> dict:
    """trainer_state.pt of a verified checkpoint, as plain types and tensors (no code runs on load), after
    checking each role's shards (`actor`, and `critic` in PPO with a critic) are there."""
    from ascend_rl.workers.trained import DCP_DIR

    for role in roles:
        if not (path / role / DCP_DIR).is_dir():  # FSDP's DCP shards, or Megatron's dist checkpoint
            raise UserError(f"{path}: no {role}/{DCP_DIR}/ shards (model and optimizer state): the checkpoint is "
                            f"incomplete, from an ascend-rl before sharded checkpoints, or from a run without a "
                            f"{role}; its actor/ weights can still be exported or used as actor_rollout_ref.model.path")
    try:
        return torch.load(path / STATE_FILE, weights_only=True)
    except Exception as err:  # unpickling refuses anything but plain types: the file is not one we wrote
        raise UserError(f"{path / STATE_FILE}: cannot load ({type(err).__name__}: {first_line(err)})") from None
