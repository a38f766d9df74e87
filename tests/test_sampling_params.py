"""Every SGLang 0.5.8 sampling parameter: accepted and checked as SGLang checks it; penalties, min_new_tokens and
logit_bias applied per row in the batched sampler, checked against a direct computation on the model's logits."""

import json
import re
import sys
import threading
import urllib.error
import urllib.request

import pytest
import torch

from ascend_rl.rollout.http_server import make_server
from ascend_rl.rollout.native import NativeEngine
from ascend_rl.rollout.protocol import SAMPLING_KEYS, SamplingParams

PROMPTS = [[1, 21, 15, 22, 33, 2, 99, 1], [1, 25, 26, 15, 27, 33, 2, 99, 1, 69], [5, 6, 7], [1, 30, 31, 32]]
EOS = 2  # the tiny model's <|im_end|>
# The keyword arguments of SGLang 0.5.8's SamplingParams.__init__ (srt/sampling/sampling_params.py).
SGLANG_KEYS = {"max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
               "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
               "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
               "no_stop_trim", "custom_params", "stream_interval", "logit_bias", "sampling_seed"}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return NativeEngine.from_pretrained(str(tiny_model_dir))


# --- the keys and their checks ---------------------------------------------------------------------------

def test_every_sglang_key_is_accepted_and_survives_to_dict():
    assert set(SAMPLING_KEYS) == SGLANG_KEYS
    given = {"max_new_tokens": 9, "stop": "x", "stop_token_ids": [5], "stop_regex": ["a+b"], "temperature": 0.5,
             "top_p": 0.9, "top_k": 4, "min_p": 0.1, "frequency_penalty": 0.5, "presence_penalty": -0.5,
             "repetition_penalty": 1.2, "min_new_tokens": 2, "n": 2, "ignore_eos": True, "skip_special_tokens": False,
             "spaces_between_special_tokens": False, "no_stop_trim": True, "custom_params": {"k": [1]},
             "stream_interval": 3, "logit_bias": {"7": 1.5, "9": -2}, "sampling_seed": 4, "json_schema": None}
    params = SamplingParams.from_dict(given, vocab_size=128)
    assert params.logit_bias == {"7": 1.5, "9": -2.0} and params.bias_by_token() == {7: 1.5, 9: -2.0}
    assert params.stop == ("x",) and params.stop_regex == ("a+b",) and params.custom_params == {"k": [1]}
    out = params.to_dict()
    assert out["repetition_penalty"] == 1.2 and out["logit_bias"] == {"7": 1.5, "9": -2.0} and out["stop_regex"] == ["a+b"]
    assert SamplingParams.from_dict(json.loads(json.dumps(out))) == params
    # a request without the newer keys reads as before: only the base keys go to SGLang
    assert set(SamplingParams(sampling_seed=1).to_dict()) == {"max_new_tokens", "temperature", "top_p", "top_k", "min_p",
                                                              "n", "stop", "stop_token_ids", "ignore_eos", "sampling_seed"}
    assert hash(params) == hash(SamplingParams.from_dict(given, vocab_size=128))  # dict fields do not break hashing


@pytest.mark.parametrize("given, message", [
    ({"repetition_penalty": 0}, "repetition_penalty must be in (0, 2], got 0.0."),
    ({"repetition_penalty": 2.5}, "repetition_penalty must be in (0, 2], got 2.5."),
    ({"repetition_penalty": float("nan")}, "repetition_penalty must be in (0, 2], got nan."),
    ({"repetition_penalty": "1"}, "repetition_penalty must be a number, got '1'"),
    ({"frequency_penalty": -2.5}, "frequency_penalty must be in [-2, 2], got -2.5."),
    ({"frequency_penalty": 3}, "frequency_penalty must be in [-2, 2], got 3.0."),
    ({"presence_penalty": 2.01}, "presence_penalty must be in [-2, 2], got 2.01."),
    ({"presence_penalty": True}, "presence_penalty must be a number, got True"),
    ({"min_new_tokens": -1}, "min_new_tokens must be in [0, max_new_tokens], got -1."),
    ({"min_new_tokens": 5, "max_new_tokens": 4}, "min_new_tokens must be in [0, max_new_tokens(4)], got 5."),
    ({"min_new_tokens": 1.5}, "min_new_tokens must be an integer, got 1.5"),
    ({"logit_bias": {"128": 1.0}}, "logit_bias must have keys in [0, 127], got 128."),
    ({"logit_bias": {"-1": 1.0}}, "logit_bias must have keys in [0, 127], got -1."),
    ({"logit_bias": {"a": 1.0}}, "logit_bias keys must be token ids, got 'a'"),
    ({"logit_bias": {"3": "up"}}, "logit_bias['3'] must be a finite number, got 'up'"),
    ({"logit_bias": {"3": float("inf")}}, "logit_bias['3'] must be a finite number, got inf"),
    ({"logit_bias": [[3, 1.0]]}, "logit_bias must be an object"),
    ({"stop_regex": "("}, "stop_regex '(' is not a regular expression"),
    ({"stop_regex": 5}, "stop_regex must be a string or a list of strings"),
    ({"regex": "a", "json_schema": "{}"}, "Only one of regex, json_schema, or ebnf can be set."),
    ({"ebnf": 5}, "ebnf must be a string, got 5"),
    ({"custom_params": [1]}, "custom_params must be an object, got [1]"),
    ({"skip_special_tokens": "no"}, "skip_special_tokens must be true or false, got 'no'"),
    ({"no_stop_trim": 1}, "no_stop_trim must be true or false, got 1"),
    ({"stream_interval": -1}, "stream_interval must be at least 0, got -1."),
    ({"max_tokens": 3}, "unknown sampling_params ['max_tokens']"),
])
def test_out_of_range_values_are_errors_naming_the_key(given, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingParams.from_dict(given, vocab_size=128)


def test_range_ends_sglang_allows_are_accepted():
    for edge in ({"frequency_penalty": -2, "presence_penalty": 2}, {"repetition_penalty": 2},
                 {"min_new_tokens": 3, "max_new_tokens": 3}, {"logit_bias": {"127": -100}}, {"stream_interval": 0}):
        SamplingParams.from_dict(edge, vocab_size=128)


# --- the sampler: each penalty against a direct computation -----------------------------------------------

def expected_logits(raw: torch.Tensor, generated: list[int], p: SamplingParams, stop_ids: set[int]) -> torch.Tensor:
    """SGLang's penalties written out token by token: over the generated tokens only."""
    logits = raw.clone()
    for token in set(generated):
        logits[token] -= p.frequency_penalty * generated.count(token) + p.presence_penalty
        r = p.repetition_penalty
        logits[token] = logits[token] * r if logits[token] < 0 else logits[token] / r
    if len(generated) < p.min_new_tokens:
        logits[sorted(stop_ids)] = float("-inf")
    for token, bias in p.bias_by_token().items():
        logits[token] += bias
    return logits


PENALIZED = [
    {"frequency_penalty": 1.0},
    {"presence_penalty": 1.5},
    {"presence_penalty": -0.5, "frequency_penalty": 0.3},
    {"repetition_penalty": 1.5},
    {"repetition_penalty": 0.6},
    {"logit_bias": {"50": 3.0, "1": -2.0}},
    {"min_new_tokens": 4, "logit_bias": {str(EOS): 30.0}},
    {"frequency_penalty": 0.5, "repetition_penalty": 1.3, "logit_bias": {"40": 1.0}, "min_new_tokens": 2},
]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("settings", PENALIZED, ids=lambda s: ",".join(s))
def test_penalties_match_a_direct_computation_on_the_logits(engine, settings, temperature):
    params = SamplingParams(max_new_tokens=8, temperature=temperature, sampling_seed=17, **settings)
    out = engine.generate([PROMPTS[0]], params, return_logprob=True)[0]
    plain = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, temperature=temperature, sampling_seed=17),
                            return_logprob=True)[0]
    # the setting does change what comes out: the tokens, or at least their probabilities
    assert out.output_ids != plain.output_ids or out.output_logprobs != pytest.approx(plain.output_logprobs, abs=1e-3)
    stop_ids = set(engine.scheduler.eos_ids)
    for step, token in enumerate(out.output_ids):
        with torch.no_grad():
            raw = engine.model(torch.tensor([PROMPTS[0] + out.output_ids[:step]])).logits[0, -1].float()
        logits = expected_logits(raw, out.output_ids[:step], params, stop_ids)
        if temperature == 0:
            assert token == int(logits.argmax())
        # SGLang's log-probs: of the penalized logits over the temperature, before top-k/top-p
        expected = torch.log_softmax(logits / (temperature or 1.0), dim=-1)[token]
        assert out.output_logprobs[step] == pytest.approx(float(expected), abs=1e-4)


def test_min_new_tokens_holds_off_eos_and_stop_token_ids(engine):
    eager = {str(EOS): 100.0}  # EOS pushed far up: without min_new_tokens the sample ends at once
    assert engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=10, temperature=0, logit_bias=eager))[0] \
        .output_ids == [EOS]
    held = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=10, temperature=0, logit_bias=eager,
                                                        min_new_tokens=4))[0]
    assert len(held.output_ids) == 5 and held.output_ids[-1] == EOS and held.finish_reason == "stop"
    assert not set(held.output_ids[:4]) & engine.scheduler.eos_ids
    stop = SamplingParams(max_new_tokens=10, sampling_seed=3, logit_bias={"50": 100.0}, stop_token_ids=(50,),
                          min_new_tokens=3)
    out = engine.generate([PROMPTS[1]], stop)[0]
    assert len(out.output_ids) == 4 and out.output_ids[-1] == 50 and 50 not in out.output_ids[:3]
    assert out.finish_reason == "stop" and out.matched == 50


def spy_on_joins(engine, monkeypatch) -> list[tuple[int, int]]:
    """(rows kept running, rows joining) for every join."""
    joins, admit = [], engine.stepper.admit
    monkeypatch.setattr(engine.stepper, "admit",
                        lambda keep, prompts, room: joins.append((len(keep), len(prompts))) or admit(keep, prompts, room))
    return joins


MIXED = [SamplingParams(max_new_tokens=3, sampling_seed=11),
         SamplingParams(max_new_tokens=9, sampling_seed=12, frequency_penalty=1.2, presence_penalty=0.4),
         SamplingParams(max_new_tokens=7, sampling_seed=13, repetition_penalty=1.4, logit_bias={"40": 2.0}),
         SamplingParams(max_new_tokens=6, sampling_seed=14, min_new_tokens=5, logit_bias={str(EOS): 4.0})]


def test_rows_with_different_penalties_in_one_batch_match_each_alone(engine, monkeypatch):
    alone = [engine.generate([prompt], p, return_logprob=True)[0] for prompt, p in zip(PROMPTS, MIXED)]
    joins = spy_on_joins(engine, monkeypatch)
    together = engine.generate(PROMPTS, MIXED, return_logprob=True)
    assert joins == [(0, 4)]  # one batch
    for one, many in zip(alone, together):
        assert many.output_ids == one.output_ids and many.finish_reason == one.finish_reason
        assert many.output_logprobs == pytest.approx(one.output_logprobs, abs=1e-5)


def test_penalties_follow_rows_that_leave_and_join(tiny_model_dir, engine, monkeypatch):
    """Two rows at a time: finished rows leave and waiting ones join a batch with other penalties."""
    small = NativeEngine.from_pretrained(str(tiny_model_dir), max_num_seqs=2)
    joins = spy_on_joins(small, monkeypatch)
    outs = small.generate(PROMPTS, MIXED)
    assert len(joins) >= 3 and any(kept for kept, _ in joins[1:])  # later rows joined running ones
    assert [o.output_ids for o in outs] == [o.output_ids for o in engine.generate(PROMPTS, MIXED)]


def test_neutral_settings_are_bit_identical_to_none(engine):
    plain = SamplingParams(max_new_tokens=8, sampling_seed=5, ignore_eos=True)
    neutral = SamplingParams.from_dict({"max_new_tokens": 8, "sampling_seed": 5, "ignore_eos": True,
                                        "repetition_penalty": 1.0, "frequency_penalty": 0, "presence_penalty": 0.0,
                                        "min_new_tokens": 0, "logit_bias": {}, "custom_params": {"a": 1},
                                        "skip_special_tokens": False, "no_stop_trim": True, "stream_interval": 2})
    for temperature in (0.0, 1.0):
        a = engine.generate(PROMPTS, replace_temperature(plain, temperature), return_logprob=True)
        b = engine.generate(PROMPTS, replace_temperature(neutral, temperature), return_logprob=True)
        assert [(o.output_ids, o.output_logprobs) for o in a] == [(o.output_ids, o.output_logprobs) for o in b]


def replace_temperature(params: SamplingParams, temperature: float) -> SamplingParams:
    from dataclasses import replace

    return replace(params, temperature=temperature)


# --- stop_regex, structured output ------------------------------------------------------------------------

def test_stop_regex_ends_a_sample_where_the_text_first_matches(engine, tokenizer):
    prompt = tokenizer("12+30=")["input_ids"]
    free = engine.generate([prompt], SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True))[0]
    text = tokenizer.decode(free.output_ids)
    for pattern in (re.escape(text[5:7]), re.escape(text[0]) + ".*" + re.escape(text[6])):  # bounded, unbounded
        out = engine.generate([prompt], SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True,
                                                       stop_regex=(pattern,)))[0]
        first = next(k for k in range(1, 25) if re.search(pattern, tokenizer.decode(free.output_ids[:k])))
        assert out.output_ids == free.output_ids[:first]
        assert out.finish_reason == "stop" and out.matched == pattern


def test_structured_output_without_xgrammar_is_refused_and_custom_params_carried(engine, monkeypatch):
    """With xgrammar, tests/test_structured_output.py; without it (as here), a 400 that says how to get it."""
    monkeypatch.setitem(sys.modules, "xgrammar", None)
    for key in ("json_schema", "regex", "ebnf", "structural_tag"):
        with pytest.raises(ValueError, match=rf"{key}: structured output is not available in this build: it needs "
                                             rf"xgrammar \(pip install ascend-rl\[structured\]\)"):
            engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=2, **{key: "x"}))
    carried = SamplingParams(max_new_tokens=3, sampling_seed=1, custom_params={"shift": 2})
    assert len(engine.generate([PROMPTS[0]], carried)[0].output_ids) >= 1


# --- over HTTP: what verl sends ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(engine, tiny_model_dir):
    srv = make_server(engine, str(tiny_model_dir), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def post(srv, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{srv.server_port}/generate", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# verl 0.9.1's agent loop (experimental/agent_loop/agent_loop.py): these sampling params, `logprobs` popped into
# return_logprob and max_new_tokens added by its SGLang server (async_sglang_server.py), None values dropped.
VERL_ROLLOUT = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0}
VERL_VALIDATE = {"temperature": 0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0}


def test_the_body_verl_sends_generates(server, engine):
    status, answer = post(server, {"rid": "verl-0", "input_ids": PROMPTS[0],
                                   "sampling_params": {**VERL_ROLLOUT, "max_new_tokens": 6}, "return_logprob": True})
    assert status == 200, answer
    entries = answer["meta_info"]["output_token_logprobs"]
    assert 1 <= len(answer["output_ids"]) <= 6 and [e[1] for e in entries] == answer["output_ids"]
    assert all(e[0] <= 0 for e in entries) and answer["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    status, answer = post(server, {"rid": "verl-1", "input_ids": PROMPTS[1],
                                   "sampling_params": {**VERL_VALIDATE, "max_new_tokens": 6}, "return_logprob": True})
    greedy = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=6, temperature=0), return_logprob=True)[0]
    assert status == 200 and answer["output_ids"] == greedy.output_ids
    assert [e[0] for e in answer["meta_info"]["output_token_logprobs"]] == pytest.approx(greedy.output_logprobs)


def test_penalties_over_http_equal_the_engine_and_bad_ones_are_400(server, engine, monkeypatch):
    sampling = {"max_new_tokens": 6, "temperature": 0, "frequency_penalty": 1.0, "logit_bias": {"40": 2.0},
                "min_new_tokens": 2, "repetition_penalty": 1.2, "skip_special_tokens": False}
    status, answer = post(server, {"input_ids": PROMPTS[2], "sampling_params": sampling})
    direct = engine.generate([PROMPTS[2]], SamplingParams.from_dict(sampling))[0]
    assert status == 200 and answer["output_ids"] == direct.output_ids
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # structured output as where xgrammar is not installed
    for body, message in [
        ({"sampling_params": {"repetition_penalty": 0}}, "repetition_penalty must be in (0, 2], got 0.0."),
        ({"sampling_params": {"logit_bias": {"500": 1}}}, "logit_bias must have keys in [0, 127], got 500."),
        ({"sampling_params": {"json_schema": "{}"}}, "json_schema: structured output is not available in this build: "
                                                     "it needs xgrammar (pip install ascend-rl[structured])"),
        ({"custom_logit_processor": "{\"callable\": \"x\"}"}, "custom_logit_processor: this server runs no custom"),
    ]:
        status, answer = post(server, {"input_ids": PROMPTS[0], **body})
        assert status == 400 and message in answer["error"]["message"]


def test_an_sglang_engine_gets_every_key_under_sglang_names(engine, tiny_model_dir, monkeypatch):
    """The in-process SGLangEngine hands SGLang the same sampling_params (tests/fake_sglang reads them back with
    our from_dict and generates natively, so the answers must equal the native engine's)."""
    import sys
    from pathlib import Path

    from ascend_rl.rollout.sglang.engine import SGLangEngine

    monkeypatch.syspath_prepend(str(Path(__file__).with_name("fake_sglang")))
    try:
        sglang_engine = SGLangEngine({"model_path": str(tiny_model_dir)})
        outs = sglang_engine.generate(PROMPTS, MIXED, return_logprob=True)
        sglang_engine.close()
    finally:  # later tests must not find the stand-in installed
        for name in [m for m in sys.modules if m == "sglang" or m.startswith("sglang.")]:
            del sys.modules[name]
    assert [o.output_ids for o in outs] == [o.output_ids for o in engine.generate(PROMPTS, MIXED)]
