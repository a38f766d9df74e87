"""The Megatron-core model and converter (ascend_rl/workers/megatron): HF ↔ Megatron weights round-trip exactly,
Megatron's forward gives the HF model's logits, and tensor parallelism (with sequence parallelism and recompute)
gives TP 1's logits, loss and gradients. Tiny models built from configs, fp32, gloo; ascend_rl/workers/megatron/cpu_patches.py
patches Megatron's CUDA-isms for the CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from ascend_rl.workers.megatron import cpu_patches  # noqa: E402
from ascend_rl.workers.megatron.arch import architecture  # noqa: E402
from ascend_rl.workers.megatron.convert import (  # noqa: E402
    check_layout,
    hf_to_mcore,
    hf_to_mcore_full,
    mcore_full_to_hf,
    mcore_to_hf,
    merge_tp,
    padded_vocab_size,
)
from ascend_rl.workers.megatron.model import MegatronParallel  # noqa: E402

# Megatron's own notices on the CPU path (no apex, default TP group, deprecated knobs it sets itself).
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron")]

VOCAB, BATCH, SEQ = 100, 2, 12  # 100 is no multiple of 128: the vocabulary padding is exercised
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=None,
              eos_token_id=None, pad_token_id=None)
ARCHS = ["qwen2", "qwen3", "llama", "qwen3_moe"]


def hf_config(name: str):
    import transformers

    if name == "qwen2":  # q/k/v biases; a non-default RoPE base
        return transformers.Qwen2Config(**COMMON, rope_theta=1e6, tie_word_embeddings=False)
    if name == "qwen3":  # q/k norms, tied embeddings
        return transformers.Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=True)
    if name == "llama":  # head_dim from hidden / heads
        return transformers.LlamaConfig(**COMMON, tie_word_embeddings=False)
    if name.startswith("qwen3_moe"):  # "-unnormed": top-k weights as the softmax over all experts gave them
        return transformers.Qwen3MoeConfig(**COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32, norm_topk_prob=not name.endswith("-unnormed"),
                                           tie_word_embeddings=False)
    raise ValueError(name)


def hf_model(name: str):
    """A tiny HF model with every weight random (norm weights around 1), so a swapped or misplaced tensor
    changes the logits well beyond the tolerance."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(name), attn_implementation="eager",
                                                          dtype=torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in pname else 0.1 * torch.randn_like(p))
    return model


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def hf_reference(name: str) -> dict:
    """The HF model's logits, mean next-token loss, gradients and gradient norm on `batch()`."""
    model = hf_model(name)
    ids = batch()
    logits = model(input_ids=ids, use_cache=False).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    loss = -log_probs.mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
    return {"logits": logits.detach(), "loss": loss.item(), "grads": grads, "grad_norm": norm.item()}


def megatron_step(name: str, parallel: MegatronParallel) -> dict:
    """On every rank of an initialised group: this rank's logits slice, the loss, its gradient slices by
    Megatron name and the global gradient norm, after one forward and backward of the same loss as above."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    from ascend_rl.workers.megatron.logprobs import vocab_parallel_log_probs
    from ascend_rl.workers.megatron.model import build_gpt_model, init_model_parallel, load_hf_weights

    init_model_parallel(parallel)
    hf = hf_model(name)
    model = build_gpt_model(hf.config, parallel)
    load_hf_weights(model, hf.state_dict(), hf.config, parallel)
    ids = batch()
    logits = model(ids, torch.arange(SEQ).expand(BATCH, SEQ), attention_mask=None)
    loss = -vocab_parallel_log_probs(logits[:, :-1], ids[:, 1:], VOCAB).mean()
    loss.backward()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    grads = {}
    for pname, p in model.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)  # an expert no token chose
        # What Megatron's finalize_model_grads sums over TP: replicated weights that saw only this rank's part
        # of the input (sequence-parallel norms and router; q/k norms, which see this rank's heads).
        if parallel.tp > 1 and ((parallel.sequence_parallel and getattr(p, "sequence_parallel", False))
                                or "q_layernorm" in pname or "k_layernorm" in pname):
            dist.all_reduce(grad, group=tp_group)
        grads[pname] = grad
    params = dict(model.named_parameters())  # a weight copied on every TP rank counts once
    squares = torch.stack([g.pow(2).sum() for n, g in grads.items()
                           if param_is_not_tensor_parallel_duplicate(params[n])]).sum()
    dist.all_reduce(squares, group=tp_group)
    return {"logits": logits.detach(), "loss": loss.item(), "grads": grads, "grad_norm": squares.sqrt().item(),
            "recompute": model.config.recompute_granularity}


class TpWorker:
    """A worker process of a ProcessWorkerGroup: Megatron on CPU, one step per call."""

    def __init__(self, rank: int, world_size: int):
        cpu_patches.apply(pytest.MonkeyPatch())

    def step(self, name: str, parallel: MegatronParallel) -> dict:
        return megatron_step(name, parallel)


def merged(results: list[dict], name: str) -> dict:
    """Every rank's step as one: the logits over the real vocabulary, the gradients by HF name."""
    arch = architecture(hf_config(name))
    logits = torch.cat([r["logits"] for r in results], dim=-1)[..., :VOCAB]
    grads = mcore_full_to_hf(merge_tp([r["grads"] for r in results], arch), arch)
    return {**results[0], "logits": logits, "grads": grads}


def assert_same_step(got: dict, want: dict, atol: float = 1e-5) -> None:
    torch.testing.assert_close(got["logits"], want["logits"], atol=atol, rtol=0)
    assert got["loss"] == pytest.approx(want["loss"], abs=atol)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], abs=atol)
    assert sorted(got["grads"]) == sorted(want["grads"])
    for pname, grad in want["grads"].items():
        torch.testing.assert_close(got["grads"][pname], grad, atol=atol, rtol=0, msg=pname)


# --- the converter, without Megatron's runtime --------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("tp", [1, 2])
def test_hf_mcore_hf_round_trip_is_exact(name, tp):
    hf = hf_model(name)
    state = hf.state_dict()
    arch = architecture(hf.config)
    shards = hf_to_mcore(state, arch, tp=tp)
    rows = padded_vocab_size(VOCAB, tp)
    assert all(s["embedding.word_embeddings.weight"].shape[0] == rows // tp for s in shards)
    back = mcore_to_hf(shards, arch)
    want = {k: v for k, v in state.items() if not (arch.tie_word_embeddings and k == "lm_head.weight")}
    assert sorted(back) == sorted(want)
    for key, value in want.items():
        assert torch.equal(back[key], value), key


def test_megatron_layout_of_fused_and_split_weights():
    """Megatron's own layout, checked by hand: per-group [q; k; v] rows, [gate; up] per TP rank, row-parallel
    output projections, zero padding rows of the vocabulary."""
    hf = hf_model("qwen2")
    state, arch = hf.state_dict(), architecture(hf.config)
    d, per_group = arch.head_dim, arch.heads_per_group * arch.head_dim
    full = hf_to_mcore_full(state, arch, padded_vocab=128)
    qkv = full["decoder.layers.0.self_attention.linear_qkv.weight"]
    a = "model.layers.0.self_attn."
    group1 = qkv[per_group + 2 * d: 2 * (per_group + 2 * d)]
    assert torch.equal(group1[:per_group], state[a + "q_proj.weight"][per_group:2 * per_group])
    assert torch.equal(group1[per_group:per_group + d], state[a + "k_proj.weight"][d:2 * d])
    assert torch.equal(group1[per_group + d:], state[a + "v_proj.weight"][d:2 * d])
    bias = full["decoder.layers.0.self_attention.linear_qkv.bias"]
    assert torch.equal(bias[per_group:per_group + d], state[a + "k_proj.bias"][:d])
    assert torch.equal(full["embedding.word_embeddings.weight"][VOCAB:], torch.zeros(128 - VOCAB, 64))

    rank1 = hf_to_mcore(state, arch, tp=2)[1]
    half = arch.ffn_hidden_size // 2
    m = "model.layers.0.mlp."
    assert torch.equal(rank1["decoder.layers.0.mlp.linear_fc1.weight"],
                       torch.cat([state[m + "gate_proj.weight"][half:], state[m + "up_proj.weight"][half:]]))
    assert torch.equal(rank1["decoder.layers.0.mlp.linear_fc2.weight"], state[m + "down_proj.weight"][:, half:])
    assert torch.equal(rank1["decoder.layers.0.self_attention.linear_qkv.weight"], qkv[qkv.shape[0] // 2:])


def test_unbuilt_settings_raise_naming_them():
    import transformers

    with pytest.raises(NotImplementedError, match="virtual_pipeline_model_parallel_size, context_parallel_size"):
        MegatronParallel(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                         context_parallel_size=2).check()
    with pytest.raises(ValueError, match="num_hidden_layers \\(2\\) is not a multiple of PP 3"):
        check_layout(architecture(hf_config("qwen3")), tp=1, pp=3)
    with pytest.raises(NotImplementedError, match="expert_tensor_parallel_size other than 1 or the TP size"):
        MegatronParallel(tensor_model_parallel_size=4, expert_tensor_parallel_size=2).check()
    with pytest.raises(NotImplementedError, match="rope_type='llama3'"):
        architecture(transformers.LlamaConfig(**COMMON, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}))
    with pytest.raises(NotImplementedError, match="model_type='gpt2'"):
        architecture(transformers.GPT2Config())
    with pytest.raises(ValueError, match="num_key_value_heads \\(2\\) is not a multiple of TP 4"):
        hf_to_mcore(hf_model("qwen3").state_dict(), architecture(hf_config("qwen3")), tp=4)


def test_the_package_imports_megatron_only_when_it_builds_a_model():
    """plan, the converter and the core package must work where megatron-core is not installed."""
    code = ("import sys, ascend_rl.workers.megatron.model, ascend_rl.workers.megatron.convert, "
            "ascend_rl.workers.megatron.logprobs; assert 'megatron' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_shim_patches_symbols_that_exist():
    """Megatron-core moved on when this fails: each listed patch would silently do nothing."""
    import megatron.core

    assert megatron.core.__version__ == cpu_patches.MEGATRON_CORE
    assert cpu_patches.missing() == []


# --- Megatron's forward and backward --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process():
    """A one-process gloo group in this process for TP 1, with the shim; both undone afterwards (the rest of
    the suite expects no process group, nor the attention-backend variables Megatron sets in os.environ)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from ascend_rl.rollout.server_process import free_port

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MASTER_ADDR", "127.0.0.1")
        patch.setenv("MASTER_PORT", str(free_port()))
        for name in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):  # Megatron sets them per backend
            patch.delenv(name, raising=False)  # and the patch's undo removes what it set
        cpu_patches.apply(patch)
        dist.init_process_group("gloo", rank=0, world_size=1)
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp1_steps(one_process):
    cache = {}

    def step(name: str) -> dict:
        if name not in cache:
            cache[name] = merged([megatron_step(name, MegatronParallel())], name)
        return cache[name]

    return step


@pytest.mark.parametrize("name", [*ARCHS, "qwen3_moe-unnormed"])
def test_megatron_tp1_equals_hf(name, tp1_steps):
    assert_same_step(tp1_steps(name), hf_reference(name))


@pytest.fixture(scope="module")
def two_workers():
    from ascend_rl.distributed.worker_group import ProcessWorkerGroup

    group = ProcessWorkerGroup(2, "test_megatron:TpWorker", {}, threads_per_worker=1)
    yield group
    group.close()


TP2 = MegatronParallel(tensor_model_parallel_size=2)
TP2_SP = MegatronParallel(tensor_model_parallel_size=2, sequence_parallel=True)
TP2_SP_RECOMPUTE = MegatronParallel(tensor_model_parallel_size=2, sequence_parallel=True, override_transformer_config={
    "recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1})


@pytest.mark.parametrize(("name", "parallel"), [
    ("qwen2", TP2), ("qwen3", TP2), ("llama", TP2), ("qwen3", TP2_SP), ("qwen2", TP2_SP_RECOMPUTE),
    ("qwen3_moe", TP2_SP),  # Megatron trains MoE under TP only with SP; the experts are split over ETP = TP
], ids=["qwen2-tp2", "qwen3-tp2", "llama-tp2", "qwen3-tp2-sp", "qwen2-tp2-sp-recompute", "qwen3_moe-tp2-sp"])
def test_tp2_equals_tp1(name, parallel, two_workers, tp1_steps):
    got = merged(two_workers.call_all("step", name, parallel), name)
    assert got["recompute"] == parallel.override_transformer_config.get("recompute_granularity")
    assert_same_step(got, tp1_steps(name))


# --- each device kind's adaptor (workers/megatron/adaptors.py) -------------------------------------------------

@pytest.fixture
def fake_mindspeed(monkeypatch):
    """A stand-in for MindSpeed's adaptor module that records what `repatch` is given."""
    import importlib.machinery
    import types

    calls: list[dict] = []
    adaptor = types.ModuleType("mindspeed.megatron_adaptor")
    adaptor.repatch = calls.append
    package = types.ModuleType("mindspeed")
    package.__spec__ = importlib.machinery.ModuleSpec("mindspeed", None)
    package.megatron_adaptor = adaptor
    monkeypatch.setitem(sys.modules, "mindspeed", package)
    monkeypatch.setitem(sys.modules, "mindspeed.megatron_adaptor", adaptor)
    return calls


def test_on_an_npu_mindspeed_is_repatched_with_the_runs_overrides_as_verl_does(fake_mindspeed):
    from megatron.core.transformer.enums import AttnBackend

    from ascend_rl.workers.megatron import adaptors

    adaptors.adapt("npu", MegatronParallel(override_transformer_config={"attention_backend": "flash",
                                                                        "recompute_granularity": "full"}))
    adaptors.adapt("npu", MegatronParallel(override_transformer_config={"use_flash_attn_npu_batch_invariant": True}))
    adaptors.adapt("npu", MegatronParallel(override_transformer_config={"use_flash_attn": False}))
    assert fake_mindspeed == [
        {"attention_backend": AttnBackend.flash, "recompute_granularity": "full", "use_flash_attn": True},
        {"use_flash_attn_npu_batch_invariant": True, "use_flash_attn": False},  # both patch the same forward
        {"use_flash_attn": False},
    ]
    assert adaptors.missing("npu") is None


def test_a_mindspeed_without_repatch_is_applied_and_said(fake_mindspeed, caplog):
    from ascend_rl.workers.megatron import adaptors

    del sys.modules["mindspeed.megatron_adaptor"].repatch
    adaptors.adapt("npu", MegatronParallel(override_transformer_config={"use_flash_attn": True}))
    assert fake_mindspeed == [] and "has no megatron_adaptor.repatch" in caplog.text


def test_without_mindspeed_megatron_on_an_npu_is_refused_with_the_install_step():
    from ascend_rl.workers.megatron import adaptors

    if adaptors.missing("npu") is None:
        pytest.skip("MindSpeed is installed here")
    assert "USE_MEGATRON=1 bash scripts/install_sglang_npu.sh" in adaptors.missing("npu")
    with pytest.raises(RuntimeError, match="MindSpeed, which is not installed"):
        adaptors.adapt("npu", MegatronParallel())
    assert adaptors.missing("cuda") is None and adaptors.missing("cpu") is None
