"""Megatron's offload (ascend_rl/workers/megatron/offload.py): storages emptied into host memory and refilled in
place, views kept; an actor and a reference with every offload switch on make exactly the run they make without,
and hold no weights, gradients or optimizer state between calls. On a CPU the "host copy" is another CPU buffer:
the mechanism is the same as on an accelerator, only nothing is gained."""

from __future__ import annotations

import pytest
import torch

from ascend_rl.workers.megatron.offload import Offloaded, Part, storages


def test_an_emptied_storage_comes_back_in_place_with_its_views():
    buffer = torch.arange(12.0)
    views = [buffer[:4], buffer[4:].view(2, 4)]
    offloaded = Offloaded([Part(lambda: views)], "cpu")
    offloaded.offload()
    assert buffer.untyped_storage().nbytes() == 0  # one storage under both views
    with offloaded.resident():
        assert torch.equal(buffer, torch.arange(12.0))
        views[1][0, 0] = -1.0  # written through a view while resident...
        with offloaded.resident():  # ...a nested block moves nothing
            assert buffer[4] == -1.0
        assert buffer.untyped_storage().nbytes() == 48
    assert buffer.untyped_storage().nbytes() == 0
    with offloaded.resident():
        assert buffer[4] == -1.0 and views[1].data_ptr() == buffer.data_ptr() + 16  # ...and kept


def test_discarded_parts_come_back_zeroed_and_a_storage_belongs_to_its_first_part():
    weights, grads = torch.ones(4), torch.full((4,), 3.0)
    shard = weights[2:]  # an optimizer shard viewing the weights
    state = torch.full((2,), 5.0)
    optimizer = Offloaded([Part(lambda: [weights], move=False), Part(lambda: [grads], keep=False),
                           Part(lambda: [shard, state])], "cpu")
    optimizer.offload()
    assert weights.untyped_storage().nbytes() == 16  # left alone: the first part that holds it stays
    assert grads.untyped_storage().nbytes() == 0 and state.untyped_storage().nbytes() == 0
    with optimizer.resident():
        assert torch.equal(grads, torch.zeros(4)) and torch.equal(state, torch.full((2,), 5.0))


def test_nothing_to_move_is_a_no_op():
    t = torch.ones(3)
    offloaded = Offloaded([Part(lambda: [t], move=False)], "cpu")
    offloaded.offload()
    assert t.untyped_storage().nbytes() == 12 and not offloaded.parts
    assert len(storages([t, t[1:], torch.ones(1)])) == 2


pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from test_distributed import fixed_batch  # noqa: E402
from test_megatron_actor import FSDP_OPTIM, MEGATRON_OPTIM, SETTINGS  # noqa: E402

from ascend_rl.distributed.worker_group import ProcessWorkerGroup  # noqa: E402
from ascend_rl.workers.actor import Actor, ReferenceSettings  # noqa: E402
from ascend_rl.workers.megatron.engine import MegatronEngine  # noqa: E402
from ascend_rl.workers.megatron.offload import MegatronOffload  # noqa: E402


class OffloadWorker:
    """One rank building the actor and the reference twice, without offload and with every switch on."""

    def __init__(self, rank: int, world_size: int, model_dir: str, dtype: torch.dtype):
        from ascend_rl.workers.megatron import cpu_patches

        cpu_patches.apply()
        self.model_dir, self.dtype = model_dir, dtype

    def run(self, batch, offload: bool) -> dict:
        from ascend_rl.workers.megatron.actor import MegatronActor, MegatronReference

        switches = MegatronOffload(params=offload, grads=offload, optimizer=offload)
        engine = MegatronEngine(dtype=self.dtype, offload=switches)
        actor = MegatronActor(self.model_dir, SETTINGS, MEGATRON_OPTIM, engine)
        ref = MegatronReference(self.model_dir, engine, ReferenceSettings(micro_batch_size=4), "cpu")
        out = {"held": [], "ref": ref.log_probs(batch), "log_probs": actor.log_probs(batch)}
        out["held"].append(held(actor, ref))
        out["metrics"] = [actor.update(batch) for _ in range(2)]
        out["held"].append(held(actor, ref))
        out["weights"] = {name: t.clone() for name, t in actor.named_weights()}
        out["held"].append(held(actor, ref))
        return out


def held(actor, ref=None) -> dict[str, int]:
    """Bytes each kind of state holds between calls."""
    from ascend_rl.workers.megatron.offload import gradient_buffers, optimizer_tensors

    def size(tensors) -> int:
        return sum(s.nbytes() for s in storages(tensors))

    weights = {s._cdata for s in storages(actor.model.module.parameters())}
    return {"weights": size(actor.model.module.parameters()), "grads": size(gradient_buffers(actor.model)),
            "optimizer": sum(s.nbytes() for s in storages(optimizer_tensors(actor.optimizer), weights)),
            "ref": size(ref.policy.module.parameters()) if ref is not None else 0}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_offloaded_actor_and_reference_make_the_same_run_and_hold_nothing_between_calls(tiny_model_dir, dtype):
    batch = fixed_batch(Actor(str(tiny_model_dir), "cpu", SETTINGS, FSDP_OPTIM))
    group = ProcessWorkerGroup(1, "test_megatron_offload:OffloadWorker",
                               dict(model_dir=str(tiny_model_dir), dtype=dtype))
    try:
        plain, offloaded = (group.call_all("run", batch, offload)[0] for offload in (False, True))
    finally:
        group.close()
    for key in ("ref", "log_probs"):
        assert torch.equal(offloaded[key][0] if key == "log_probs" else offloaded[key],
                           plain[key][0] if key == "log_probs" else plain[key]), key
    assert offloaded["metrics"] == plain["metrics"]
    for name, tensor in plain["weights"].items():
        assert torch.equal(offloaded["weights"][name], tensor), name
    assert all(h == {"weights": 0, "grads": 0, "optimizer": 0, "ref": 0} for h in offloaded["held"]), offloaded["held"]
    before, after, _ = plain["held"]
    assert before["weights"] > 0 and before["grads"] > 0 and before["ref"] > 0
    assert after["optimizer"] > 0  # Adam's moments (and a 16-bit model's fp32 copies) exist after a step
