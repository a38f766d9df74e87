"""Expert parallelism (EP, with expert tensor parallelism ETP = TP or 1) of the Megatron-core model, and the
gather of a sharded model back into whole HF tensors (ascend_rl/workers/megatron/gather.py). Four gloo
processes, tiny fp32 models from tests/test_megatron.py; each data-parallel replica gets its own batch, so
tokens crossing replicas in the expert all-to-all are exercised, and the HF reference sees them all at once."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from test_megatron import BATCH, SEQ, VOCAB, TpWorker, hf_config, hf_model  # noqa: E402

from ascend_rl.workers.megatron.arch import architecture  # noqa: E402
from ascend_rl.workers.megatron.convert import (  # noqa: E402
    Place,
    check_layout,
    hf_to_mcore_full,
    hf_to_mcore_rank,
    mcore_full_to_hf,
    merge_ranks,
    rank_shard,
)
from ascend_rl.workers.megatron.model import MegatronParallel  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron")]

WORLD = 4
MOE = "qwen3_moe"  # 4 experts, top 2
TP2_EP2 = MegatronParallel(tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=2)
TP2_EP2_ETP1 = MegatronParallel(tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=2,
                                expert_tensor_parallel_size=1)
EP2 = MegatronParallel(expert_model_parallel_size=2)  # TP 1: two EP groups of two among four replicas
TP2 = MegatronParallel(tensor_model_parallel_size=2)


def dp_batch(dp_rank: int) -> torch.Tensor:
    """Data-parallel replica `dp_rank`'s batch (replica 0's is test_megatron's `batch()`)."""
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1 + dp_rank))


def hf_reference(name: str, dp: int) -> dict:
    """The HF model's logits, mean next-token loss and gradients on every replica's batch at once."""
    model = hf_model(name)
    ids = torch.cat([dp_batch(d) for d in range(dp)])
    logits = model(input_ids=ids, use_cache=False).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    loss = -log_probs.mean()
    loss.backward()
    return {"logits": logits.detach(), "loss": loss.item(), "grads": {n: p.grad for n, p in model.named_parameters()}}


def reduced_grads(model, parallel: MegatronParallel) -> dict:
    """This rank's gradients as Megatron's finalize_model_grads and DDP leave them: sequence-parallel and q/k
    norm weights summed over TP (as test_megatron does), then dense weights averaged over the data-parallel
    group, experts summed over the expert-data-parallel group and divided by the data-parallel size (the
    all-to-all already brought every EP peer's tokens to them)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    grads = {}
    for pname, p in model.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)  # an expert no token chose
        if parallel.tp > 1 and ((parallel.sequence_parallel and getattr(p, "sequence_parallel", False))
                                or "q_layernorm" in pname or "k_layernorm" in pname):
            dist.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
        dense = getattr(p, "allreduce", True)
        dist.all_reduce(grad, group=ps.get_data_parallel_group() if dense else ps.get_expert_data_parallel_group())
        grads[pname] = grad / dp
    return grads


def built_model(name: str, parallel: MegatronParallel):
    from ascend_rl.workers.megatron.model import build_gpt_model, init_model_parallel, load_hf_weights

    init_model_parallel(parallel)
    hf = hf_model(name)
    model = build_gpt_model(hf.config, parallel)
    load_hf_weights(model, hf.state_dict(), hf.config, parallel)
    return model, hf


class EpWorker(TpWorker):
    """test_megatron's worker (Megatron on CPU), with a step over data-parallel replicas and the gather."""

    def ep_step(self, name: str, parallel: MegatronParallel) -> dict:
        from megatron.core import parallel_state as ps

        from ascend_rl.workers.megatron.logprobs import vocab_parallel_log_probs
        from ascend_rl.workers.megatron.model import rank_place

        model, _ = built_model(name, parallel)
        ids = dp_batch(ps.get_data_parallel_rank())
        logits = model(ids, torch.arange(SEQ).expand(BATCH, SEQ), attention_mask=None)
        loss = -vocab_parallel_log_probs(logits[:, :-1], ids[:, 1:], VOCAB).mean()
        loss.backward()
        return {"logits": logits.detach(), "loss": loss.item(), "grads": reduced_grads(model, parallel),
                "place": rank_place(), "dp_rank": ps.get_data_parallel_rank()}

    def gathered(self, name: str, parallel: MegatronParallel) -> list[tuple[str, torch.Tensor]]:
        from ascend_rl.workers.megatron.gather import hf_weights

        model, hf = built_model(name, parallel)
        return [(key, value.clone()) for key, value in hf_weights(model, hf.config)]


@pytest.fixture(scope="module")
def four_workers():
    from ascend_rl.distributed.worker_group import ProcessWorkerGroup

    group = ProcessWorkerGroup(WORLD, "test_megatron_ep:EpWorker", {}, threads_per_worker=1)
    yield group
    group.close()


def merged(results: list[dict], name: str) -> dict:
    """Every rank's step as one: logits over the real vocabulary with the replicas' batches in order, the mean
    loss, the gradients by HF name."""
    arch = architecture(hf_config(name))
    dp = 1 + max(r["dp_rank"] for r in results)
    replicas = [sorted((r for r in results if r["dp_rank"] == d), key=lambda r: r["place"].tp_rank)
                for d in range(dp)]
    logits = torch.cat([torch.cat([r["logits"] for r in ranks], dim=-1)[..., :VOCAB] for ranks in replicas])
    loss = sum(ranks[0]["loss"] for ranks in replicas) / dp
    grads = mcore_full_to_hf(merge_ranks([r["grads"] for r in results], [r["place"] for r in results], arch), arch)
    return {"logits": logits, "loss": loss, "grads": grads, "dp": dp}


@pytest.mark.parametrize("parallel", [TP2_EP2, TP2_EP2_ETP1, EP2], ids=["tp2-ep2-sp", "tp2-ep2-etp1-sp", "ep2"])
def test_expert_parallel_equals_hf(parallel, four_workers):
    got = merged(four_workers.call_all("ep_step", MOE, parallel), MOE)
    want = hf_reference(MOE, got["dp"])
    assert got["dp"] == WORLD // parallel.tp
    torch.testing.assert_close(got["logits"], want["logits"], atol=1e-5, rtol=0)
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    assert sorted(got["grads"]) == sorted(want["grads"])
    for pname, grad in want["grads"].items():
        torch.testing.assert_close(got["grads"][pname], grad, atol=1e-5, rtol=0, msg=pname)


@pytest.mark.parametrize(("name", "parallel"), [(MOE, TP2_EP2), ("qwen2", TP2), ("qwen3", TP2)],
                         ids=["qwen3_moe-tp2-ep2", "qwen2-tp2", "qwen3-tied-tp2"])
def test_gather_gives_the_hf_state_dict_on_every_rank(name, parallel, four_workers):
    state = hf_model(name).state_dict()
    if hf_config(name).tie_word_embeddings:
        state.pop("lm_head.weight")
    for items in four_workers.call_all("gathered", name, parallel):
        got = dict(items)
        assert len(got) == len(items) and sorted(got) == sorted(state)
        for key, value in state.items():
            assert torch.equal(got[key], value), key


# --- the converter and the refusals, without Megatron's runtime --------------------------------------------------


@pytest.mark.parametrize(("tp", "ep", "etp"), [(2, 2, 2), (2, 2, 1), (1, 4, 1), (2, 4, 2)])
def test_expert_shards_round_trip_exactly(tp, ep, etp):
    hf = hf_model(MOE)
    state, arch = hf.state_dict(), architecture(hf.config)
    places = [Place(tp, t, ep, e, etp, t % etp) for e in range(ep) for t in range(tp)]
    shards = [hf_to_mcore_rank(state, arch, place) for place in places]
    assert sorted(n for n in shards[0] if ".layers.0.mlp.experts." in n) == sorted(
        f"decoder.layers.0.mlp.experts.local_experts.{j}.linear_fc{k}.weight" for j in range(4 // ep) for k in (1, 2))
    back = mcore_full_to_hf(merge_ranks(shards, places, arch), arch)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key


def test_an_expert_rank_holds_its_experts_by_local_index_split_over_etp():
    hf = hf_model(MOE)
    state, arch = hf.state_dict(), architecture(hf.config)
    shard = rank_shard(hf_to_mcore_full(state, arch, 128), arch, Place(tp=2, tp_rank=1, ep=2, ep_rank=1, etp=2,
                                                                       etp_rank=1))
    gate_up, down = state["model.layers.1.mlp.experts.gate_up_proj"], state["model.layers.1.mlp.experts.down_proj"]
    f = arch.moe_ffn_hidden_size
    local = "decoder.layers.1.mlp.experts.local_experts.1."  # global expert 3, ETP rank 1's halves
    assert torch.equal(shard[local + "linear_fc1.weight"],
                       torch.cat([gate_up[3, f // 2:f], gate_up[3, f + f // 2:]]))
    assert torch.equal(shard[local + "linear_fc2.weight"], down[3][:, f // 2:])


def test_expert_layouts_megatron_cannot_run_raise_naming_the_setting():
    arch = architecture(hf_config(MOE))
    with pytest.raises(ValueError, match="num_experts \\(4\\) is not a multiple of EP 3"):
        hf_to_mcore_rank(hf_model(MOE).state_dict(), arch, Place(ep=3, ep_rank=1))
    with pytest.raises(ValueError, match="num_experts \\(4\\) is not a multiple of EP 3"):
        check_layout(arch, tp=1, ep=3)
    with pytest.raises(ValueError, match="needs an MoE model"):
        check_layout(architecture(hf_config("qwen3")), tp=1, ep=2)
    with pytest.raises(ValueError, match="EP must divide the data-parallel size 3"):
        TP2_EP2.check_world(6)
    TP2_EP2.check_world(4)
    TP2_EP2_ETP1.check_world(2)  # ETP 1: EP × ETP = 2 divides the world of 2 (one data-parallel replica)
    with pytest.raises(ValueError, match="needs expert_model_parallel_size > 1"):
        MegatronParallel(tensor_model_parallel_size=2, expert_tensor_parallel_size=1).check()
    with pytest.raises(NotImplementedError, match="expert_tensor_parallel_size other than 1 or the TP size"):
        MegatronParallel(tensor_model_parallel_size=4, expert_model_parallel_size=2,
                         expert_tensor_parallel_size=2).check()
