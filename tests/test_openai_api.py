"""`ascend-rl serve`'s OpenAI API, driven by the real `openai` client: completions and chat completions, whole
and streamed, n, stop, logprobs, usage; each answer equals what the engine generates in process for the same
seed, decoded by the model's tokenizer. Bad bodies are 4xx in OpenAI's error shape, naming the field."""

import threading

import pytest
import requests
from openai import APIStatusError, AuthenticationError, BadRequestError, OpenAI

from ascend_rl.rollout.http_server import make_server
from ascend_rl.rollout.native import NativeEngine
from ascend_rl.rollout.protocol import SamplingParams
from ascend_rl.rollout.request_checks import Limits
from ascend_rl.rollout.server_info import ServedModel

PROMPT = [1, 21, 15, 22, 33, 2, 99, 1]
NAME = "tiny"  # --served-model-name
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"}]


def serve(engine, model):
    srv = make_server(engine, model, port=0, limits=Limits(max_body_bytes=1 << 16))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return NativeEngine.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def url(engine, tiny_model_dir):
    srv = serve(engine, ServedModel(str(tiny_model_dir), served_model_name=NAME))
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def client(url):
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def in_process(engine, tokenizer, prompt_ids, **sampling):
    """What the engine generates for these settings, each sample's text decoded as the server decodes it."""
    outs = engine.generate([prompt_ids], SamplingParams(**sampling), return_logprob=True)
    return outs, [tokenizer.decode(out.output_ids, skip_special_tokens=True) for out in outs]


def chat_ids(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


# --- completions ----------------------------------------------------------------------------------------

def test_completions_equal_the_engine_for_the_same_seed(client, engine, tokenizer):
    answer = client.completions.create(model=NAME, prompt="2+3=", max_tokens=6, n=2, seed=11, logprobs=0)
    outs, texts = in_process(engine, tokenizer, tokenizer("2+3=")["input_ids"], max_new_tokens=6, n=2,
                             sampling_seed=11)
    assert [c.text for c in answer.choices] == texts and [c.index for c in answer.choices] == [0, 1]
    for choice, out in zip(answer.choices, outs):
        assert choice.finish_reason == out.finish_reason
        assert choice.logprobs.token_logprobs == pytest.approx(out.output_logprobs)
        assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in out.output_ids]
    assert answer.object == "text_completion" and answer.model == NAME and answer.id.startswith("cmpl-")
    assert answer.usage.prompt_tokens == 4 and answer.usage.completion_tokens == sum(len(o.output_ids) for o in outs)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    # several prompts, as strings or token ids: choices in prompt order, n per prompt
    many = client.completions.create(model=NAME, prompt=[PROMPT, PROMPT[:4]], max_tokens=3, seed=5,
                                     extra_body={"ignore_eos": True})
    _, first = in_process(engine, tokenizer, PROMPT, max_new_tokens=3, sampling_seed=5, ignore_eos=True)
    assert len(many.choices) == 2 and many.choices[0].text == first[0]
    assert many.usage.prompt_tokens == len(PROMPT) + 4


def test_completion_top_logprobs_and_echo(client, engine, tokenizer):
    answer = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, seed=2, logprobs=3)
    out = engine.generate([PROMPT], SamplingParams(max_new_tokens=4, sampling_seed=2), return_logprob=True,
                          top_logprobs_num=3)[0]
    # OpenAI's shape: token text → log-prob (tokens of one text, here ids past the tokenizer's, share an entry)
    expected = [{tokenizer.decode([t]): lp for lp, t in row} for row in out.output_top_logprobs]
    assert answer.choices[0].logprobs.top_logprobs == [pytest.approx(row) for row in expected]
    echoed = client.completions.create(model=NAME, prompt="abc", max_tokens=2, seed=2, echo=True, logprobs=1)
    choice = echoed.choices[0]
    assert choice.text.startswith("abc") and choice.logprobs.tokens[:3] == ["a", "b", "c"]
    assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.token_logprobs) == 3 + 2


def test_a_stop_string_ends_the_text_before_it(client, engine, tokenizer):
    free = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[3:5]
    answer = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop],
                                       extra_body={"ignore_eos": True})
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and choice.text == free[:free.find(stop)]
    assert choice.model_extra["matched_stop"] == stop
    kept = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                     extra_body={"ignore_eos": True, "no_stop_trim": True}).choices[0].text
    assert kept.endswith(stop) and kept.startswith(choice.text)


def test_a_stop_token_ends_the_sample_and_is_left_out_of_its_text(client, engine, tokenizer):
    out = engine.generate([PROMPT], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))[0]
    token = out.output_ids[2]
    cut = out.output_ids.index(token)
    answer = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True, "stop_token_ids": [token]})
    choice = answer.choices[0]
    assert (choice.finish_reason, choice.model_extra["matched_stop"]) == ("stop", token)
    assert choice.text == tokenizer.decode(out.output_ids[:cut], skip_special_tokens=True)
    assert answer.usage.completion_tokens == cut + 1  # the stop token was generated


def test_streamed_completions_add_up_to_the_whole_answer(client):
    settings = dict(model=NAME, prompt=["12", "ab"], max_tokens=5, n=2, seed=3, logprobs=0)
    whole = client.completions.create(**settings)
    chunks = list(client.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
    usage = chunks.pop()
    assert usage.choices == [] and usage.usage == whole.usage
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [lp for c in mine for lp in c.logprobs.token_logprobs] == choice.logprobs.token_logprobs
        assert [c.finish_reason for c in mine][-1] == choice.finish_reason
        assert all(c.finish_reason is None for c in mine[:-1])


# --- chat --------------------------------------------------------------------------------------------------

def test_chat_applies_the_models_template_and_equals_the_engine(client, engine, tokenizer):
    answer = client.chat.completions.create(model=NAME, messages=CHAT, max_completion_tokens=6, n=2, seed=9,
                                            logprobs=True, top_logprobs=2)
    ids = chat_ids(tokenizer, CHAT)
    outs = engine.generate([ids], SamplingParams(max_new_tokens=6, n=2, sampling_seed=9), return_logprob=True,
                           top_logprobs_num=2)
    assert answer.object == "chat.completion" and answer.usage.prompt_tokens == len(ids)
    for choice, out in zip(answer.choices, outs):
        text = tokenizer.decode(out.output_ids if out.finish_reason != "stop" else out.output_ids[:-1],
                                skip_special_tokens=True)
        assert choice.message.role == "assistant" and choice.message.content == (text or None)
        assert choice.finish_reason == out.finish_reason
        content = choice.logprobs.content
        assert [c.logprob for c in content] == pytest.approx(out.output_logprobs)
        assert [[t.logprob for t in c.top_logprobs] for c in content] == \
            [pytest.approx([lp for lp, _ in row]) for row in out.output_top_logprobs]
        assert all(c.bytes == list(c.token.encode()) for c in content)
    # text parts are joined; max_tokens is the older name of the same limit
    parts = [{"role": "user", "content": [{"type": "text", "text": "1+"}, {"type": "text", "text": "1?"}]}]
    again = client.chat.completions.create(model=NAME, messages=[CHAT[0], *parts], max_tokens=6, seed=9)
    assert again.choices[0].message.content == answer.choices[0].message.content


def test_chat_without_a_limit_generates_to_the_end_of_the_context(client, tokenizer):
    answer = client.chat.completions.create(model=NAME, messages=CHAT, seed=1, extra_body={"ignore_eos": True})
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 512 - len(chat_ids(tokenizer, CHAT)) - 1  # SGLang's default


def test_streamed_chat_sends_the_role_then_the_text_then_the_finish(client):
    settings = dict(model=NAME, messages=CHAT, max_tokens=5, seed=4, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**settings, logprobs=True)
    chunks = list(client.chat.completions.create(**settings, logprobs=True, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant" and deltas[0].content == ""
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length" == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    streamed = [t.logprob for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed == [t.logprob for t in whole.choices[0].logprobs.content]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_models_lists_the_served_name(client, url):
    assert [m.id for m in client.models.list().data] == [NAME]
    card = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]
    assert card["max_model_len"] == 512 and card["object"] == "model"


# --- refusals ----------------------------------------------------------------------------------------------

C, CH = "/v1/completions", "/v1/chat/completions"
OK_C, OK_CH = {"model": NAME, "prompt": "hi", "max_tokens": 2}, {"model": NAME, "messages": CHAT, "max_tokens": 2}
BAD = [  # (path, body, status, param, a fragment of the message)
    (C, {"prompt": "hi"}, 400, "model", "model is required"),
    (C, {**OK_C, "model": "gpt-4"}, 404, "model", "The model 'gpt-4' does not exist; this server serves 'tiny'"),
    (C, {**OK_C, "max_tokens": 0}, 400, "max_tokens", "max_tokens must be an integer at least 1, got 0"),
    (C, {**OK_C, "max_tokens": "5"}, 400, "max_tokens", "max_tokens must be an integer at least 1, got '5'"),
    (C, {**OK_C, "temperature": -1}, 400, "temperature", "temperature must be a non-negative finite number"),
    (C, {**OK_C, "top_p": 0}, 400, "top_p", "top_p must be in (0, 1]"),
    (C, {**OK_C, "n": 0}, 400, "n", "n must be at least 1, got 0."),
    (C, {**OK_C, "stop": 5}, 400, "stop", "stop must be a string or a list of strings"),
    (C, {**OK_C, "seed": "x"}, 400, "seed", "seed must be an integer"),
    (C, {**OK_C, "logit_bias": {"500": 1}}, 400, "logit_bias", "logit_bias must have keys in [0, 127], got 500."),
    (C, {**OK_C, "logprobs": 21}, 400, "logprobs", "logprobs must be an integer in [0, 20], got 21"),
    (C, {**OK_C, "logprobs": True}, 400, "logprobs", "logprobs must be an integer in [0, 20], got True"),
    (C, {**OK_C, "echo": "yes"}, 400, "echo", "echo must be true or false"),
    (C, {**OK_C, "suffix": "x"}, 400, "suffix", "suffix: inserting text before a suffix is not available"),
    (C, {**OK_C, "best_of": 3}, 400, "best_of", "best_of must equal n here"),
    (C, {**OK_C, "stream_options": {"include_usage": True}}, 400, "stream_options", "needs stream: true"),
    (C, {**OK_C, "frobnicate": 1}, 400, "frobnicate", "unknown field 'frobnicate'"),
    (C, {**OK_C, "response_format": {"type": "xml"}}, 400, "response_format", "response_format.type must be one of"),
    (C, {**OK_C, "prompt": ""}, 400, "prompt", "Prompt cannot be empty"),
    (C, {**OK_C, "prompt": []}, 400, "prompt", "prompt must be a string, a list of strings, token ids"),
    (C, {**OK_C, "prompt": [1, 500]}, 400, "prompt", "Token id 500 is out of vocabulary"),
    (C, {**OK_C, "json_schema": "{"}, 400, None, "json_schema"),  # does not compile, or no xgrammar installed
    (C, {**OK_C, "max_tokens": 600}, 400, None, "Requested token count exceeds the model's maximum context length"),
    (C, {**OK_C, "rid": 5}, 400, "rid", "rid must be a string or a list of strings"),
    (CH, {"model": NAME}, 400, "messages", "messages is required"),
    (CH, {**OK_CH, "messages": []}, 400, "messages", "messages must be a non-empty list of messages"),
    (CH, {**OK_CH, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages", "messages[0].role must be"),
    (CH, {**OK_CH, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages", "this server reads text only, got 'image_url'"),
    (CH, {**OK_CH, "messages": [{"role": "user", "content": 5}]}, 400, "messages", "content must be a string"),
    (CH, {**OK_CH, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "calls no tools"),
    (CH, {**OK_CH, "tool_choice": "auto"}, 400, "tool_choice", "calls no tools"),
    (CH, {**OK_CH, "response_format": {"type": "json_schema"}}, 400, "response_format", "must be an object with a"),
    (CH, {**OK_CH, "top_logprobs": 2}, 400, "top_logprobs", "top_logprobs needs logprobs: true"),
    (CH, {**OK_CH, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "in [0, 20], got 21"),
    (CH, {**OK_CH, "max_completion_tokens": 3}, 400, "max_completion_tokens", "max_tokens and max_completion_tokens"),
    (CH, {**OK_CH, "store": True}, 400, "store", "this server stores no completions"),
    (CH, {**OK_CH, "audio": {"voice": "x"}}, 400, "audio", "this server answers text only"),
    (CH, {**OK_CH, "reasoning_effort": "low"}, 400, "reasoning_effort", "no reasoning-effort setting"),
    (CH, {**OK_CH, "prompt": "hi"}, 400, "prompt", "unknown field 'prompt'"),
]


@pytest.mark.parametrize("path,body,status,param,fragment", BAD, ids=[f"{i}{b[0]}" for i, b in enumerate(BAD)])
def test_a_bad_body_is_a_4xx_in_openais_shape_naming_the_field(url, path, body, status, param, fragment):
    answer = requests.post(f"{url}{path}", json=body, timeout=30)
    error = answer.json()["error"]
    assert answer.status_code == status and fragment in error["message"], error
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["code"] == ("model_not_found" if status == 404 else status)


def test_the_openai_client_reports_refusals_and_plumbing_errors(client, url):
    with pytest.raises(BadRequestError, match="tools: this server calls no tools"):
        client.chat.completions.create(model=NAME, messages=CHAT, tools=[{"type": "function",
                                                                          "function": {"name": "f"}}])
    with pytest.raises(APIStatusError) as err:
        client.chat.completions.create(model="other", messages=CHAT)
    assert err.value.status_code == 404
    not_json = requests.post(f"{url}{C}", data=b"{no", timeout=10)
    assert not_json.status_code == 400 and "request body is not JSON" in not_json.json()["error"]["message"]
    too_big = requests.post(f"{url}{C}", json={**OK_C, "prompt": "x" * 70_000}, timeout=10)
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "invalid_request_error"
    wrong_method = requests.get(f"{url}{C}", timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == 405


def test_the_api_key_guards_the_openai_api_and_token_only_mode_refuses_it(engine, tiny_model_dir):
    srv = make_server(engine, ServedModel(str(tiny_model_dir), skip_tokenizer_init=True), port=0, api_key="s3cret")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_port}"
    try:
        keyed = OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in keyed.models.list().data] == [str(tiny_model_dir)]  # no --served-model-name
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        with pytest.raises(BadRequestError, match="--skip-tokenizer-init: the OpenAI endpoints need"):
            keyed.completions.create(model="default", prompt="hi")
        token_only = requests.post(f"{base}/generate", json={"text": "hi"}, timeout=10,
                                   headers={"Authorization": "Bearer s3cret"})
        assert token_only.status_code == 400 and "send input_ids, not text" in token_only.json()["error"]["message"]
        assert requests.get(f"{base}/health_generate", timeout=30).status_code == 200  # probes hold no key
    finally:
        srv.shutdown()
        srv.server_close()


def test_near_valid_bodies_are_never_a_5xx(url):
    """Every field of both tables with values near and far from what it takes: a 200 or a 4xx, never a 5xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from ascend_rl.rollout.openai_checks import CHAT_FIELDS, COMPLETION_FIELDS

    scalar = st.none() | st.booleans() | st.integers(-3, 30) | st.floats(-1, 2) | st.text(max_size=4)
    near = scalar | st.lists(scalar, max_size=3) | st.dictionaries(st.sampled_from(["type", "text", "role", "7"]),
                                                                   scalar, max_size=2)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool", 5]),
                                     "content": st.text(max_size=4) | near})

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def fuzz(data):
        path, table, base = data.draw(st.sampled_from([(C, COMPLETION_FIELDS, {"prompt": "hi"}),
                                                       (CH, CHAT_FIELDS, {"messages": CHAT})]))
        body = {"model": NAME, "max_tokens": 2, **base,
                **data.draw(st.dictionaries(st.sampled_from(sorted(table)), near, max_size=3))}
        if path == CH and data.draw(st.booleans()):
            body["messages"] = data.draw(st.lists(message, max_size=2))
        if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
            body["max_tokens"] = min(body["max_tokens"], 3)  # keep it quick
        answer = requests.post(f"{url}{path}", json=body, timeout=60)
        assert answer.status_code == 200 or 400 <= answer.status_code < 500, (body, answer.text)

    fuzz()
