"""The native engine's SGLang log-prob outputs, CPU weight backup, and update_weights_from_tensor bodies."""

import base64
import io
import os
import pickle
import sys
import types
from collections import OrderedDict

import pytest
import torch

from ascend_rl.rollout.native import NativeEngine
from ascend_rl.rollout.protocol import SamplingParams
from ascend_rl.rollout.tensor_transfer import (
    decode_named_tensors,
    decode_update_weights_from_tensor,
    encode_named_tensors,
)

PROMPTS = [[1, 21, 15, 22, 33, 2, 99, 1], [1, 25, 26, 15, 27, 33, 2, 99, 1, 69], [7, 8, 9]]
TOKEN_IDS = [2, 15, 99, 127]
TOL = 1e-5


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return NativeEngine.from_pretrained(str(tiny_model_dir))


def reference(model, prompt: list[int], output: list[int], temperature: float) -> torch.Tensor:
    """[positions, V] log-probs from one forward over the whole sequence, no padding: row j predicts token j+1."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + output])).logits[0].float()
    return torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)


def top(row: torch.Tensor, n: int) -> list[tuple[float, int]]:
    values, ids = row.topk(n)
    return list(zip(values.tolist(), ids.tolist()))


def assert_pairs(got, expected) -> None:
    assert [t for _, t in got] == [t for _, t in expected]
    assert [v for v, _ in got] == pytest.approx([v for v, _ in expected], abs=TOL)


def assert_sorted_tops(tops: list) -> None:
    for row in tops:
        values = [v for v, _ in row]
        assert values == sorted(values, reverse=True)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("start", [0, 3])
def test_every_logprob_output_equals_a_forward_on_the_full_sequence(engine, temperature, start):
    params = SamplingParams(max_new_tokens=6, temperature=temperature, sampling_seed=4, ignore_eos=True, n=2)
    outs = engine.generate(PROMPTS, params, return_logprob=True, logprob_start_len=start, top_logprobs_num=5,
                           token_ids_logprob=TOKEN_IDS)
    for i, out in enumerate(outs):
        prompt = PROMPTS[i // 2]
        ref = reference(engine.model, prompt, out.output_ids, temperature)
        raw = reference(engine.model, prompt, out.output_ids, 1.0)  # prompt log-probs are unscaled, as SGLang's
        s, P = start, len(prompt)
        # prompt: one entry per token from `start` (none when it is the prompt's length), the first None (SGLang's)
        assert len(out.input_token_logprobs) == len(out.input_top_logprobs) == P - s
        if s < P:
            assert out.input_token_logprobs[0] == (None, prompt[s])
            assert out.input_top_logprobs[0] is None and out.input_token_ids_logprobs[0] is None
        for k in range(1, P - s):
            position = s + k - 1
            lp, token = out.input_token_logprobs[k]
            assert token == prompt[s + k] and lp == pytest.approx(raw[position, token].item(), abs=TOL)
            assert_pairs(out.input_top_logprobs[k], top(raw[position], 5))
            assert_pairs(out.input_token_ids_logprobs[k], [(raw[position, t].item(), t) for t in TOKEN_IDS])
        # output: one entry per generated token
        assert len(out.output_top_logprobs) == len(out.output_token_ids_logprobs) == len(out.output_ids) == 6
        for k, token in enumerate(out.output_ids):
            position = P - 1 + k
            assert out.output_logprobs[k] == pytest.approx(ref[position, token].item(), abs=TOL)
            assert_pairs(out.output_top_logprobs[k], top(ref[position], 5))
            assert_pairs(out.output_token_ids_logprobs[k], [(ref[position, t].item(), t) for t in TOKEN_IDS])
        assert_sorted_tops(out.input_top_logprobs[1:] + out.output_top_logprobs)


def test_top_logprobs_agree_with_the_sampled_tokens(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True),
                             return_logprob=True, top_logprobs_num=3)
    for out in greedy:  # greedy: the chosen token is the most likely, with the same log-prob
        for (lp, token), row in zip(zip(out.output_logprobs, out.output_ids), out.output_top_logprobs):
            assert row[0][1] == token and row[0][0] == pytest.approx(lp, abs=1e-6)
    # with a penalty, every value is under the penalized distribution the token was drawn from
    penalized = SamplingParams(max_new_tokens=8, sampling_seed=1, ignore_eos=True, presence_penalty=1.5)
    for out in engine.generate(PROMPTS, penalized, return_logprob=True, top_logprobs_num=128):
        for (lp, token), row in zip(zip(out.output_logprobs, out.output_ids), out.output_top_logprobs):
            assert dict((t, v) for v, t in row)[token] == pytest.approx(lp, abs=1e-6)
            assert torch.tensor([v for v, _ in row]).exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_default_requests_are_unchanged_and_carry_sglang_defaults(engine):
    params = SamplingParams(max_new_tokens=6, sampling_seed=9, ignore_eos=True, repetition_penalty=1.2)
    plain = engine.generate(PROMPTS, params)
    asked = engine.generate(PROMPTS, params, return_logprob=True)
    extras = engine.generate(PROMPTS, params, return_logprob=True, logprob_start_len=0, top_logprobs_num=4,
                             token_ids_logprob=TOKEN_IDS)
    for a, b, c in zip(plain, asked, extras):  # bit-identical tokens and log-probs, whatever else is asked
        assert a.output_ids == b.output_ids == c.output_ids
        assert a.output_logprobs == b.output_logprobs == c.output_logprobs
        assert a.input_token_logprobs == a.output_top_logprobs == []  # not asked: nothing
    for prompt, out in zip(PROMPTS, asked):  # SGLang's default start: the last prompt token, with None
        assert out.input_token_logprobs == [(None, prompt[-1])]
        assert out.input_top_logprobs == out.output_top_logprobs == out.output_token_ids_logprobs == []
    # without return_logprob, SGLang ignores the other fields
    ignored = engine.generate(PROMPTS, params, logprob_start_len=0, top_logprobs_num=4)
    assert ignored == plain and all(o.e2e_latency is not None and o.e2e_latency >= 0 for o in ignored)


def test_per_prompt_fields_and_prompt_scoring_without_generation(engine):
    outs = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=2, temperature=0), return_logprob=True,
                           logprob_start_len=[0, 7], token_ids_logprob=[[5], [6, 7]])
    assert len(outs[0].input_token_logprobs) == len(PROMPTS[0])
    assert len(outs[1].input_token_logprobs) == len(PROMPTS[1]) - 7
    assert [t for _, t in outs[0].output_token_ids_logprobs[0]] == [5]
    assert [t for _, t in outs[1].input_token_ids_logprobs[1]] == [6, 7]
    # max_new_tokens=0 with a start scores the prompt only (a prefill); the default start then reports none
    scored = engine.generate(PROMPTS, SamplingParams(max_new_tokens=0), return_logprob=True, logprob_start_len=0)
    for prompt, out, full in zip(PROMPTS, scored, engine.generate(PROMPTS, SamplingParams(max_new_tokens=1),
                                                                  return_logprob=True, logprob_start_len=0)):
        assert out.output_ids == [] and out.finish_reason == "length"
        assert [t for _, t in out.input_token_logprobs] == prompt
        assert [v for v, _ in out.input_token_logprobs[1:]] == pytest.approx(
            [v for v, _ in full.input_token_logprobs[1:]], abs=1e-6)
    plain = engine.generate(PROMPTS, SamplingParams(max_new_tokens=0), return_logprob=True)
    assert all(o.input_token_logprobs == [] and o.finish_reason == "length" for o in plain)


def test_streamed_outputs_end_with_the_same_logprobs(engine):
    params = SamplingParams(max_new_tokens=5, sampling_seed=2, ignore_eos=True)
    kwargs = dict(return_logprob=True, logprob_start_len=1, top_logprobs_num=2, token_ids_logprob=[3])
    last = list(engine.generate_stream(PROMPTS, params, **kwargs))[-1]
    assert last == engine.generate(PROMPTS, params, **kwargs)


def test_a_model_without_the_lean_decoder_scores_prompts_too(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()
    engine = NativeEngine(gpt2, eos_token_ids=[0], pad_token_id=0)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]  # left padding shifts the shorter one's positions
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True),
                           return_logprob=True, logprob_start_len=0, top_logprobs_num=2)
    for prompt, out in zip(prompts, outs):
        ref = reference(gpt2, prompt, out.output_ids, 0.0)
        assert [v for v, _ in out.input_token_logprobs[1:]] == pytest.approx(
            [ref[j - 1, prompt[j]].item() for j in range(1, len(prompt))], abs=TOL)
        assert_pairs(out.input_top_logprobs[-1], top(ref[len(prompt) - 2], 2))


@pytest.mark.parametrize("kwargs, message", [
    (dict(logprob_start_len=11), r"logprob_start_len=11 is outside \[-1, 8\]"),
    (dict(logprob_start_len=-2), "logprob_start_len=-2"),
    (dict(top_logprobs_num=-1), "top_logprobs_num=-1"),
    (dict(top_logprobs_num=129), "top_logprobs_num=129"),
    (dict(token_ids_logprob=[1, 128]), r"token_ids_logprob: token ids \[128\]"),
    (dict(logprob_start_len=[0, 1]), "logprob_start_len: expected an integer or a list of 1"),
    (dict(token_ids_logprob=[[1], [2]]), "token_ids_logprob: expected a list of token ids"),
])
def test_bad_logprob_fields_are_refused_before_anything_runs(engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2), return_logprob=True, **kwargs)


# --- CPU weight backup --------------------------------------------------------------------------------------

PARAMS = SamplingParams(max_new_tokens=6, sampling_seed=5, ignore_eos=True)


def test_weights_come_back_from_the_cpu_backup_without_a_push(tiny_model_dir):
    engine = NativeEngine.from_pretrained(str(tiny_model_dir), enable_weights_cpu_backup=True)
    before = engine.generate(PROMPTS, PARAMS, return_logprob=True)
    engine.release_memory_occupation(["weights", "kv_cache"])
    assert all(p.is_meta for p in engine.model.parameters())  # the live weights are gone, not kept
    engine.resume_memory_occupation(["weights", "kv_cache"])
    assert engine.generate(PROMPTS, PARAMS, return_logprob=True) == before


def test_without_a_backup_resumed_weights_must_all_be_pushed(tiny_model_dir, engine):
    released = NativeEngine.from_pretrained(str(tiny_model_dir))
    released.release_memory_occupation()
    assert all(p.is_meta for p in released.model.parameters())
    released.resume_memory_occupation()
    with pytest.raises(RuntimeError, match=r"not loaded \(resumed after a release without enable_weights_cpu_backup"):
        released.generate(PROMPTS, PARAMS)
    named = list(engine.model.named_parameters())
    released.update_weights_from_tensor(named[:-1])  # one left out: still refused, never garbage
    with pytest.raises(RuntimeError, match=rf"1 of {len(named)} parameters have no values \(e.g. {named[-1][0]}\)"):
        released.generate(PROMPTS, PARAMS)
    released.update_weights_from_tensor(named[-1:], load_format="direct", flush_cache=False)
    assert released.generate(PROMPTS, PARAMS) == engine.generate(PROMPTS, PARAMS)


def test_a_backup_keeps_a_dummy_load_unloaded_and_pushes_are_checked(tiny_model_dir):
    dummy = NativeEngine.from_pretrained(str(tiny_model_dir), load_format="dummy", enable_weights_cpu_backup=True)
    dummy.release_memory_occupation()
    dummy.resume_memory_occupation()
    with pytest.raises(RuntimeError, match=r"weights are not loaded \(load_format=dummy\)"):
        dummy.generate(PROMPTS, PARAMS)
    name, param = next(iter(dummy.model.named_parameters()))
    with pytest.raises(ValueError, match=rf"{name} has shape \(3,\), the engine's parameter"):
        dummy.update_weights_from_tensor([(name, torch.zeros(3))])
    with pytest.raises(ValueError, match="load_format='flattened_bucket'"):
        dummy.update_weights_from_tensor([(name, param)], load_format="flattened_bucket")


# --- update_weights_from_tensor bodies ----------------------------------------------------------------------

def body_of(payload: bytes, **extra) -> dict:
    return {"serialized_named_tensors": [base64.b64encode(payload).decode()], **extra}


def perturbed(model) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [(n, p.detach() + 0.05 * torch.randn(p.shape, generator=generator)) for n, p in model.named_parameters()]


def test_a_pickled_body_updates_the_engine_like_a_direct_call(tiny_model_dir, engine):
    named = perturbed(engine.model)
    direct = NativeEngine.from_pretrained(str(tiny_model_dir))
    direct.update_weights_from_tensor(named)
    over_body = NativeEngine.from_pretrained(str(tiny_model_dir))
    # a bf16 copy and a transposed (non-contiguous) view travel too; the engine casts and copies
    sent = [(n, t.to(torch.bfloat16) if i == 0 else t.t().contiguous().t() if t.dim() == 2 else t)
            for i, (n, t) in enumerate(named)]
    update = decode_update_weights_from_tensor(body_of(pickle.dumps(sent), flush_cache=False, weight_version="v2"))
    assert (update.load_format, update.flush_cache, update.weight_version) == (None, False, "v2")
    assert [n for n, _ in update.named_tensors] == [n for n, _ in sent]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(update.named_tensors, sent))
    body = {"serialized_named_tensors": [encode_named_tensors(named)]}  # the sending side's helper
    over_body.update_weights_from_tensor(decode_update_weights_from_tensor(body).named_tensors)
    assert over_body.generate(PROMPTS, PARAMS) == direct.generate(PROMPTS, PARAMS)


def test_torch_save_payloads_and_sglang_local_serialized_tensors_decode(monkeypatch):
    named = [("a", torch.arange(6.0).reshape(2, 3)), ("b", torch.ones(2, dtype=torch.float16))]
    buffer = io.BytesIO()
    torch.save(named, buffer)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(decode_named_tensors(buffer.getvalue()), named))

    module = types.ModuleType("sglang.srt.model_executor.model_runner")
    for parent in ("sglang", "sglang.srt", "sglang.srt.model_executor"):  # so pickle can name the class
        monkeypatch.setitem(sys.modules, parent, sys.modules.get(parent) or types.ModuleType(parent))

    class LocalSerializedTensor:  # SGLang's shape: one serialized tensor per TP rank
        def __init__(self, values):
            self.values = values

    LocalSerializedTensor.__module__, LocalSerializedTensor.__qualname__ = module.__name__, "LocalSerializedTensor"
    module.LocalSerializedTensor = LocalSerializedTensor
    monkeypatch.setitem(sys.modules, module.__name__, module)
    wrapped = [(n, LocalSerializedTensor([pickle.dumps(t), pickle.dumps(t + 1)])) for n, t in named]
    payload = base64.b64encode(pickle.dumps(wrapped)).decode()  # one per rank, as SGLang's weight_sync sends
    body = {"serialized_named_tensors": [payload, payload], "load_format": "direct"}
    update = decode_update_weights_from_tensor(body, tp_rank=1)
    assert all(torch.equal(x, y + 1) for (_, x), (_, y) in zip(update.named_tensors, named))


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


class OutOfBounds:
    def __reduce__(self):  # a view far past its 2-element storage
        storage = torch.ones(2).untyped_storage()
        typed = torch.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
        return torch._utils._rebuild_tensor_v2, (typed, 0, (1000,), (1,), False, OrderedDict())


def test_hostile_and_malformed_bodies_are_refused_naming_the_field(tmp_path):
    from multiprocessing.reduction import ForkingPickler

    marker = tmp_path / "ran"
    with pytest.raises(ValueError, match=r"serialized_named_tensors: the pickle names posix.system"):
        decode_update_weights_from_tensor(body_of(pickle.dumps([("w", Evil(marker))])))
    assert not marker.exists()
    handles = io.BytesIO()
    ForkingPickler(handles).dump([("w", torch.ones(2))])  # what SGLang's serializer writes: a memory handle
    with pytest.raises(ValueError, match="serialized_named_tensors: tensors sent as memory handles"):
        decode_update_weights_from_tensor(body_of(handles.getvalue()))
    with pytest.raises(ValueError, match=r"serialized_named_tensors: a tensor view of size \(1000,\) past the end"):
        decode_update_weights_from_tensor(body_of(pickle.dumps([("w", OutOfBounds())])))
    cases = [
        ({"serialized_named_tensors": ["not base64!"]}, "serialized_named_tensors: not valid base64"),
        ({"serialized_named_tensors": []}, "serialized_named_tensors must be a non-empty list"),
        ({"serialized_named_tensors": "abc"}, "serialized_named_tensors must be a non-empty list"),
        ({"serialized_named_tensors": [7]}, "serialized_named_tensors: a payload must be base64 text"),
        (body_of(pickle.dumps({"w": [1, 2]})), r"serialized_named_tensors: w: expected a tensor, got list"),
        (body_of(pickle.dumps([("w",)])), "serialized_named_tensors: item 0 is not a"),
        (body_of(b"\x80\x04junk"), "serialized_named_tensors: not a readable payload"),
        (body_of(pickle.dumps([])) | {"load_format": "flattened_bucket"}, "load_format='flattened_bucket'"),
        (body_of(pickle.dumps([])) | {"flush_cache": "yes"}, "flush_cache must be true or false"),
        (body_of(pickle.dumps([])) | {"weight_version": 3}, "weight_version must be a string"),
    ]
    for body, message in cases:
        with pytest.raises(ValueError, match=message):
            decode_update_weights_from_tensor(body)
    with pytest.raises(ValueError, match="none for tensor-parallel rank 1"):
        decode_update_weights_from_tensor(body_of(pickle.dumps([])), tp_rank=1)
