"""Structured output in the native engine (sampling_params json_schema, regex, ebnf, structural_tag; the OpenAI
response_format), with xgrammar over the tiny model's character tokenizer: outputs follow the constraint, greedy
and sampled; log-probs are under the masked distribution (SGLang's); unconstrained rows of the same batch come out
as they would alone; bad constraints are 400s naming the key."""

import json
import re
import sys
import threading

import pytest
import torch

pytest.importorskip("xgrammar")

import requests  # noqa: E402

from ascend_rl.rollout.grammar import Grammars, apply_bitmask_torch  # noqa: E402
from ascend_rl.rollout.http_server import make_server  # noqa: E402
from ascend_rl.rollout.native import NativeEngine  # noqa: E402
from ascend_rl.rollout.protocol import SamplingParams  # noqa: E402
from ascend_rl.rollout.server_info import ServedModel  # noqa: E402

PROMPTS = [[1, 21, 15, 22, 33, 2, 99, 1], [1, 25, 26, 15, 27, 33, 2, 99, 1, 69], [5, 6, 7], [1, 30, 31, 32]]
DIGITS = "[0-9]{3}"
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                          "ok": {"type": "boolean"}}, "required": ["n", "ok"]}
# The random tiny model loves whitespace, which JSON allows anywhere (SGLang's any_whitespace): bias it away so
# that a greedy object closes within a few tokens. " " is id 4, "\n" id 99 in the character tokenizer.
NO_WHITESPACE = {"4": -100.0, "99": -100.0}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return NativeEngine.from_pretrained(str(tiny_model_dir))


def text(tokenizer, out) -> str:
    return tokenizer.decode(out.output_ids, skip_special_tokens=True)


def ends_on_a_stop_token(engine, out) -> bool:
    """SGLang's finish when the grammar terminates: stop, matched = the stop token it accepted (the last id)."""
    return (out.finish_reason == "stop" and out.output_ids[-1] in engine.scheduler.eos_ids
            and out.matched == out.output_ids[-1])


# --- what comes out ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_regex_yields_exactly_what_it_matches(engine, tokenizer, temperature):
    outs = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=temperature, n=4,
                                                        sampling_seed=7, regex=DIGITS))
    for out in outs:
        assert re.fullmatch(DIGITS, text(tokenizer, out)) and len(out.output_ids) == 4
        assert ends_on_a_stop_token(engine, out)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_json_schema_yields_json_that_matches_it(engine, tokenizer, temperature):
    outs = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=40, temperature=temperature, n=3,
                                                        sampling_seed=1, json_schema=json.dumps(SCHEMA),
                                                        logit_bias=NO_WHITESPACE))
    for out in outs:
        value = json.loads(text(tokenizer, out))
        assert set(value) == {"n", "ok"} and type(value["n"]) is int and type(value["ok"]) is bool
        assert 0 <= value["n"] <= 999 and ends_on_a_stop_token(engine, out)


def test_ebnf_and_structural_tag(engine, tokenizer):
    grammar = 'root ::= answer "=" digit digit?\nanswer ::= "yes" | "no"\ndigit ::= [0-9]'
    for temperature in (0.0, 1.0):
        out = engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=12, temperature=temperature,
                                                           sampling_seed=3, ebnf=grammar))[0]
        assert re.fullmatch(r"(yes|no)=[0-9][0-9]?", text(tokenizer, out)) and ends_on_a_stop_token(engine, out)
    tag = {"type": "structural_tag", "format": {"type": "const_string", "value": "hi!"}}
    out = engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=12, structural_tag=json.dumps(tag)))[0]
    assert text(tokenizer, out) == "hi!" and ends_on_a_stop_token(engine, out)


def test_log_probs_are_those_of_the_masked_distribution(engine):
    """SGLang's sampler takes log-probs after apply_logits_bias, which applies the grammar's vocab mask: the
    allowed tokens renormalized, the others -inf. The top-N come from the same distribution."""
    temperature = 0.7
    out = engine.generate([PROMPTS[3]], SamplingParams(max_new_tokens=8, temperature=temperature, sampling_seed=5,
                                                       regex=DIGITS), return_logprob=True, top_logprobs_num=12)[0]
    digits = [engine.scheduler.grammars.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    for step, token in enumerate(out.output_ids):
        allowed = digits if step < 3 else sorted(engine.scheduler.eos_ids)
        with torch.no_grad():
            raw = engine.model(torch.tensor([PROMPTS[3] + out.output_ids[:step]])).logits[0, -1].float()
        masked = torch.full_like(raw, float("-inf"))
        masked[allowed] = raw[allowed]
        expected = torch.log_softmax(masked / temperature, dim=-1)
        assert token in allowed and out.output_logprobs[step] == pytest.approx(float(expected[token]), abs=1e-4)
        top = out.output_top_logprobs[step]
        assert {t for lp, t in top if lp > float("-inf")} == set(allowed)
        assert sum(torch.tensor([lp for lp, _ in top]).exp()) == pytest.approx(1.0, abs=1e-4)


def test_nothing_left_to_sample_aborts_the_row(engine):
    """min_new_tokens holds off EOS, which is all a complete grammar allows: SGLang aborts such a request."""
    out = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, temperature=0, regex=DIGITS,
                                                       min_new_tokens=5))[0]
    assert out.finish_reason == "abort" and len(out.output_ids) == 4


# --- in a batch ---------------------------------------------------------------------------------------------

MIXED = [SamplingParams(max_new_tokens=9, sampling_seed=11),
         SamplingParams(max_new_tokens=9, sampling_seed=12, regex=DIGITS),
         SamplingParams(max_new_tokens=7, sampling_seed=13, frequency_penalty=1.0),
         SamplingParams(max_new_tokens=30, sampling_seed=14, json_schema=json.dumps(SCHEMA),
                        logit_bias=NO_WHITESPACE)]


def spy_on_joins(engine, monkeypatch) -> list[tuple[int, int]]:
    joins, admit = [], engine.stepper.admit
    monkeypatch.setattr(engine.stepper, "admit",
                        lambda keep, prompts, room: joins.append((len(keep), len(prompts))) or admit(keep, prompts, room))
    return joins


def test_constrained_and_free_rows_in_one_batch_match_each_alone(engine, monkeypatch):
    for temperature in (0.0, 1.0):
        params = [SamplingParams(**{**p.to_dict(), "temperature": temperature}) for p in MIXED]
        alone = [engine.generate([prompt], p, return_logprob=True)[0] for prompt, p in zip(PROMPTS, params)]
        joins = spy_on_joins(engine, monkeypatch)
        together = engine.generate(PROMPTS, params, return_logprob=True)
        assert joins == [(0, 4)]  # one batch
        monkeypatch.undo()
        for one, many in zip(alone, together):
            assert many.output_ids == one.output_ids and many.finish_reason == one.finish_reason
            assert many.output_logprobs == pytest.approx(one.output_logprobs, abs=1e-5)
        # the free rows are what they are without any constrained row beside them
        free = engine.generate([PROMPTS[0], PROMPTS[2]], [params[0], params[2]], return_logprob=True)
        assert [o.output_ids for o in free] == [together[0].output_ids, together[2].output_ids]


def test_matchers_follow_rows_that_leave_and_join(tiny_model_dir, engine, monkeypatch):
    """Two rows at a time: finished rows leave and waiting constrained ones join running rows."""
    small = NativeEngine.from_pretrained(str(tiny_model_dir), max_num_seqs=2)
    joins = spy_on_joins(small, monkeypatch)
    outs = small.generate(PROMPTS * 2, MIXED * 2)
    assert len(joins) >= 3 and any(kept for kept, _ in joins[1:])
    assert [o.output_ids for o in outs] == [o.output_ids for o in engine.generate(PROMPTS * 2, MIXED * 2)]


# --- refusals -----------------------------------------------------------------------------------------------

BAD = [("json_schema", "{"), ("json_schema", json.dumps({"type": "nonsense"})), ("regex", "[0-9"),
       ("ebnf", "root ::= undefined_rule"), ("structural_tag", "not json"),
       ("structural_tag", json.dumps({"type": "structural_tag", "format": {"type": "bogus"}})),
       ("structural_tag", json.dumps({"structures": [{"begin": "<a>", "end": "</a>"}]}))]


@pytest.mark.parametrize("key,value", BAD)
def test_a_constraint_that_does_not_compile_is_a_value_error_naming_the_key(engine, key, value):
    with pytest.raises(ValueError, match=f"^{key}"):
        engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4, **{key: value}))
    assert not engine.scheduler.busy  # refused before anything was queued


def test_without_xgrammar_or_a_tokenizer_structured_output_is_refused(engine, tiny_model_dir, monkeypatch):
    bare = NativeEngine(engine.model, eos_token_ids=[2], pad_token_id=0)  # no tokenizer
    with pytest.raises(ValueError, match="regex: structured output needs the model's tokenizer"):
        bare.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4, regex=DIGITS))
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # as if not installed
    for key in ("json_schema", "regex", "ebnf", "structural_tag"):
        with pytest.raises(ValueError, match=rf"{key}: .*pip install ascend-rl\[structured\]"):
            engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4, **{key: "{}"}))


def test_the_accelerator_mask_equals_xgrammars_kernel(tokenizer):
    """`constrain` masks logits on an accelerator with plain tensor ops; on the CPU they equal xgrammar's kernel."""
    import xgrammar

    grammars = Grammars(tokenizer, 128, [0, 2])
    matchers = [grammars.matcher(SamplingParams(**kw)) for kw in ({"regex": DIGITS}, {"ebnf": 'root ::= "a" [b-z]'},
                                                                  {"json_schema": json.dumps(SCHEMA)})]
    assert matchers[1].accept_token(tokenizer.convert_tokens_to_ids("a"))
    bitmask = xgrammar.allocate_token_bitmask(5, 128)
    for row, matcher in zip((0, 2, 3), matchers):
        matcher.fill_next_token_bitmask(bitmask, row)
    logits = torch.randn(5, 128)
    expected, ours = logits.clone(), logits.clone()
    xgrammar.apply_token_bitmask_inplace(expected, bitmask, indices=[0, 2, 3])
    apply_bitmask_torch(ours, bitmask, [0, 2, 3])
    assert torch.equal(ours, expected) and torch.equal(ours[[1, 4]], logits[[1, 4]])
    assert torch.isinf(ours[2]).sum() == 128 - 25  # only b … z


def test_compiled_grammars_are_kept_in_a_bounded_lru(tokenizer):
    grammars = Grammars(tokenizer, 128, [0, 2], cache_size=2)
    first = grammars.compiled("regex", "a")
    assert grammars.compiled("regex", "a") is first
    grammars.compiled("regex", "b")
    grammars.compiled("regex", "a")  # a is now the most recent: b goes next
    grammars.compiled("ebnf", 'root ::= "c"')
    assert list(grammars._cache) == [("regex", "a"), ("ebnf", 'root ::= "c"')]


# --- over HTTP ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def url(engine, tiny_model_dir):
    srv = make_server(engine, ServedModel(str(tiny_model_dir), served_model_name="tiny"), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


def test_generate_over_http(url, engine):
    answer = requests.post(f"{url}/generate", json={"input_ids": PROMPTS[0], "sampling_params": {
        "max_new_tokens": 10, "temperature": 0, "regex": DIGITS}}, timeout=30)
    direct = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=10, temperature=0, regex=DIGITS))[0]
    body = answer.json()
    assert answer.status_code == 200 and body["output_ids"] == direct.output_ids and re.fullmatch(DIGITS, body["text"])
    assert body["meta_info"]["finish_reason"] == {"type": "stop", "matched": direct.output_ids[-1]}
    bad = requests.post(f"{url}/generate", json={"input_ids": PROMPTS[0], "sampling_params": {"json_schema": "{"}},
                        timeout=30)
    assert bad.status_code == 400 and "json_schema does not compile" in bad.json()["error"]["message"]


@pytest.mark.parametrize("response_format,sampling", [
    ({"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}, {"temperature": 0}),
    ({"type": "json_object"}, {"temperature": 1.0, "seed": 1}),  # greedy, any object's keys run on here
])
def test_response_format_over_the_openai_api(url, response_format, sampling):
    common = {"model": "tiny", "max_tokens": 40, "logit_bias": NO_WHITESPACE, "response_format": response_format,
              **sampling}
    chat = requests.post(f"{url}/v1/chat/completions", json={
        **common, "messages": [{"role": "user", "content": "1+1?"}]}, timeout=30)
    assert chat.status_code == 200, chat.text
    choice = chat.json()["choices"][0]
    value = json.loads(choice["message"]["content"])
    assert isinstance(value, dict) and choice["finish_reason"] == "stop"
    if response_format["type"] == "json_schema":
        assert set(value) == {"n", "ok"} and type(value["n"]) is int
    completion = requests.post(f"{url}/v1/completions", json={**common, "prompt": "2+3="}, timeout=30)
    assert completion.status_code == 200 and isinstance(json.loads(completion.json()["choices"][0]["text"]), dict)


@pytest.mark.parametrize("response_format,fragment", [
    ({"type": "xml"}, "response_format.type must be one of text, json_object, json_schema, structural_tag"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema is required"),
    ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "must be an object with a name and a schema"),
])
def test_a_bad_response_format_is_a_400_naming_it(url, response_format, fragment):
    answer = requests.post(f"{url}/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "response_format": response_format},
        timeout=30)
    error = answer.json()["error"]
    assert answer.status_code == 400 and fragment in error["message"] and error["param"] == "response_format"
    both = requests.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "regex": "a",
                                                        "response_format": {"type": "json_object"}}, timeout=30)
    assert both.status_code == 400 and "response_format and regex both constrain" in both.json()["error"]["message"]
