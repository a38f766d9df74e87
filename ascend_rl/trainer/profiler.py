"""Profiling chosen training steps (`global_profiler.tool=torch|npu`, `global_profiler.steps=[...]`).

A profiled step gives one trace covering the whole step, with a named range per stage (gen, reward,
old_log_prob, ref, adv, update_actor, update_weights) so the stages line up with `timing_s/*`.
`torch` writes a Chrome trace (chrome://tracing, Perfetto) and a text table of the top operators;
`npu` uses torch_npu's profiler with `actor_rollout_ref.actor.profiler.tool_config.npu` (contents, level,
analysis) and writes what MindStudio Insight reads.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ascend_rl.errors import UserError


def _torch_profile(save_dir: Path, step: int, device: str, npu_options: dict):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def export(prof) -> None:
        prof.export_chrome_trace(str(save_dir / f"step_{step}.trace.json"))
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        (save_dir / f"step_{step}.top_ops.txt").write_text(table)

    return torch.profiler.profile(activities=activities, record_shapes=True, on_trace_ready=export)


def _npu_profile(save_dir: Path, step: int, device: str, npu_options: dict):
    import torch_npu

    prof = torch_npu.profiler
    contents = set(npu_options.get("contents") or ["npu", "cpu"])
    activities = [a for name, a in (("cpu", prof.ProfilerActivity.CPU), ("npu", prof.ProfilerActivity.NPU))
                  if name in contents]
    level = str(npu_options.get("level") or "level1").capitalize()  # level0 → Level0
    return prof.profile(
        activities=activities, record_shapes="shapes" in contents, profile_memory="memory" in contents,
        with_stack="stack" in contents,
        experimental_config=prof._ExperimentalConfig(profiler_level=getattr(prof.ProfilerLevel, level)),
        on_trace_ready=prof.tensorboard_trace_handler(str(save_dir / f"step_{step}"),
                                                      analyse_flag=bool(npu_options.get("analysis", True))))


NO_TORCH_NPU = "global_profiler.tool=npu needs torch_npu; on this machine use global_profiler.tool=torch"
PROFILERS: dict[str, Callable] = {"torch": _torch_profile, "npu": _npu_profile}


class StepProfiler:
    def __init__(self, cfg: DictConfig, device: str):
        g = cfg.global_profiler
        self.tool, self.device = g.tool, device
        self.steps = set(OmegaConf.to_container(g.steps) if g.steps is not None else [])
        self.save_dir = Path(g.save_path)
        self.npu_options = OmegaConf.to_container(cfg.actor_rollout_ref.actor.profiler.tool_config.npu)
        if self.tool == "npu" and self.steps and importlib.util.find_spec("torch_npu") is None:
            raise UserError(NO_TORCH_NPU)  # at start-up, not at the first profiled step

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        if self.tool is None or step not in self.steps:
            yield
            return
        self.save_dir.mkdir(parents=True, exist_ok=True)
        with PROFILERS[self.tool](self.save_dir, step, self.device, self.npu_options):
            yield

