"""The rollout engine a config asks for: backend (`rollout.name`) × how it is reached (`rollout.launch`).

- engine: in the trainer process (NativeEngine, or sglang.Engine);
- server: an HTTP server the trainer starts (`ascend-rl serve`, or `python -m sglang.launch_server`) and stops;
- launch.url: attach to a running SGLang-compatible server (either kind).

Each comes with how the trainer's weights reach it (in buckets) and how to shut it down. With several devices
and an engine in process, the engines live in the actor's workers instead (`rollout.colocated`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from ascend_rl.errors import UserError
from ascend_rl.rollout.weight_sync import DiskPush, DistributedPush, PushStats, TensorPush


@dataclass
class Rollout:
    engine: object  # the rollout protocol
    push_weights: Callable  # named tensors → PushStats
    description: str
    server: object | None = None  # a ServerProcess the trainer started

    def sync_from(self, actor) -> PushStats:
        """The actor's current weights into the engine."""
        return self.push_weights(actor.named_weights())

    def close(self) -> None:
        """The weight group first (it needs the server), then the engine, then the server process."""
        for part in (self.push_weights, self.engine, self.server):
            close = getattr(part, "close", None)
            if close is not None:
                close()


def native_engine_kwargs(cfg: DictConfig, device: str) -> dict:
    """NativeEngine.from_pretrained's settings from the rollout config."""
    ro = cfg.actor_rollout_ref.rollout
    return dict(max_num_seqs=ro.max_num_seqs, max_num_batched_tokens=ro.max_num_batched_tokens,
                memory_utilization=ro.gpu_memory_utilization, context_length=ro.max_model_len,
                load_format=ro.load_format, dtype=rollout_dtype(cfg, device))


def rollout_dtype(cfg: DictConfig, device: str):
    """The native engine's weights and compute: `rollout.dtype` (verl's and SGLang's default bfloat16), fp32 on a
    CPU without 16-bit matmul units."""
    from ascend_rl.platform import compute_dtype, dtype_named

    key = "actor_rollout_ref.rollout.dtype"
    return compute_dtype(device, dtype_named(key, cfg.actor_rollout_ref.rollout.dtype), key)


def build_rollout(cfg: DictConfig, device: str, out_dir: Path) -> Rollout:
    ro = cfg.actor_rollout_ref.rollout
    if ro.launch.url:
        return _attach(cfg, ro.launch.url, device, out_dir)
    builder = BUILDERS.get((ro.name, ro.launch.mode))
    if builder is None:
        raise UserError(f"actor_rollout_ref.rollout.name={ro.name} with launch.mode={ro.launch.mode} is not built; "
                        f"have {', '.join(f'{n}/{m}' for n, m in BUILDERS)}")
    return builder(cfg, device, out_dir)


def bucket_megabytes(cfg: DictConfig) -> int:
    return cfg.actor_rollout_ref.rollout.checkpoint_engine.update_weights_bucket_megabytes


def _native_engine(cfg: DictConfig, device: str, out_dir: Path) -> Rollout:
    from ascend_rl.rollout.native import NativeEngine

    engine = NativeEngine.from_pretrained(cfg.actor_rollout_ref.model.path, device, **native_engine_kwargs(cfg, device))
    return Rollout(engine, TensorPush(engine, bucket_megabytes(cfg)), f"native engine on {device}")


def _native_server(cfg: DictConfig, device: str, out_dir: Path) -> Rollout:
    from ascend_rl.rollout.server_process import free_port

    ro = cfg.actor_rollout_ref.rollout
    port = free_port()
    argv = [sys.executable, "-m", "ascend_rl", "serve", "--model-path", cfg.actor_rollout_ref.model.path,
            "--port", str(port), "--device", device, "--dtype", str(rollout_dtype(cfg, device)).removeprefix("torch."),
            "--max-running-requests", str(ro.max_num_seqs),
            "--max-prefill-tokens", str(ro.max_num_batched_tokens),
            "--mem-fraction-static", str(ro.gpu_memory_utilization), "--load-format", ro.load_format,
            "--skip-tokenizer-init",  # the trainer sends and reads token ids: no text to decode per output
            # the server loads pushed weights only from where the trainer writes them (DiskPush)
            "--weights-root", str((out_dir / "rollout_weights").resolve())]
    if ro.max_model_len:
        argv += ["--context-length", str(ro.max_model_len)]
    return _launched(cfg, argv, port, {}, device, out_dir, "native server")


def _sglang_engine(cfg: DictConfig, device: str, out_dir: Path) -> Rollout:
    from ascend_rl.rollout.sglang.engine import SGLangEngine

    plan = _server_args(cfg, device)
    os.environ.update(plan.env)  # the Engine's scheduler processes inherit the trainer's environment
    engine = SGLangEngine(plan.kwargs)
    return Rollout(engine, TensorPush(engine, bucket_megabytes(cfg)), f"sglang.Engine on {device}")


def _sglang_server(cfg: DictConfig, device: str, out_dir: Path) -> Rollout:
    from ascend_rl.rollout.server_process import cli_args, free_port

    plan = _server_args(cfg, device)
    port = free_port()
    argv = [sys.executable, "-m", "sglang.launch_server", *cli_args({**plan.kwargs, "host": "127.0.0.1",
                                                                    "port": port})]
    return _launched(cfg, argv, port, plan.env, device, out_dir, "sglang.launch_server")


def _server_args(cfg: DictConfig, device: str):
    from ascend_rl.config.layout import compute_layout
    from ascend_rl.rollout.sglang.fields import current_fields
    from ascend_rl.rollout.sglang.server_args import plan_server_args

    plan = plan_server_args(cfg, compute_layout(cfg, device).rollout, device, current_fields(), os.environ)
    if plan.errors:
        raise UserError(plan.errors)
    return plan


def _launched(cfg: DictConfig, argv: list[str], port: int, env: dict, device: str, out_dir: Path,
              what: str) -> Rollout:
    from ascend_rl.rollout.server_process import ServerProcess

    url = f"http://127.0.0.1:{port}"
    server = ServerProcess(argv, url, out_dir / "rollout_server.log", env)
    server.wait_until_healthy(cfg.actor_rollout_ref.rollout.launch.startup_timeout_s)
    rollout = _http_rollout(cfg, url, device, out_dir, f"{what} at {url}")
    rollout.server = server
    return rollout


def _attach(cfg: DictConfig, url: str, device: str, out_dir: Path) -> Rollout:
    from ascend_rl.rollout.http_client import HttpEngine, HttpEngineError

    try:
        HttpEngine(url).wait_until_healthy(cfg.actor_rollout_ref.rollout.launch.startup_timeout_s)
    except HttpEngineError as err:
        raise UserError(f"actor_rollout_ref.rollout.launch.url={url}: {err}") from None
    return _http_rollout(cfg, url, device, out_dir, f"server at {url}")


def _http_rollout(cfg: DictConfig, url: str, device: str, out_dir: Path, description: str) -> Rollout:
    from ascend_rl.rollout.http_client import HttpEngine
    from ascend_rl.rollout.sglang.fields import installed_version

    ro = cfg.actor_rollout_ref.rollout
    engine = HttpEngine(url, tp_size=ro.tensor_model_parallel_size * ro.data_parallel_size)
    transport = ro.launch.weight_transport
    if transport == "auto":  # device IPC handles need SGLang on both sides and a device to share
        transport = "tensor" if ro.name == "sglang" and device != "cpu" and installed_version() else "disk"
    if transport == "tensor":
        push = TensorPush(engine, bucket_megabytes(cfg))
    elif transport == "distributed":
        from ascend_rl.platform import get_platform
        from ascend_rl.rollout.weight_group import address_towards

        push = DistributedPush(engine, get_platform(device).comm_backend, address_towards(url), bucket_megabytes(cfg),
                               server_ranks=engine.tp_size)
    else:
        push = DiskPush(engine, out_dir / "rollout_weights", cfg.actor_rollout_ref.model.path, bucket_megabytes(cfg))
    return Rollout(engine, push, f"{description} (weights by {transport})")


BUILDERS = {
    ("native", "engine"): _native_engine,
    ("native", "server"): _native_server,
    ("sglang", "engine"): _sglang_engine,
    ("sglang", "server"): _sglang_server,
}
