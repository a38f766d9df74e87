"""The SGLang-compatible HTTP server and client, over real HTTP on localhost."""

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch

from ascend_rl.rollout.http_client import HttpEngine, HttpEngineError
from ascend_rl.rollout.http_server import make_server
from ascend_rl.rollout.native import NativeEngine
from ascend_rl.rollout.protocol import SamplingParams

PROMPT = [1, 21, 15, 22, 33, 2, 99, 1]


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    """The tiny model with a context long enough for generations that outlast a test's pauses."""
    from ascend_rl.data.tiny_model import TinyModelSpec, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("long") / "model", TinyModelSpec(max_position_embeddings=32768))


@pytest.fixture(scope="module")
def server(long_model_dir, tmp_path_factory):
    engine = NativeEngine.from_pretrained(str(long_model_dir))
    # weights may come from any of the tests' temporary directories
    srv = make_server(engine, str(long_model_dir), port=0, weights_roots=[str(tmp_path_factory.getbasetemp())])
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, engine
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def client(server):
    return HttpEngine(f"http://127.0.0.1:{server[0].server_port}", timeout_s=30, max_attempts=1)


def raw_post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        return json.loads(resp.read())


def test_generate_matches_the_engine_and_sglang_shapes(server, client, tokenizer):
    srv, engine = server
    params = SamplingParams(max_new_tokens=5, sampling_seed=4, ignore_eos=True)
    direct = engine.generate([PROMPT], params, return_logprob=True)[0]
    over_http = client.generate([PROMPT], params, return_logprob=True)[0]
    assert over_http.output_ids == direct.output_ids
    assert over_http.output_logprobs == pytest.approx(direct.output_logprobs)
    assert over_http.finish_reason == "length" and over_http.prompt_tokens == len(PROMPT)
    # a single prompt (not a list of prompts) gets a single dict back, as in SGLang
    answer = raw_post(srv.server_port, "/generate", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 3,
                      "temperature": 0, "ignore_eos": True}, "return_logprob": True})
    assert list(answer) == ["text", "output_ids", "meta_info"]  # SGLang's, with its tokenizer
    assert answer["text"] == tokenizer.decode(answer["output_ids"], skip_special_tokens=True)
    meta = answer["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 3}
    assert meta["completion_tokens"] == 3 and meta["prompt_tokens"] == len(PROMPT)
    assert [entry[1] for entry in meta["output_token_logprobs"]] == answer["output_ids"]


def test_n_samples_per_prompt(client):
    outs = client.generate([PROMPT, PROMPT[:5]], SamplingParams(max_new_tokens=4, n=3, sampling_seed=0, ignore_eos=True))
    assert len(outs) == 6 and outs[3].prompt_tokens == 5


def test_error_answers_are_4xx_with_a_message(server, client):
    with pytest.raises(HttpEngineError, match=r"400 unknown sampling_params \['max_tokens'\]") as err:
        client.request("POST", "/generate", {"input_ids": [PROMPT], "sampling_params": {"max_tokens": 3}})
    assert err.value.status == 400
    with pytest.raises(HttpEngineError, match="400 text must be a string or a non-empty list of strings, got 5"):
        client.request("POST", "/generate", {"text": 5})
    with pytest.raises(HttpEngineError, match="400 send text or input_ids, not both"):
        client.request("POST", "/generate", {"text": "hi", "input_ids": PROMPT})
    with pytest.raises(HttpEngineError, match="404 no endpoint GET /nope"):
        client.request("GET", "/nope")
    with pytest.raises(HttpEngineError, match="403 model_path '/nowhere' is outside this server's weights roots"):
        client.update_weights_from_disk("/nowhere")
    with pytest.raises(HttpEngineError, match="400 Requested token count exceeds the model's maximum context length"):
        client.generate([PROMPT], SamplingParams(max_new_tokens=40_000))
    with pytest.raises(HttpEngineError, match="400 Requested token count exceeds"):  # before any chunk
        client.request("POST", "/generate", {"input_ids": PROMPT, "stream": True,
                                             "sampling_params": {"max_new_tokens": 40_000}})
    port = server[0].server_port
    malformed = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(malformed)
    assert bad.value.code == 400 and "request body is not JSON" in json.loads(bad.value.read())["error"]["message"]
    assert client.generate([PROMPT], SamplingParams(max_new_tokens=2))[0].prompt_tokens == len(PROMPT)  # still serving


def test_api_key_guards_every_endpoint_but_health(long_model_dir):
    engine = NativeEngine.from_pretrained(str(long_model_dir))
    srv = make_server(engine, str(long_model_dir), port=0, api_key="s3cret")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{srv.server_port}"
    try:
        HttpEngine(url).wait_until_healthy(timeout_s=10)  # health needs no key, as in SGLang
        for key in (None, "wrong"):
            with pytest.raises(HttpEngineError, match="401"):
                HttpEngine(url, max_attempts=1, api_key=key).model_info()
        out = HttpEngine(url, api_key="s3cret").generate([PROMPT], SamplingParams(max_new_tokens=2, ignore_eos=True))
        assert len(out[0].output_ids) == 2
    finally:
        srv.shutdown()
        srv.server_close()


def test_concurrent_requests_share_one_running_batch(server, client):
    """A short request sent while a long one decodes comes back first, with the tokens it gets alone."""
    import time

    port = server[0].server_port
    short = SamplingParams(max_new_tokens=4, sampling_seed=3, ignore_eos=True)
    alone = client.generate([PROMPT[:4]], short)[0]
    thread, result = _generate_in_background(port, {**LONG, "sampling_params": {"max_new_tokens": 3000,
                                                                                 "ignore_eos": True}, "rid": "long-3"})
    while not server[1].scheduler.busy:
        time.sleep(0.005)
    joined = client.generate([PROMPT[:4]], short)[0]
    assert thread.is_alive() and joined.output_ids == alone.output_ids
    client.abort_request("long-3")
    thread.join(30)
    assert result["meta_info"]["finish_reason"]["type"] == "abort"


def test_sleep_wake_cycle_and_weight_push_from_disk(server, client, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    srv, engine = server
    greedy = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    before = client.generate([PROMPT], greedy)[0].output_ids
    client.release_memory_occupation(["kv_cache", "weights"])
    with pytest.raises(HttpEngineError, match="503 engine memory released"):
        client.generate([PROMPT], greedy)
    client.resume_memory_occupation(["weights"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.save_pretrained(tmp_path / "changed")
    client.update_weights_from_disk(str(tmp_path / "changed"), weight_version="v2")
    client.resume_memory_occupation(["kv_cache"])
    client.flush_cache()
    assert client.model_info()["weight_version"] == "v2"
    changed = client.generate([PROMPT], greedy)[0].output_ids
    client.update_weights_from_disk(str(tiny_model_dir))
    assert client.generate([PROMPT], greedy)[0].output_ids == before
    assert changed != before


def test_connection_errors_are_retried_then_reported():
    client = HttpEngine("http://127.0.0.1:9", timeout_s=1, max_attempts=3, retry_delay_s=0.01)
    with pytest.raises(HttpEngineError, match="no answer after 3 attempt"):
        client.model_info()


def test_4xx_is_not_retried(server, monkeypatch):
    calls = []
    original = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: calls.append(1) or original(*a, **k))
    client = HttpEngine(f"http://127.0.0.1:{server[0].server_port}", max_attempts=3, retry_delay_s=5)
    with pytest.raises(HttpEngineError):
        client.request("GET", "/nope")
    assert len(calls) == 1


def test_health_wait(server):
    HttpEngine(f"http://127.0.0.1:{server[0].server_port}").wait_until_healthy(timeout_s=5)
    with pytest.raises(HttpEngineError, match="not healthy after"):
        HttpEngine("http://127.0.0.1:9").wait_until_healthy(timeout_s=0.5, poll_s=0.1)


def test_serve_command(tiny_model_dir):
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ascend_rl", "serve", "--model-path", str(tiny_model_dir),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = HttpEngine(f"http://127.0.0.1:{port}")
        client.wait_until_healthy(timeout_s=120, poll_s=0.2)
        out = client.generate([PROMPT], SamplingParams(max_new_tokens=2, ignore_eos=True, sampling_seed=1))
        assert len(out[0].output_ids) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "ascend_rl", "serve", "--model-path", "/nowhere"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--model-path=/nowhere: no such directory" in bad.stderr


def _generate_in_background(port, body):
    result = {}
    thread = threading.Thread(target=lambda: result.update(raw_post(port, "/generate", body)), daemon=True)
    thread.start()
    return thread, result


LONG = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 20_000, "ignore_eos": True}, "rid": "long-1"}


def test_abort_request_ends_a_running_generation_with_its_tokens(server, client):
    import time

    port = server[0].server_port
    thread, result = _generate_in_background(port, LONG)
    time.sleep(1.0)
    assert thread.is_alive()  # still decoding: control calls do not wait for it
    client.abort_request("other")
    time.sleep(0.3)
    assert thread.is_alive()  # another rid: untouched
    client.abort_request("long-1")
    thread.join(30)
    meta = result["meta_info"]
    assert meta["id"] == "long-1" and meta["finish_reason"]["type"] == "abort"
    assert 0 < meta["completion_tokens"] < 20_000 and len(result["output_ids"]) == meta["completion_tokens"]


def test_pause_in_place_holds_requests_until_continue(server, client):
    import time

    port = server[0].server_port
    assert raw_post(port, "/pause_generation", {"mode": "in_place"})["status"] == "ok"
    try:
        short = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}
        thread, result = _generate_in_background(port, short)
        time.sleep(1.0)
        assert thread.is_alive() and not result  # waiting, not failed
    finally:
        raw_post(port, "/continue_generation", {})
    thread.join(30)
    assert result["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
    with pytest.raises(HttpEngineError, match="400.*pause mode 'sideways'"):
        client.pause_generation("sideways")


def test_pause_abort_ends_running_requests(server, client):
    import time

    port = server[0].server_port
    thread, result = _generate_in_background(port, {**LONG, "rid": "long-2"})
    time.sleep(1.0)
    client.pause_generation("abort")
    thread.join(30)
    client.continue_generation()
    assert result["meta_info"]["finish_reason"]["type"] == "abort"
    after = client.generate([PROMPT], SamplingParams(max_new_tokens=2, ignore_eos=True))[0]
    assert after.finish_reason == "length"  # a request sent after the abort is not aborted


def test_stop_string_over_http_reports_what_matched(server, tokenizer):
    port = server[0].server_port
    free = raw_post(port, "/generate", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 12,
                                                                                  "temperature": 0, "ignore_eos": True}})
    stop = tokenizer.decode(free["output_ids"])[3:5]
    answer = raw_post(port, "/generate", {"input_ids": PROMPT, "sampling_params": {
        "max_new_tokens": 12, "temperature": 0, "ignore_eos": True, "stop": [stop]}})
    assert answer["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


def read_stream(port, body) -> list:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        lines = [line.decode().strip() for line in resp if line.strip()]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_streaming_sends_each_token_as_it_comes_then_done(server, client):
    port = server[0].server_port
    params = {"max_new_tokens": 6, "sampling_seed": 5, "ignore_eos": True}
    whole = client.generate([PROMPT], SamplingParams.from_dict(params), return_logprob=True)[0]
    chunks = read_stream(port, {"input_ids": PROMPT, "sampling_params": params, "stream": True,
                                "return_logprob": True})
    assert [len(c["output_ids"]) for c in chunks] == [1, 2, 3, 4, 5, 6]  # each the output so far
    assert [c["meta_info"]["finish_reason"] for c in chunks[:-1]] == [None] * 5
    last = chunks[-1]
    assert last["output_ids"] == whole.output_ids and last["meta_info"]["finish_reason"] == {"type": "length",
                                                                                            "length": 6}
    assert [e[0] for e in last["meta_info"]["output_token_logprobs"]] == pytest.approx(whole.output_logprobs)
    # several samples: chunks carry the sample's index
    many = read_stream(port, {"input_ids": [PROMPT, PROMPT[:4]], "stream": True,
                              "sampling_params": {"max_new_tokens": 2, "n": 2, "ignore_eos": True}})
    finals = {c["index"]: c for c in many if c["meta_info"]["finish_reason"]}
    assert sorted(finals) == [0, 1, 2, 3] and all(len(c["output_ids"]) == 2 for c in finals.values())
    assert not server[1].scheduler.busy


def test_a_reader_that_leaves_a_stream_ends_its_request(server):
    import http.client
    import time

    port = server[0].server_port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/generate", json.dumps({"input_ids": PROMPT, "stream": True, "sampling_params": {
        "max_new_tokens": 20_000, "ignore_eos": True}}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.readline().startswith(b"data: ")  # it is decoding ...
    conn.close()  # ... and the reader goes away
    deadline = time.monotonic() + 20
    while server[1].scheduler.busy and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not server[1].scheduler.busy  # aborted, not decoding 20,000 tokens for nobody


# --- SGLang's own clients and verl's adapter, call for call -------------------------------------------------

SGLANG_HEADERS = {"Content-Type": "application/json; charset=utf-8"}  # sglang.utils.http_request's


def sglang_request(url, json_body=None, method=None, stream=False):
    """sglang.utils.http_request: urllib for a plain call (POST when there is a body), requests for a stream."""
    import requests

    if stream:
        return requests.post(url, json=json_body, stream=True, headers=SGLANG_HEADERS, timeout=60)
    return requests.request(method or ("POST" if json_body is not None else "GET"), url, headers=SGLANG_HEADERS,
                            data=None if json_body is None else json.dumps(json_body).encode(), timeout=60)


def test_sglang_runtime_endpoint_and_wait_for_server_calls(server, tokenizer):
    """sglang/lang/backend/runtime_endpoint.py's RuntimeEndpoint and sglang.utils.wait_for_server, replayed with
    their paths, headers and bodies."""
    import requests

    base = f"http://127.0.0.1:{server[0].server_port}"
    # wait_for_server: polls /v1/models with this header
    assert requests.get(f"{base}/v1/models", headers={"Authorization": "Bearer None"}, timeout=10).status_code == 200
    # __init__: the model info (its model_path picks the chat template)
    info = sglang_request(f"{base}/get_model_info").json()
    assert info["model_path"] == info["tokenizer_path"] and info["is_generation"] is True
    assert info["model_type"] == "qwen3" and info["architectures"] == ["Qwen3ForCausalLM"]
    server_info = sglang_request(f"{base}/get_server_info").json()
    assert server_info["version"] == "0.5.8" and server_info["skip_tokenizer_init"] is False
    assert server_info["model_path"] == info["model_path"] and server_info["context_length"] == 32768
    assert server_info["max_running_requests"] == 256 and "max_total_num_tokens" in server_info
    assert sglang_request(f"{base}/server_info").json().keys() == server_info.keys()
    assert sglang_request(f"{base}/flush_cache", method="POST").status_code == 200
    # cache_prefix / commit_lazy_operations: text, nothing to generate
    prefix = sglang_request(f"{base}/generate", {"text": "Q: 1+1\nA:", "sampling_params": {"max_new_tokens": 0}})
    assert prefix.json()["meta_info"]["prompt_tokens"] == len("Q: 1+1\nA:") and prefix.json()["text"] == ""
    # generate: text in, text and meta_info out
    body = {"text": "Q: 1+1\nA:", "sampling_params": {"skip_special_tokens": True,
                                                     "spaces_between_special_tokens": True, "max_new_tokens": 8,
                                                     "temperature": 0.7, "sampling_seed": 3, "ignore_eos": True}}
    obj = sglang_request(f"{base}/generate", body).json()
    assert obj["text"] == tokenizer.decode(obj["output_ids"], skip_special_tokens=True)
    assert obj["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    # generate_stream: each chunk's text is the text so far; the client keeps the part after `pos`
    pieces, pos = [], 0
    with sglang_request(f"{base}/generate", {**body, "stream": True}, stream=True) as res:
        for chunk in res.iter_lines(decode_unicode=False):
            chunk = chunk.decode("utf-8")
            if chunk and chunk.startswith("data:"):
                if chunk == "data: [DONE]":
                    break
                data = json.loads(chunk[5:].strip("\n"))
                pieces.append(data["text"][pos:])
                pos += len(pieces[-1])
    assert "".join(pieces) == obj["text"] and data["output_ids"] == obj["output_ids"]
    # select: each choice's prompt log-probs, with the tokens' text
    choices, prompt_len = ["2", "11"], prefix.json()["meta_info"]["prompt_tokens"]
    scored = sglang_request(f"{base}/generate", {
        "text": [body["text"] + c for c in choices], "sampling_params": {"max_new_tokens": 0, "temperature": 0},
        "return_logprob": True, "return_text_in_logprobs": True, "logprob_start_len": max(prompt_len - 2, 0)}).json()
    for item, choice in zip(scored, choices):
        entries = item["meta_info"]["input_token_logprobs"]
        assert entries[0][0] is None and all(e[0] < 0 for e in entries[1:])  # from the last 2 prompt tokens
        assert "".join(e[2] for e in entries) == "A:" + choice
        assert item["meta_info"]["output_token_logprobs"] == []


def test_verls_http_adapter_sequence(server, long_model_dir):
    """verl 0.9.1's HttpServerAdapter (http_server_engine.py): requests.post(url, json=payload or {}) with None
    values dropped; its flush_cache is a GET. Weights come back by disk here (the tensor update is SGLang's)."""
    import requests

    base = f"http://127.0.0.1:{server[0].server_port}"

    def call(endpoint, payload=None, method="POST"):
        url = f"{base}/{endpoint}"
        response = requests.get(url, timeout=60) if method == "GET" else requests.post(url, json=payload or {},
                                                                                      timeout=60)
        response.raise_for_status()
        if response.status_code == 204 or not response.content:  # verl's _read_response
            return {}
        try:
            return response.json()
        except ValueError:
            return {"content_type": response.headers.get("Content-Type", ""), "text": response.text}

    def generate(sampling_params, input_ids, return_logprob=False):
        payload = {"text": None, "sampling_params": sampling_params, "input_ids": input_ids, "image_data": None,
                   "return_logprob": return_logprob, "logprob_start_len": None, "top_logprobs_num": None,
                   "token_ids_logprob": None, "lora_path": None, "custom_logit_processor": None}
        return call("generate", {k: v for k, v in payload.items() if v is not None})

    sampling = {"temperature": 0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "max_new_tokens": 6}
    before = generate(sampling, PROMPT, return_logprob=True)
    assert len(before["meta_info"]["output_token_logprobs"]) == len(before["output_ids"]) == 6
    assert call("release_memory_occupation", {"tags": ["kv_cache", "weights"]}) is None  # SGLang answers null
    with pytest.raises(requests.HTTPError, match="503"):
        generate(sampling, PROMPT)
    assert call("resume_memory_occupation", {"tags": ["weights"]}) is None
    call("update_weights_from_disk", {"model_path": str(long_model_dir)})
    assert call("resume_memory_occupation", {"tags": ["kv_cache"]}) is None
    # a text answer, which verl's _read_response keeps as this dict (it checks the status only)
    assert call("flush_cache", method="GET") == {"content_type": "text/plain; charset=utf-8", "text": "Cache flushed."}
    assert generate(sampling, PROMPT)["output_ids"] == before["output_ids"]
    assert call("abort_request", {"rid": "", "abort_all": False}) == {}
    assert call("abort_request", {"rid": "nobody", "abort_all": True}) == {}
    assert call("v1/models", method="GET")["data"][0]["id"] == str(long_model_dir)  # AsyncHttpServerAdapter's


def test_health_generate_runs_a_token_unless_the_engine_cannot(server, client):
    port = server[0].server_port

    def probe() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health_generate", timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code

    assert probe() == 200
    client.pause_generation("in_place")
    try:
        assert probe() == 503
    finally:
        client.continue_generation()
    client.release_memory_occupation(["kv_cache"])
    try:
        assert probe() == 503
    finally:
        client.resume_memory_occupation(["kv_cache"])
    assert probe() == 200


def test_text_is_detokenized_as_sglangs_detokenizer_does():
    """Byte-level tokens (a character split over two), a stop string, a stop token: the text SGLang shows."""
    from ascend_rl.rollout.protocol import GenerateOutput
    from ascend_rl.rollout.text_codec import SampleText, TextCodec

    pieces = {1: b"a", 2: b" ", 3: b"\xc3", 4: b"\xa9", 5: b"b", 6: b"!", 9: b"<eos>"}

    class ByteTokenizer:
        def decode(self, ids, skip_special_tokens=True, spaces_between_special_tokens=True):
            kept = [i for i in ids if not (skip_special_tokens and i == 9)]
            return b"".join(pieces[i] for i in kept).decode(errors="replace")

    codec, params = TextCodec(ByteTokenizer()), SamplingParams()
    stream, seen = SampleText(codec, [1, 2], params), []
    for n in range(1, 6):
        seen.append(stream.update(GenerateOutput([2, 3, 4, 5, 6][:n], None, 2)))
    assert seen == [" ", " ", " é", " éb", " éb!"]  # half a character waits for its other half
    done = GenerateOutput([2, 3, 4, 5, 6, 9], "stop", 2, matched=9)
    assert stream.update(done) == " éb!"
    kept = SamplingParams(no_stop_trim=True, skip_special_tokens=False)
    assert SampleText(codec, [1], kept).update(done) == " éb!<eos>"
    by_string = GenerateOutput([2, 3, 4, 5, 6], "stop", 2, matched="b!")
    assert SampleText(codec, [1], params).update(by_string) == " é"
    streamed = SampleText(codec, [1], params)
    streamed.update(GenerateOutput([2, 3, 4, 5], None, 2))
    assert streamed.update(by_string) == " éb"  # a stream never takes back what it sent (SGLang's)


def _served(engine, model_dir):
    srv = make_server(engine, str(model_dir), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _generate_ids(port) -> list[int]:
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}}
    return raw_post(port, "/generate", body)["output_ids"]


def test_verls_release_resume_update_weights_from_tensor_sequence(long_model_dir):
    """verl's adapter after a training step: release → resume weights → update_weights_from_tensor (named tensors
    in SGLang's body) → resume kv_cache → generate: the output is the pushed weights'."""
    from ascend_rl.rollout.tensor_transfer import encode_named_tensors

    engine = NativeEngine.from_pretrained(str(long_model_dir))
    srv = _served(engine, long_model_dir)
    try:
        port = srv.server_port
        before = _generate_ids(port)
        weights = [(name, tensor.clone()) for name, tensor in engine.model.named_parameters()]
        raw_post(port, "/release_memory_occupation", {"tags": ["kv_cache", "weights"]})
        raw_post(port, "/resume_memory_occupation", {"tags": ["weights"]})
        answer = raw_post(port, "/update_weights_from_tensor", {
            "serialized_named_tensors": [encode_named_tensors(weights)], "load_format": None, "flush_cache": True,
            "weight_version": "step-1"})
        assert answer == {"success": True, "message": "Success. Weight version updated to step-1."}
        raw_post(port, "/resume_memory_occupation", {"tags": ["kv_cache"]})
        assert _generate_ids(port) == before
        # a changed weight changes the output: the push is what the engine runs
        head = [(n, t * 0) for n, t in weights if n.endswith("lm_head.weight") or n.endswith("embed_tokens.weight")]
        raw_post(port, "/update_weights_from_tensor", {"serialized_named_tensors": [encode_named_tensors(head)]})
        assert _generate_ids(port) != before
    finally:
        srv.shutdown()
        srv.server_close()


def test_update_weights_from_tensor_refuses_code_unknown_names_and_shapes(server):
    import base64
    import os
    import pickle

    from ascend_rl.rollout.tensor_transfer import encode_named_tensors

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/ascend_rl_pwned",))

    port = server[0].server_port
    bodies = {
        "code": {"serialized_named_tensors": [base64.b64encode(pickle.dumps([("x", Evil())])).decode()]},
        "name": {"serialized_named_tensors": [encode_named_tensors([("no.such.weight", torch.zeros(2))])]},
        "shape": {"serialized_named_tensors": [encode_named_tensors([("lm_head.weight", torch.zeros(2, 2))])]},
        "empty": {"serialized_named_tensors": []},
    }
    for what, body in bodies.items():
        with pytest.raises(urllib.error.HTTPError) as err:
            raw_post(port, "/update_weights_from_tensor", body)
        assert err.value.code == 400, what
    assert not os.path.exists("/tmp/ascend_rl_pwned")


def test_cpu_weight_backup_brings_released_weights_back(long_model_dir):
    """`serve --enable-weights-cpu-backup`: release → resume needs no push (as SGLang's flag); without the
    backup, generating after release/resume is a clear error, never output from emptied weights."""
    for backup in (True, False):
        engine = NativeEngine.from_pretrained(str(long_model_dir), enable_weights_cpu_backup=backup)
        srv = _served(engine, long_model_dir)
        try:
            port = srv.server_port
            before = _generate_ids(port)
            raw_post(port, "/release_memory_occupation", {})
            raw_post(port, "/resume_memory_occupation", {})
            if backup:
                assert _generate_ids(port) == before
            else:
                with pytest.raises(urllib.error.HTTPError) as err:
                    _generate_ids(port)
                assert "weights are not loaded" in err.value.read().decode()
        finally:
            srv.shutdown()
            srv.server_close()
