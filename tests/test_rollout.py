"""The native engine behind the SGLang-shaped protocol."""

import pytest
import torch

from ascend_rl.data.collate import collate
from ascend_rl.rollout.native import NativeEngine
from ascend_rl.rollout.protocol import SamplingParams
from ascend_rl.rollout.steppers import LeanStepper, TransformersStepper
from ascend_rl.workers.model_io import response_log_probs

PROMPTS = [[1, 21, 15, 22, 33, 2, 99, 1], [1, 25, 26, 15, 27, 33, 2, 99, 1, 69]]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return NativeEngine.from_pretrained(str(tiny_model_dir))


def test_seeded_samples_are_reproducible_and_independent_of_the_batch(engine):
    params = SamplingParams(max_new_tokens=6, sampling_seed=123, ignore_eos=True)
    alone = engine.generate([PROMPTS[0]], params)[0]
    batched = engine.generate(PROMPTS, [params, SamplingParams(max_new_tokens=6, sampling_seed=5, ignore_eos=True)])
    assert batched[0].output_ids == alone.output_ids
    assert len(alone.output_ids) == 6 and alone.finish_reason == "length"


def test_n_samples_differ_and_come_in_prompt_order(engine):
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, n=4, sampling_seed=0, ignore_eos=True))
    assert len(outs) == 8
    assert all(o.prompt_tokens == len(PROMPTS[0]) for o in outs[:4])
    assert all(o.prompt_tokens == len(PROMPTS[1]) for o in outs[4:])
    assert len({tuple(o.output_ids) for o in outs[:4]}) > 1


def test_stop_token_ids_end_generation_with_stop(engine):
    free = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))[0]
    stop_at = free.output_ids[2]
    out = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True,
                                                       stop_token_ids=(stop_at,)))[0]
    first = free.output_ids.index(stop_at)
    assert out.output_ids == free.output_ids[:first + 1]
    assert out.finish_reason == "stop"


def test_engine_logprobs_match_the_trainers_recompute(engine, tiny_model_dir):
    for temperature in (1.0, 0.7):
        outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=temperature, sampling_seed=3,
                                                       ignore_eos=True), return_logprob=True)
        batch = collate(PROMPTS, [o.output_ids for o in outs], pad_token_id=0)
        recomputed, _ = response_log_probs(engine.model, batch, temperature=temperature)
        engine_lp = torch.tensor([o.output_logprobs for o in outs])
        assert (recomputed - engine_lp).abs().max() < 1e-4


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True))[0]
    top1 = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=5, top_k=1, sampling_seed=9, ignore_eos=True))[0]
    assert top1.output_ids == greedy.output_ids


def test_weight_update_equals_a_fresh_engine_with_those_weights(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05, alpha=1.0)
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text((tiny_model_dir / "generation_config.json").read_text())
    fresh = NativeEngine.from_pretrained(str(tmp_path / "m"))
    updated = NativeEngine.from_pretrained(str(tiny_model_dir))
    updated.release_memory_occupation(["kv_cache", "weights"])
    with pytest.raises(RuntimeError, match="memory released"):
        updated.generate([PROMPTS[0]], SamplingParams(max_new_tokens=2))
    updated.resume_memory_occupation(["weights"])
    updated.update_weights_from_tensor(model.named_parameters())
    updated.resume_memory_occupation(["kv_cache"])
    params = SamplingParams(max_new_tokens=8, sampling_seed=11, ignore_eos=True)
    assert updated.generate(PROMPTS, params)[1].output_ids == fresh.generate(PROMPTS, params)[1].output_ids


def test_resumed_weights_must_be_pushed_before_generating(tiny_model_dir):
    engine = NativeEngine.from_pretrained(str(tiny_model_dir))
    engine.release_memory_occupation()
    engine.resume_memory_occupation()
    with pytest.raises(RuntimeError, match="call update_weights_from_tensor"):
        engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=2))
    with pytest.raises(KeyError, match="no parameter 'nope'"):
        engine.update_weights_from_tensor([("nope", torch.zeros(1))])
    with pytest.raises(ValueError, match="unknown memory tags"):
        engine.release_memory_occupation(["cuda_graph_x"])


def test_a_dummy_load_waits_for_pushed_weights(tiny_model_dir, engine):
    from ascend_rl.errors import UserError

    dummy = NativeEngine.from_pretrained(str(tiny_model_dir), load_format="dummy")
    with pytest.raises(RuntimeError, match=r"weights are not loaded \(load_format=dummy"):
        dummy.generate([PROMPTS[0]], SamplingParams(max_new_tokens=2))
    dummy.update_weights_from_tensor(engine.model.named_parameters())
    params = SamplingParams(max_new_tokens=6, sampling_seed=2, ignore_eos=True)
    assert dummy.generate(PROMPTS, params) == engine.generate(PROMPTS, params)
    with pytest.raises(UserError, match="load_format=safetensors: the native engine reads auto or dummy"):
        NativeEngine.from_pretrained(str(tiny_model_dir), load_format="safetensors")


def test_sampling_params_use_sglang_names():
    assert SamplingParams.from_dict({"max_new_tokens": 3, "stop_token_ids": [1, 2]}).stop_token_ids == (1, 2)
    with pytest.raises(ValueError, match=r"unknown sampling_params \['max_tokens'\]"):
        SamplingParams.from_dict({"max_tokens": 3})


def test_lean_decoder_is_used_for_qwen3_and_other_models_fall_back(engine, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    assert isinstance(engine.stepper, LeanStepper)  # Qwen3 passed the self-check against the transformers forward
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()
    fallback = NativeEngine(gpt2, eos_token_ids=[0], pad_token_id=0)
    assert isinstance(fallback.stepper, TransformersStepper)
    outs = fallback.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4, n=2, sampling_seed=1, ignore_eos=True),
                             return_logprob=True)
    batch = collate([PROMPTS[0]] * 2, [o.output_ids for o in outs], pad_token_id=0)
    recomputed, _ = response_log_probs(gpt2, batch)
    assert (recomputed - torch.tensor([o.output_logprobs for o in outs])).abs().max() < 1e-4


def test_shared_prompts_do_not_change_samples(engine):
    """A sample is the same whether other samples share its prompt (one prefill, copied KV rows) or not."""
    params = SamplingParams(max_new_tokens=8, sampling_seed=40, temperature=1.0)
    alone = engine.generate([PROMPTS[1]], params)[0]
    crowd = engine.generate([PROMPTS[0], PROMPTS[1], PROMPTS[1]],
                            [SamplingParams(max_new_tokens=8, sampling_seed=7, n=6), params,
                             SamplingParams(max_new_tokens=8, sampling_seed=99)])
    assert crowd[6].output_ids == alone.output_ids


def test_stop_strings_end_a_sample_where_the_text_first_contains_them(engine, tokenizer):
    prompt = tokenizer("12+30=")["input_ids"]
    free = engine.generate([prompt], SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True))[0]
    text = tokenizer.decode(free.output_ids)
    stop = text[5:7]  # two characters that first appear at position 5 or earlier
    first = text.index(stop)
    out = engine.generate([prompt], SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True,
                                                   stop=(stop, "never-produced")))[0]
    assert out.finish_reason == "stop" and out.matched == stop
    assert out.output_ids == free.output_ids[:len(out.output_ids)]  # the same tokens, up to the stop
    assert tokenizer.decode(out.output_ids).endswith(stop) and len(tokenizer.decode(out.output_ids)) == first + 2
    assert SamplingParams.from_dict({"stop": "x"}).stop == ("x",)  # SGLang's one string or a list


def test_min_p_one_keeps_only_the_most_likely_token(engine):
    prompts = [[1, 21, 15, 22, 33, 2], [5, 6, 7]]
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    sampled = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.0, min_p=1.0, sampling_seed=3,
                                                      ignore_eos=True))
    assert [o.output_ids for o in sampled] == [o.output_ids for o in greedy]
    loose = engine.generate(prompts * 4, SamplingParams(max_new_tokens=8, temperature=1.0, min_p=0.0,
                                                        sampling_seed=3, ignore_eos=True))
    assert any(o.output_ids != greedy[0].output_ids for o in loose[0::2])  # without it, sampling varies


def test_stop_strings_without_a_tokenizer_are_a_clear_error(engine):
    bare = NativeEngine(engine.model, eos_token_ids=[2], pad_token_id=0)
    with pytest.raises(ValueError, match="stop strings need the engine's tokenizer"):
        bare.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, stop=("a",)))


# --- continuous batching -------------------------------------------------------------------------------

MIXED = [[1, 21, 15], [1, 25, 26, 15, 27, 33, 2, 99, 1, 69, 40, 41], [1, 30, 31, 32, 33, 2], [1, 50] * 4]


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """transformers' greedy generate on one unpadded prompt, cut after the first end-of-sequence token."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False)[0, len(prompt):].tolist()
    return out[:next((i + 1 for i, t in enumerate(out) if t in eos_ids), len(out))]


def spy_on_joins(engine, monkeypatch) -> list[tuple[int, int]]:
    """(rows kept running, rows joining) for every join."""
    joins, admit = [], engine.stepper.admit
    monkeypatch.setattr(engine.stepper, "admit",
                        lambda keep, prompts, room: joins.append((len(keep), len(prompts))) or admit(keep, prompts, room))
    return joins


def test_greedy_equals_transformers_generate_with_shared_prompts_and_rows_joining(tiny_model_dir, monkeypatch):
    engine = NativeEngine.from_pretrained(str(tiny_model_dir), max_num_seqs=3)
    joins = spy_on_joins(engine, monkeypatch)
    limits = [3, 14, 7, 10]
    params = [SamplingParams(max_new_tokens=m, temperature=0, n=2) for m in limits]
    outs = engine.generate(MIXED, params)
    eos = set(engine.scheduler.eos_ids)
    for i, (prompt, limit) in enumerate(zip(MIXED, limits)):
        expected = hf_greedy(engine.model, prompt, limit, eos)
        assert [outs[2 * i].output_ids, outs[2 * i + 1].output_ids] == [expected, expected]
    assert max(kept + joining for kept, joining in joins) <= 3  # max_num_seqs
    assert any(kept > 0 for kept, _ in joins)  # rows joined a batch that was running


def test_samples_do_not_depend_on_the_batch_budget(tiny_model_dir):
    params = [SamplingParams(max_new_tokens=m, n=3, sampling_seed=11, ignore_eos=True) for m in (5, 9, 4, 12)]
    roomy = NativeEngine.from_pretrained(str(tiny_model_dir)).generate(MIXED, params, return_logprob=True)
    tight = NativeEngine.from_pretrained(str(tiny_model_dir), max_num_seqs=2, max_num_batched_tokens=16)
    squeezed = tight.generate(MIXED, params, return_logprob=True)
    assert [o.output_ids for o in squeezed] == [o.output_ids for o in roomy]
    assert torch.allclose(torch.tensor(sum((o.output_logprobs for o in squeezed), [])),
                          torch.tensor(sum((o.output_logprobs for o in roomy), [])), atol=1e-5)


def test_prefill_and_kv_budgets_bound_each_join(tiny_model_dir, monkeypatch):
    from ascend_rl.rollout.scheduler import Budget

    model = NativeEngine.from_pretrained(str(tiny_model_dir)).model
    kv_tokens = 3 * (12 + 10)  # three rows of the longest prompt and max_new_tokens
    engine = NativeEngine(model, [2], 0, Budget(max_num_seqs=64, max_num_batched_tokens=24, kv_cache_tokens=kv_tokens))
    widths = []
    prefill = engine.stepper.decoder.prefill
    monkeypatch.setattr(engine.stepper.decoder, "prefill", lambda ids, mask: widths.append(ids.shape) or prefill(ids, mask))
    joins = spy_on_joins(engine, monkeypatch)
    outs = engine.generate(MIXED * 2, SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))
    assert all(len(o.output_ids) == 10 for o in outs)
    assert all(rows * width <= 24 for rows, width in widths[1:])  # the first join may exceed (one prompt always fits)
    assert max(kept + joining for kept, joining in joins) <= 3


def test_requests_over_the_context_or_the_cache_budget_are_refused(tiny_model_dir):
    from ascend_rl.rollout.scheduler import Budget

    engine = NativeEngine.from_pretrained(str(tiny_model_dir), context_length=20)
    with pytest.raises(ValueError, match="maximum context length of 20 tokens.*21 tokens: 3 tokens from the input"):
        engine.generate([MIXED[0]], SamplingParams(max_new_tokens=18))
    assert len(engine.generate([MIXED[0]], SamplingParams(max_new_tokens=17, ignore_eos=True))[0].output_ids) == 17
    small = NativeEngine(engine.model, [2], 0, Budget(kv_cache_tokens=10))
    with pytest.raises(ValueError, match="11 tokens does not fit the KV cache budget of 10 tokens"):
        small.generate([MIXED[0]], SamplingParams(max_new_tokens=8))


def test_kv_budget_is_the_memory_share_left_after_the_weights(tiny_model_dir, monkeypatch):
    from ascend_rl.errors import UserError
    from ascend_rl.rollout.native import kv_cache_tokens

    model = NativeEngine.from_pretrained(str(tiny_model_dir)).model
    weights = sum(p.numel() * 4 for p in model.parameters())
    per_token = 2 * 2 * 2 * 32 * 4  # K and V × 2 layers × 2 KV heads × head dim 32 × fp32
    monkeypatch.setattr("ascend_rl.platform.total_memory_bytes", lambda device: 4 * weights)
    assert kv_cache_tokens(model, "cpu", 0.5) == (2 * weights - weights) // per_token
    with pytest.raises(UserError, match="gpu_memory_utilization=0.2: .* leaves no room for a KV cache"):
        kv_cache_tokens(model, "cpu", 0.2)


def test_a_request_from_another_thread_joins_the_running_batch(tiny_model_dir):
    import threading
    import time

    engine = NativeEngine.from_pretrained(str(tiny_model_dir))
    short = SamplingParams(max_new_tokens=5, sampling_seed=7, ignore_eos=True)
    alone = engine.generate([MIXED[2]], short)[0]
    finished_at = {}

    def long_call():
        engine.generate([MIXED[0]], SamplingParams(max_new_tokens=480, ignore_eos=True, sampling_seed=1))
        finished_at["long"] = time.monotonic()

    thread = threading.Thread(target=long_call)
    thread.start()
    while not engine.scheduler.busy:
        time.sleep(0.001)
    joined = engine.generate([MIXED[2]], short)[0]
    finished_at["short"] = time.monotonic()
    thread.join(60)
    assert joined.output_ids == alone.output_ids
    assert finished_at["short"] < finished_at["long"]  # it did not wait for the long request to end
