"""The fused CPU decode kernels (rollout/cpu_kernels.py) against the eager ops they replace."""

import logging
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from ascend_rl.rollout import cpu_kernels, sampling
from ascend_rl.rollout.protocol import SamplingParams

# Where a compiler is, the kernels must build (a failed build fails test_the_kernels_build, not skips everything).
HAVE_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
pytestmark = pytest.mark.skipif(not HAVE_COMPILER, reason="no C++ compiler here: the engine runs the eager ops")


def test_the_kernels_build():
    assert cpu_kernels.loaded()


@pytest.fixture(autouse=True)
def kernels():
    """Built and registered before each test, whichever of them runs first (`-k` selections too)."""
    cpu_kernels.loaded()


def test_mismatched_shapes_are_refused_with_the_kernels_name():
    q, mask = torch.randn(2, 4, 32), torch.ones(2, 10, dtype=torch.bool)
    keys_t, values = torch.randn(2, 2, 32, 10), torch.randn(2, 2, 10, 32)
    with pytest.raises(RuntimeError, match="decode_attention"):
        cpu_kernels.decode_attention(q, keys_t, values[:, :, :8], mask, 5)  # V narrower than K
    with pytest.raises(RuntimeError, match="decode_attention"):
        cpu_kernels.decode_attention(q, keys_t, values, mask[:1], 5)  # a key mask for one row of two
    with pytest.raises(RuntimeError, match="sample_gumbel"):
        cpu_kernels.sample_gumbel(torch.randn(3, 8), torch.arange(2), torch.arange(3), 1.0)


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2


@DTYPES
def test_rms_norm_and_silu_gate_equal_the_eager_ops(dtype):
    torch.manual_seed(0)
    x, weight = torch.randn(5, 3, 96).to(dtype), torch.randn(96).to(dtype)
    expected = F.rms_norm(x.float(), (96,), eps=1e-6).to(dtype) * weight
    got = cpu_kernels.rms_norm(x, weight, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance(dtype), rtol=tolerance(dtype))
    gate, up = torch.randn(7, 200).to(dtype) * 4, torch.randn(7, 200).to(dtype)
    torch.testing.assert_close(cpu_kernels.silu_mul(gate, up).float(), (F.silu(gate) * up).float(),
                               atol=tolerance(dtype), rtol=tolerance(dtype))


def eager_attention(q, keys_t, values, key_mask, length):
    """q [B, H, D]; keys_t [B, KVH, D, W]; values [B, KVH, W, D] → [B, H·D] (the lean decoder's eager path)."""
    batch, heads, dim = q.shape
    kv_heads = keys_t.shape[1]
    grouped = q.float().view(batch, kv_heads, heads // kv_heads, dim)
    scores = grouped @ keys_t[..., :length].float() * dim ** -0.5
    scores = scores.masked_fill(~key_mask[:, None, None, :length], float("-inf"))
    return (torch.softmax(scores, -1) @ values[:, :, :length].float()).reshape(batch, heads * dim)


@DTYPES
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 32), (8, 1, 64), (2, 2, 128), (6, 3, 24)])
@pytest.mark.parametrize("length", [1, 63, 64, 150])
@pytest.mark.parametrize("width", [160, 151])  # 151: the last keys are no whole vector, scored one at a time
def test_decode_attention_equals_masked_softmax_attention(dtype, heads, kv_heads, dim, length, width):
    torch.manual_seed(1)
    rows = 5
    q = torch.randn(rows, heads, dim)
    keys_t = torch.randn(rows, kv_heads, dim, width).to(dtype)
    values = torch.randn(rows, kv_heads, width, dim).to(dtype)
    keys_t[..., length:], values[:, :, length:] = float("nan"), float("nan")  # columns past `length` never count
    key_mask = torch.rand(rows, width) > 0.3
    key_mask[:, length - 1] = True  # every row attends to its newest token at least
    key_mask[2, :length - 1] = False  # a row that sees only that one
    got = cpu_kernels.decode_attention(q, keys_t, values, key_mask, length)
    assert got.dtype == dtype and got.shape == (rows, heads * dim)
    expected = eager_attention(q, keys_t, values, key_mask, length)
    torch.testing.assert_close(got.float(), expected, atol=tolerance(dtype), rtol=tolerance(dtype))
    torch.testing.assert_close(got[2].float(), values[2, :, length - 1].float().repeat_interleave(heads // kv_heads, 0)
                               .flatten(), atol=tolerance(dtype), rtol=tolerance(dtype))


@DTYPES
@pytest.mark.parametrize("norms", [True, False], ids=["qk_norm", "plain"])
def test_decode_qkv_rotates_and_writes_the_cache(dtype, norms):
    torch.manual_seed(2)
    rows, heads, kv_heads, dim, width, column = 3, 4, 2, 32, 12, 9
    q, k, v = (torch.randn(rows, n * dim).to(dtype) for n in (heads, kv_heads, kv_heads))
    q_norm, k_norm = (torch.randn(dim).to(dtype), torch.randn(dim).to(dtype)) if norms else (None, None)
    positions = torch.tensor([0, 5, 41])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    k_cache, v_cache = torch.zeros(rows, kv_heads, dim, width, dtype=dtype), torch.zeros(rows, kv_heads, width, dim,
                                                                                         dtype=dtype)
    angles = positions[:, None].float() * inv_freq
    cos, sin = (f(angles).to(dtype).float() for f in (torch.cos, torch.sin))  # rounded as the eager path's
    got_q = cpu_kernels.decode_qkv(q, k, v, q_norm, k_norm, cos, sin, k_cache, v_cache, column, 1e-6)

    def rotate(x, weight, count):  # the eager path: per-head norm, rotate_half with cos/sin in x's dtype
        x = x.view(rows, count, dim)
        if weight is not None:
            x = F.rms_norm(x.float(), (dim,), eps=1e-6).to(dtype) * weight
        angles = positions[:, None].float() * inv_freq
        cos, sin = (torch.cat([f(angles)] * 2, -1)[:, None].to(dtype) for f in (torch.cos, torch.sin))
        rotated = torch.cat([-x[..., dim // 2:], x[..., :dim // 2]], -1)
        return x.float() * cos.float() + rotated.float() * sin.float()

    tol = dict(atol=tolerance(dtype), rtol=tolerance(dtype))
    torch.testing.assert_close(got_q, rotate(q, q_norm, heads), **tol)
    torch.testing.assert_close(k_cache[..., column].float(), rotate(k, k_norm, kv_heads), **tol)
    assert torch.equal(v_cache[:, :, column], v.view(rows, kv_heads, dim))
    others = [c for c in range(width) if c != column]
    assert not k_cache[..., others].any() and not v_cache[:, :, others].any()  # nothing else written


def eager_sample(logits, params, seeds, steps):
    """sampling.sample's own (unfused) path."""
    scaled = logits / params.temperature
    noise = sampling.uniform_noise(seeds, steps, logits.shape[-1])
    tokens = (scaled - torch.log(-torch.log(noise)).to(scaled.dtype)).argmax(-1)
    return tokens, torch.log_softmax(scaled, -1).gather(-1, tokens[:, None]).squeeze(-1)


@pytest.mark.parametrize("vocab", [2, 7, 64, 1000, 50_000])
@pytest.mark.parametrize("temperature", [0.05, 0.7, 1.0, 3.0])
def test_fused_sampling_draws_the_eager_paths_tokens(vocab, temperature):
    generator = torch.Generator().manual_seed(vocab)
    rows = 64 if vocab < 10_000 else 8
    logits = torch.randn(rows, vocab, generator=generator) * 4
    logits[0] = 0.0  # all tied: the noise alone decides
    logits[1, :] = -1e4
    logits[1, vocab // 2] = 1e4  # one certain token
    seeds = torch.randint(-2**62, 2**62, (rows,), generator=generator)
    steps = torch.randint(0, 10_000, (rows,), generator=generator)
    params = SamplingParams(temperature=temperature)
    tokens, logprobs = sampling.sample(logits, params, seeds, steps)
    expected_tokens, expected_logprobs = eager_sample(logits, params, seeds, steps)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logprobs, expected_logprobs, atol=2e-5, rtol=1e-5)
    assert tokens[1] == vocab // 2 and abs(float(logprobs[1])) < 1e-6


def test_many_draws_match_and_follow_the_distribution():
    """10,000 draws of one row over 5 tokens: identical to the eager path, frequencies at softmax's."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).expand(10_000, 5).contiguous()
    seeds, steps = torch.full((10_000,), 7), torch.arange(10_000)
    params = SamplingParams(temperature=1.0)
    tokens, _ = sampling.sample(logits, params, seeds, steps)
    assert torch.equal(tokens, eager_sample(logits, params, seeds, steps)[0])
    frequencies = torch.bincount(tokens, minlength=5).float() / 10_000
    torch.testing.assert_close(frequencies, torch.softmax(logits[0], -1), atol=0.015, rtol=0)


def test_filters_and_greedy_take_the_eager_path(monkeypatch):
    def refuse(*args):
        raise AssertionError("the fused sampler ran")

    monkeypatch.setattr(cpu_kernels, "sample_gumbel", refuse)
    logits, seeds = torch.randn(4, 50), torch.arange(4)
    for params in (SamplingParams(temperature=0.0), SamplingParams(top_k=5), SamplingParams(top_p=0.9),
                   SamplingParams(min_p=0.1)):
        tokens, _ = sampling.sample(logits, params, seeds, 3)
        assert tokens.shape == (4,)
    assert not sampling.filters(SamplingParams(top_k=50), 50)  # top_k ≥ vocab removes nothing


def test_a_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def broken(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken)
    with caplog.at_level(logging.WARNING, logger="ascend_rl.rollout.cpu_kernels"):
        assert cpu_kernels.loaded.__wrapped__() is False
    assert len(caplog.records) == 1
    assert "Ninja is required" in caplog.records[0].message and "more detail" not in caplog.records[0].message
    monkeypatch.setenv(cpu_kernels.SWITCH_ENV, "0")
    assert cpu_kernels.loaded.__wrapped__() is False  # switched off: not even tried


def test_only_models_whose_weights_stay_in_cache_split_their_rows_between_threads():
    limit = cpu_kernels.ROW_SPLIT_MAX_BYTES
    assert cpu_kernels.splits_rows([torch.empty(limit // 4), torch.empty(0)])
    assert not cpu_kernels.splits_rows([torch.empty(limit // 4), torch.empty(1)])
    assert cpu_kernels.splits_rows([torch.empty(limit // 2, dtype=torch.bfloat16)])  # bytes, not elements
