"""The native engine's lean forward against transformers' own, per architecture and dtype, over more decode
steps than its start-up self-check takes."""

import pytest
import torch
from test_cpu_kernels import HAVE_COMPILER

from ascend_rl.data.collate import position_ids_from_mask
from ascend_rl.rollout.lean_decoder import LeanDecoder, self_check_tolerance

STEPS = 40


def tiny(kind: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    shape = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    if kind == "qwen3":  # q/k norms, separate head_dim
        model = Qwen3ForCausalLM(Qwen3Config(**shape, head_dim=32))
    elif kind == "qwen2":  # q/k/v biases
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    else:  # biases on every projection, the MLP's too
        model = LlamaForCausalLM(LlamaConfig(**shape, attention_bias=True, mlp_bias=True))
    with torch.no_grad():  # biases start at zero: make them count
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    return model.to(dtype).eval()


def decoded_and_reference(decoder: LeanDecoder, model, steps: int = STEPS):
    """Lean logits of a left-padded prompt batch and `steps` forced tokens, and the model's at the same places."""
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (3, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    forced = torch.randint(0, vocab, (3, steps), generator=generator)
    logits, rows = decoder.prefill(ids, mask)
    decoder.merge(torch.arange(0), rows, room=steps)
    lean = torch.stack([logits] + [decoder.decode(forced[:, i]) for i in range(steps)], dim=1)
    decoder.merge(torch.arange(0), None, room=0)
    full_mask = torch.cat([mask, torch.ones_like(forced)], dim=1)
    with torch.no_grad():
        reference = model(input_ids=torch.cat([ids, forced], dim=1), attention_mask=full_mask,
                          position_ids=position_ids_from_mask(full_mask)).logits
    return lean, reference[:, ids.shape[1] - 1:]


@pytest.fixture
def two_threads():
    """The row split needs threads to split between (CI's machine has 2 cores; set it where it has more)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


PATHS = {"cpu_kernels, rows split": (True, True), "cpu_kernels, per op": (True, False), "eager": (False, False)}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "llama"])
def test_lean_forward_equals_the_models_own(kind, dtype, path, two_threads):
    fused, split_rows = PATHS[path]
    model = tiny(kind, dtype)
    decoder = LeanDecoder.for_model(model)
    assert decoder is not None  # the self-check passed
    if fused and not HAVE_COMPILER:
        pytest.skip("no C++ compiler here: the CPU decode kernels are not built")
    assert decoder.fused or not fused  # where a compiler is, the kernels build and the CPU decodes with them
    assert decoder.split_rows == decoder.fused  # a tiny model's weights stay in cache
    decoder.fused, decoder.split_rows = fused, split_rows
    lean, reference = decoded_and_reference(decoder, model)
    assert lean.shape == reference.shape
    # Every position within the self-check's tolerance (fp32 1e-4; bf16 a few rounding steps of the logits).
    assert (lean.float() - reference.float()).abs().max() < self_check_tolerance(reference)


@pytest.mark.skipif(not HAVE_COMPILER, reason="no C++ compiler here: the CPU decode kernels are not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_row_split_step_equals_the_per_op_step_and_records_no_graph(dtype, two_threads):
    """Each thread running the whole step on its rows computes what the per-op step does, writes the same cache
    columns, and runs under the caller's no_grad (threads start with grad mode on: the state must travel)."""
    model = tiny("qwen3", dtype).requires_grad_(True)
    results = {}
    for split_rows in (True, False):
        decoder = LeanDecoder.for_model(model)
        decoder.split_rows = split_rows
        ids, mask = torch.randint(0, 96, (5, 6), generator=torch.Generator().manual_seed(2)), torch.ones(5, 6)
        _, rows = decoder.prefill(ids, mask.long())
        decoder.merge(torch.arange(0), rows, room=3)
        logits = [decoder.decode(torch.tensor([1, 2, 3, 4, 5]) + step) for step in range(3)]
        assert not any(step.requires_grad for step in logits)
        results[split_rows] = logits, decoder.cache.k, decoder.cache.v
    for split, per_op in zip(results[True], results[False]):  # logits, K and V caches: per step, per layer
        for a, b in zip(split, per_op):
            torch.testing.assert_close(a, b, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)
