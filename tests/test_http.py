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


def test_generate_matches_the_engine_and_sglang_shapes(server, client):
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
    assert set(answer) == {"output_ids", "meta_info"}
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
    with pytest.raises(HttpEngineError, match="400 .*send input_ids, not text"):
        client.request("POST", "/generate", {"text": "hello"})
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
