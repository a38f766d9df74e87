"""Megatron on CUDA (`pytest -m cuda`; skipped where torch.cuda.is_available() is False or megatron-core is not
installed): one rank on nccl with the model on the GPU and every offload switch on. Its log-probs, update and
weights equal the same rank's on the CPU (fp32, TF32 off); between calls the weights, gradients and optimizer
state are off the GPU (`torch.cuda.memory_allocated` drops by their bytes). scripts/device_check.sh runs it.

ASCEND_RL_CUDA_TESTS_ON_CPU=1 runs the same logic on the CPU (the offload then moves CPU storages to other CPU
buffers; the allocator's counters are CUDA's only)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from test_distributed import fixed_batch  # noqa: E402
from test_megatron_actor import FSDP_OPTIM, MEGATRON_OPTIM, SETTINGS  # noqa: E402
from test_megatron_offload import held  # noqa: E402

from ascend_rl.distributed.worker_group import ProcessWorkerGroup  # noqa: E402
from ascend_rl.platform import get_platform  # noqa: E402
from ascend_rl.workers.actor import Actor  # noqa: E402
from ascend_rl.workers.megatron.engine import MegatronEngine  # noqa: E402
from ascend_rl.workers.megatron.offload import MegatronOffload  # noqa: E402

ON_CPU = os.environ.get("ASCEND_RL_CUDA_TESTS_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
                              "ASCEND_RL_CUDA_TESTS_ON_CPU=1 runs their logic on the CPU"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


class MegatronDeviceWorker:
    """One rank of the Megatron actor on its device, as the trainer's worker builds it (device selection, the
    device kind's adaptor), with every offload switch on where `offload`."""

    def __init__(self, rank: int, world_size: int, model_dir: str, device: str, offload: bool):
        from ascend_rl.platform import select_worker_device
        from ascend_rl.workers.megatron import adaptors
        from ascend_rl.workers.megatron.actor import MegatronActor

        own = select_worker_device(device)
        engine = MegatronEngine(offload=MegatronOffload(params=offload, grads=offload, optimizer=offload))
        adaptors.adapt(torch.device(own).type, engine.parallel)
        self.actor = MegatronActor(model_dir, SETTINGS, MEGATRON_OPTIM, engine, own)
        self.device = own

    def run(self, batch) -> dict:
        actor = self.actor
        out = {"log_probs": actor.log_probs(batch)[0], "metrics": [actor.update(batch) for _ in range(2)],
               "weights": {name: t.to("cpu", copy=True) for name, t in actor.named_weights()},
               "devices": sorted({p.device.type for p in actor.model.module.parameters()})}
        with actor.weights.resident(), actor.optimizer_state.resident():
            out["resident"] = held(actor)
            out["allocated_inside"] = _allocated(self.device)
        out["allocated_outside"] = _allocated(self.device)
        return out


def _allocated(device: str) -> int:
    return torch.cuda.memory_allocated(device) if torch.device(device).type == "cuda" else 0


def run(model_dir, batch, device: str, offload: bool) -> dict:
    group = ProcessWorkerGroup(1, "test_cuda_megatron:MegatronDeviceWorker",
                               dict(model_dir=str(model_dir), device=device, offload=offload),
                               backend=get_platform(device).process_group_backend)
    try:
        return group.call_all("run", batch)[0]
    finally:
        group.close()


@pytest.mark.timeout(300)
def test_megatron_on_the_device_with_offload_makes_the_cpu_run(tiny_model_dir, record_property):
    batch = fixed_batch(Actor(str(tiny_model_dir), "cpu", SETTINGS, FSDP_OPTIM))
    on_device = run(tiny_model_dir, batch, DEVICE, offload=True)
    on_cpu = run(tiny_model_dir, batch, "cpu", offload=False)
    assert on_device["devices"] == [DEVICE]
    mask = batch["response_mask"]
    diff = ((on_device["log_probs"] - on_cpu["log_probs"]) * mask).abs().max().item()
    record_property("megatron_device_vs_cpu_logprob_diff_max", diff)
    assert diff < 1e-4
    for mine, theirs in zip(on_device["metrics"], on_cpu["metrics"]):
        for key in ("actor/pg_loss", "actor/grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), key
    for name, tensor in on_cpu["weights"].items():
        assert torch.allclose(on_device["weights"][name], tensor, atol=1e-4), name
    resident = sum(on_device["resident"].values())
    assert on_device["resident"]["optimizer"] > 0 and on_device["resident"]["grads"] > 0
    freed = on_device["allocated_inside"] - on_device["allocated_outside"]
    record_property("megatron_offload_freed_bytes", freed)
    if DEVICE == "cuda":
        assert freed >= 0.9 * resident, (freed, resident)
