"""`ascend-rl serve` against malformed, hostile and unlucky requests: every bad body is a 4xx with a message
that names the field (never a 500), the sizes are bounded, a group join to an address that never answers
neither holds the server's lock nor outlasts its bound, SIGTERM stops the server within seconds, weights load
only from under the weights roots, and the API key comes from a flag, a file or the environment."""

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ascend_rl.rollout.http_client import HttpEngine
from ascend_rl.rollout.http_server import EngineService, make_server
from ascend_rl.rollout.native import NativeEngine
from ascend_rl.rollout.request_checks import Limits
from ascend_rl.rollout.server_process import free_port

PROMPT = [1, 21, 15, 22, 33, 2, 99, 1]
VOCAB = 128  # the tiny model's
LIMITS = Limits(max_body_bytes=1 << 20, max_samples=64, max_tokens=20_000)
GROUP_TIMEOUT_S = 2.0
G, INIT, DIST, DISK = "/generate", "/init_weights_update_group", "/update_weights_from_distributed", \
    "/update_weights_from_disk"
POSTS = [G, "/abort_request", "/pause_generation", "/continue_generation", "/release_memory_occupation",
         "/resume_memory_occupation", "/flush_cache", DISK, INIT, DIST, "/destroy_weights_update_group",
         "/v1/completions", "/v1/chat/completions"]


@contextlib.contextmanager
def serving(engine, model_dir, **kwargs):
    srv = make_server(engine, str(model_dir), port=0, **kwargs)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_port
    finally:
        srv.shutdown()
        srv.server_close()


class Hostile:
    def __init__(self, engine, port, model_dir):
        self.engine, self.port, self.model_dir = engine, port, model_dir


@pytest.fixture(scope="module")
def hostile(tiny_model_dir, tmp_path_factory):
    engine = NativeEngine.from_pretrained(str(tiny_model_dir))
    assert engine.model.config.vocab_size == VOCAB
    with serving(engine, tiny_model_dir, weights_roots=[str(tmp_path_factory.getbasetemp())], limits=LIMITS,
                 group_timeout_s=GROUP_TIMEOUT_S) as port:
        yield Hostile(engine, port, tiny_model_dir)


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    """The tiny model with a context long enough for a generation that outlasts the test's waits."""
    from ascend_rl.data.tiny_model import TinyModelSpec, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("long") / "model", TinyModelSpec(max_position_embeddings=32768))


def post(port, path, body=None, headers=None, timeout=60):
    """(status, answer): the answer's JSON, or its text. `body`: bytes are sent as they are."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, _decode(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, _decode(err.read())


def _decode(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def message(answer) -> str:
    return answer["error"]["message"] if isinstance(answer, dict) and "error" in answer else str(answer)


def in_background(fn):
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=fn()), daemon=True)
    thread.start()
    return thread, result


def gen(**sampling) -> dict:
    return {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2, **sampling}}


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


JOIN = {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1, "world_size": 2}
BUCKET = {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[128]]}

BAD = [  # (path, body, status, a fragment of the message)
    # types
    (G, gen(max_new_tokens="5"), 400, "max_new_tokens must be an integer, got '5'"),
    (G, gen(max_new_tokens=2.5), 400, "max_new_tokens must be an integer, got 2.5"),
    (G, {**gen(), "rid": 7}, 400, "rid must be a string or a list of strings, got 7"),
    (G, {**gen(), "rid": {"a": 1}}, 400, "rid must be a string or a list of strings, got {'a': 1}"),
    (G, {**gen(), "rid": ["a", 1]}, 400, "rid must be a string or a list of strings"),
    (G, gen(temperature=True), 400, "temperature must be a number, got True"),
    (G, gen(temperature="hot"), 400, "temperature must be a number, got 'hot'"),
    (G, gen(ignore_eos="no"), 400, "ignore_eos must be true or false, got 'no'"),
    (G, {**gen(), "return_logprob": "no"}, 400, "return_logprob must be true or false, got 'no'"),
    (G, {**gen(), "stream": "no"}, 400, "stream must be true or false, got 'no'"),
    (G, gen(stop=5), 400, "stop must be a string or a list of strings"),
    (G, gen(stop=["a", 1]), 400, "stop must be a string or a list of strings"),
    (G, gen(stop_token_ids=5), 400, "stop_token_ids must be a list of token ids"),
    (G, gen(stop_token_ids=[True]), 400, "stop_token_ids must be integers, got True"),
    (G, gen(sampling_seed="x"), 400, "sampling_seed must be an integer, got 'x'"),
    (G, gen(max_tokens=3), 400, "unknown sampling_params ['max_tokens']"),
    (G, {"input_ids": PROMPT, "sampling_params": "greedy"}, 400, "sampling_params must be an object, got str"),
    (G, {"input_ids": PROMPT, "sampling_params": [7]}, 400, "sampling_params must be an object, got int"),
    (G, {"input_ids": [1, True]}, 400, "input_ids must be token ids (integers), got True"),
    (G, {"input_ids": [[1, 2], [3, 4.0]]}, 400, "input_ids must be token ids (integers), got 4.0"),
    (G, {"input_ids": [True, 1]}, 400, "input_ids must be a non-empty list of token ids or of such lists"),
    (G, {"input_ids": []}, 400, "input_ids must be a non-empty list"),
    (G, {"input_ids": [[]]}, 400, "input_ids must be a non-empty list"),
    (G, {"input_ids": "1 2 3"}, 400, "input_ids must be a non-empty list"),
    (G, {}, 400, "input_ids must be a non-empty list"),
    (G, {"text": ["hello", 5]}, 400, "text must be a string or a non-empty list of strings"),
    (G, {"text": ""}, 400, "text '' has no tokens"),
    (G, {**gen(), "logprob_start_len": "0"}, 400, "logprob_start_len must be an integer or a list of integers"),
    (G, {**gen(), "return_logprob": True, "top_logprobs_num": VOCAB + 1}, 400, "top_logprobs_num=129 is outside"),
    # ranges
    (G, gen(max_new_tokens=-1), 400, "max_new_tokens must be at least 0, got -1."),
    (G, gen(temperature=float("nan")), 400, "temperature must be a non-negative finite number, got nan."),
    (G, gen(temperature=float("inf")), 400, "temperature must be a non-negative finite number, got inf."),
    (G, gen(temperature=-0.5), 400, "temperature must be a non-negative finite number, got -0.5."),
    (G, gen(temperature=10**400), 400, "temperature must be a finite number"),
    (G, gen(top_p=0), 400, "top_p must be in (0, 1], got 0.0."),
    (G, gen(top_p=1.5), 400, "top_p must be in (0, 1], got 1.5."),
    (G, gen(top_p=float("nan")), 400, "top_p must be in (0, 1], got nan."),
    (G, gen(top_k=-2), 400, "top_k must be -1 (disable) or at least 1, got -2."),
    (G, gen(top_k=0), 400, "top_k must be -1 (disable) or at least 1, got 0."),
    (G, gen(min_p=-0.1), 400, "min_p must be in [0, 1], got -0.1."),
    (G, gen(min_p=1.5), 400, "min_p must be in [0, 1], got 1.5."),
    (G, gen(n=0), 400, "n must be at least 1, got 0."),
    (G, gen(sampling_seed=2**64), 400, "sampling_seed must fit in 64 bits"),
    (G, {"input_ids": [1, VOCAB]}, 400, f"Token id {VOCAB} is out of vocabulary (vocab size: {VOCAB})."),
    (G, {"input_ids": [[1, 2], [-1]]}, 400, f"Token id -1 is out of vocabulary (vocab size: {VOCAB})."),
    (G, gen(stop_token_ids=[VOCAB + 5]), 400, f"Token id {VOCAB + 5} is out of vocabulary (vocab size: {VOCAB})."),
    (G, gen(stop_token_ids=[-3]), 400, "Token id -3 is out of vocabulary"),
    (G, gen(max_new_tokens=600), 400, "Requested token count exceeds the model's maximum context length of 512"),
    # shapes of the request
    (G, {**gen(), "rid": ["a", "b"]}, 400, "1 prompts but 2 rids"),
    (G, {"input_ids": [PROMPT, PROMPT], "sampling_params": [{}]}, 400, "2 prompts but 1 sampling_params"),
    # sizes
    (G, {"input_ids": PROMPT, "sampling_params": {"n": 65}}, 400,
     "65 samples (prompts × n) in one request: this server takes at most 64 (--max-request-samples)"),
    (G, {"input_ids": [PROMPT] * 2, "sampling_params": {"n": 32, "max_new_tokens": 400}}, 400,
     "26112 tokens (prompt + max_new_tokens, every sample) in one request: this server takes at most 20000"),
    (G, gen(max_new_tokens=10**30), 400, "(--max-request-tokens)"),
    # bodies that are not JSON objects
    (G, b"{not json", 400, "request body is not JSON"),
    (G, b'{"input_ids": "\xff"}', 400, "request body is not JSON"),
    (G, b'{"input_ids": [' + b"9" * 5000 + b"]}", 400, "request body is not JSON"),
    (G, nested(100_000), 400, "nested too deeply"),
    (G, b'{"input_ids": ' + nested(50_000) + b"}", 400, "nested too deeply"),
    (G, b'{"input_ids": ' + nested(400) + b"}", 400, "input_ids must be token ids (integers), got [[[[[[[...]]]]]]]"),
    (G, b'{"rid": ' + nested(400) + b', "input_ids": [1]}', 400, "rid must be a string or a list of strings"),
    (G, [], 400, "request body must be a JSON object"),
    ("/flush_cache", 5, 400, "request body must be a JSON object"),
    ("/abort_request", None, 400, "request body must be a JSON object"),
    # the other endpoints
    ("/abort_request", {"rid": 5}, 400, "rid must be a string or a list of strings, got 5"),
    ("/abort_request", {"abort_all": "yes"}, 400, "abort_all must be true or false, got 'yes'"),
    ("/pause_generation", {"mode": 5}, 400, "mode must be a string, got 5"),
    ("/pause_generation", {"mode": "sideways"}, 400, "pause mode 'sideways'"),
    ("/release_memory_occupation", {"tags": "weights"}, 400,
     "tags must be a list of memory tags (weights, kv_cache), got 'weights'"),
    ("/release_memory_occupation", {"tags": ["weights", "gpu"]}, 400, "tags must be a list of memory tags"),
    ("/resume_memory_occupation", {"tags": [1]}, 400, "tags must be a list of memory tags"),
    (DISK, {"model_path": 5}, 400, "model_path must be a string, got 5"),
    (DISK, {}, 400, "model_path is required"),
    (DISK, {"model_path": "/etc"}, 403, "model_path '/etc' is outside this server's weights roots (--weights-root)"),
    (DISK, {"model_path": "/tmp/\x00"}, 400, "null"),
    (INIT, {k: v for k, v in JOIN.items() if k != "master_address"}, 400, "master_address is required"),
    (INIT, {**JOIN, "master_address": 10}, 400, "master_address must be a string, got 10"),
    (INIT, {**JOIN, "master_address": "a/b?rank=0"}, 400, "master_address must be a host name or an IP address"),
    (INIT, {**JOIN, "master_port": 0}, 400, "master_port must be an integer in [1, 65535], got 0"),
    (INIT, {**JOIN, "master_port": 70000}, 400, "master_port must be an integer in [1, 65535], got 70000"),
    (INIT, {**JOIN, "master_port": "29500"}, 400, "master_port must be an integer in [1, 65535], got '29500'"),
    (INIT, {**JOIN, "master_port": 29500.0}, 400, "master_port must be an integer in [1, 65535], got 29500.0"),
    (INIT, {**JOIN, "world_size": 1}, 400, "world_size must be an integer at least 2, got 1"),
    (INIT, {**JOIN, "rank_offset": 0}, 400, "rank_offset must be an integer in [1, 1], got 0"),
    (INIT, {**JOIN, "rank_offset": 2}, 400, "rank_offset must be an integer in [1, 1], got 2"),
    (INIT, {**JOIN, "rank_offset": True}, 400, "rank_offset must be an integer in [1, 1], got True"),
    (INIT, {**JOIN, "backend": "mpi"}, 400, "backend must be one of gloo, nccl, hccl, got 'mpi'"),
    (INIT, {**JOIN, "group_name": 5}, 400, "group_name must be a string, got 5"),
    (INIT, {**JOIN, "group_name": ""}, 400, "group_name must not be empty"),
    (DIST, BUCKET, 400, "no weight update group: call /init_weights_update_group first"),
    (DIST, {**BUCKET, "group_name": ["g"]}, 400, "group_name must be a string, got ['g']"),
    ("/destroy_weights_update_group", {"group_name": 5}, 400, "group_name must be a string, got 5"),
]


@pytest.mark.parametrize("path,body,status,fragment", BAD, ids=[f"{i}{b[0]}" for i, b in enumerate(BAD)])
def test_a_bad_request_is_a_4xx_that_says_what_is_wrong(hostile, path, body, status, fragment):
    got, answer = post(hostile.port, path, body)
    assert got == status and fragment in message(answer), (got, answer)


def test_a_body_beyond_the_limit_is_refused_by_its_length_or_while_it_arrives(hostile):
    """413 before reading a body whose Content-Length is too large, and as soon as a chunked one passes the
    limit (a client that is still sending when the server answers and closes gets a reset, as anywhere)."""
    for declared in (True, False):
        conn = http.client.HTTPConnection("127.0.0.1", hostile.port, timeout=10)
        conn.putrequest("POST", G)
        if declared:
            conn.putheader("Content-Length", str(10**12))
            conn.endheaders()  # and no body: the server must not wait for it
        else:
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            size = LIMITS.max_body_bytes + 1
            conn.send(f"{size:x}\r\n".encode() + b" " * size + b"\r\n")  # one chunk, and no end yet
        resp = conn.getresponse()
        assert resp.status == 413, declared
        assert json.loads(resp.read())["error"]["message"] == \
            f"request body over {LIMITS.max_body_bytes} bytes (--max-request-bytes)"
        conn.close()
    assert_still_serving(hostile.port)


def assert_still_serving(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
        assert resp.status == 200
    status, answer = post(port, G, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 3,
                                                                             "ignore_eos": True}})
    assert status == 200 and len(answer["output_ids"]) == 3, answer


def restore(hostile, path):
    """Undo what a body that happened to be valid did to the engine's state (paused, memory released)."""
    if path in ("/pause_generation", "/release_memory_occupation"):
        for step, body in (("/continue_generation", {}), ("/resume_memory_occupation", {}),
                           (DISK, {"model_path": str(hostile.model_dir)})):  # resumed weights must be pushed
            assert post(hostile.port, step, body)[0] == 200


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=4),
                    max_leaves=12)
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def test_random_json_at_every_post_endpoint_is_never_a_5xx(hostile):
    @FUZZ
    @given(path=st.sampled_from(POSTS), body=JSON)
    def fuzz(path, body):
        status, answer = post(hostile.port, path, body)
        assert status == 200 or 400 <= status < 500, (status, answer)
        restore(hostile, path)

    fuzz()
    assert_still_serving(hostile.port)


TOKEN = st.integers(-2, VOCAB + 2)
SAMPLING = st.fixed_dictionaries({}, optional={
    "max_new_tokens": st.integers(-2, 6) | JSON, "temperature": st.floats() | JSON,
    "top_p": st.floats(-0.5, 1.5) | JSON, "top_k": st.integers(-3, 200) | JSON, "min_p": st.floats(-0.5, 1.5) | JSON,
    "n": st.integers(-1, 3) | JSON, "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=2) | JSON,
    "stop_token_ids": st.lists(TOKEN, max_size=3) | JSON, "ignore_eos": st.booleans() | JSON,
    "sampling_seed": st.integers() | JSON})
NEAR_GENERATE = st.fixed_dictionaries(
    {"input_ids": st.lists(TOKEN, min_size=1, max_size=8) | st.lists(st.lists(TOKEN, min_size=1, max_size=6),
                                                                    min_size=1, max_size=3) | JSON},
    optional={"sampling_params": SAMPLING | st.lists(SAMPLING, max_size=3) | JSON,
              "rid": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=3) | JSON,
              "return_logprob": st.booleans() | JSON, "stream": st.booleans() | JSON})
FIELDS = {  # the other endpoints' own fields, with values near and far from what they take
    "/abort_request": ["rid", "abort_all"], "/pause_generation": ["mode"],
    "/release_memory_occupation": ["tags"], "/resume_memory_occupation": ["tags"],
    DISK: ["model_path", "weight_version", "flush_cache"], DIST: ["names", "dtypes", "shapes", "group_name"],
    "/destroy_weights_update_group": ["group_name"]}
NEAR_VALUE = (st.sampled_from(["weights", "kv_cache", "abort", "in_place", "float32", "model.norm.weight", "/etc"])
              | st.lists(st.sampled_from(["weights", "kv_cache", "gpu", "float32"]), max_size=3)
              | st.lists(st.integers(0, 200), max_size=2) | JSON)


def test_near_valid_bodies_are_never_a_5xx(hostile):
    @FUZZ
    @given(body=NEAR_GENERATE)
    def fuzz_generate(body):
        status, answer = post(hostile.port, G, body)
        assert status == 200 or 400 <= status < 500, (status, answer)

    @FUZZ
    @given(data=st.data())
    def fuzz_others(data):
        path = data.draw(st.sampled_from(sorted(FIELDS)))
        body = data.draw(st.dictionaries(st.sampled_from(FIELDS[path]), NEAR_VALUE))
        status, answer = post(hostile.port, path, body)
        assert status == 200 or 400 <= status < 500, (path, body, status, answer)
        restore(hostile, path)

    fuzz_generate()
    fuzz_others()
    assert_still_serving(hostile.port)


def wait_for_abandoned_joins(timeout_s: float = 60) -> None:
    """A join the server gave up on lives on in torch until torch lets go (its threads are named "join …");
    a process that exits while one is inside torch aborts, so a test waits for them."""
    for thread in threading.enumerate():
        if thread.name.startswith("join "):
            thread.join(timeout_s)
            assert not thread.is_alive(), thread.name


def test_a_group_join_that_gets_no_answer_gives_up_in_time_and_holds_no_lock(hostile):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts and never answers: torch's own timeout never fires
    port = silent.getsockname()[1]
    try:
        start = time.monotonic()
        join, result = in_background(lambda: post(hostile.port, INIT, {**JOIN, "master_port": port,
                                                                       "group_name": "silent"}))
        time.sleep(0.5)
        assert post(hostile.port, "/flush_cache", {}) == (200, "Cache flushed.")  # weight/memory calls go on
        flushed_after = time.monotonic() - start
        again = post(hostile.port, INIT, {**JOIN, "master_port": port, "group_name": "silent"})
        join.join(30)
        took = time.monotonic() - start
    finally:
        silent.close()  # now torch gets an answer, and the abandoned join ends
    wait_for_abandoned_joins()
    assert flushed_after < GROUP_TIMEOUT_S and join.is_alive() is False
    assert again[0] == 400 and "weight update group 'silent' exists or is being joined" in message(again[1])
    status, answer = result["value"]
    assert status == 400
    assert message(answer) == f"init_weights_update_group: no rendezvous with 127.0.0.1:{port} within 2 s"
    assert GROUP_TIMEOUT_S <= took < GROUP_TIMEOUT_S + 3


def test_a_group_join_to_a_closed_port_is_an_error_within_the_bound(hostile):
    start = time.monotonic()
    status, answer = post(hostile.port, INIT, {**JOIN, "master_port": free_port(), "group_name": "closed"})
    assert status == 400 and message(answer).startswith("init_weights_update_group: ")
    assert time.monotonic() - start < GROUP_TIMEOUT_S + 3
    wait_for_abandoned_joins()


RANK0 = """
import sys, torch, torch.distributed as dist
from ascend_rl.rollout.weight_group import join_weight_group
group = join_weight_group("gloo", "127.0.0.1", int(sys.argv[1]), 0, 2, "push", timeout_s=60)
dist.broadcast(torch.full((128,), 0.5), src=0, group=group)
sys.stdin.readline()  # until the server has let go of the group
dist.destroy_process_group(group)
"""


def test_weights_by_broadcast_take_only_the_models_own_names_dtypes_and_shapes(tiny_model_dir):
    engine = NativeEngine.from_pretrained(str(tiny_model_dir))
    norm = dict(engine.model.named_parameters())["model.norm.weight"]
    port = free_port()
    trainer = subprocess.Popen([sys.executable, "-c", RANK0, str(port)], stdin=subprocess.PIPE)  # rank 0
    try:
        with serving(engine, tiny_model_dir, group_timeout_s=120) as server:
            join = {**JOIN, "master_port": port, "group_name": "push"}
            assert post(server, INIT, join)[0] == 200
            assert "exists" in message(post(server, INIT, join)[1])
            bucket = {**BUCKET, "group_name": "push"}
            for bad, fragment in [
                ({"names": ["lm_head.bias"]}, "names: the model has no parameter 'lm_head.bias'"),
                ({"dtypes": ["Tensor"]}, "dtypes: 'Tensor' for model.norm.weight: expected one of float32, float16"),
                ({"dtypes": ["__class__"]}, "dtypes: '__class__'"),
                ({"shapes": [[2**40]]}, "shapes: [1099511627776] for model.norm.weight: the model's is [128]"),
                ({"shapes": [[128.0]]}, "shapes: [128.0] for model.norm.weight"),
                ({"shapes": [[True] * 128]}, "shapes: "),
                ({"names": ["model.norm.weight", "model.norm.weight"]}, "names, dtypes and shapes must be lists"),
                ({"dtypes": "float32"}, "names, dtypes and shapes must be lists of the same length"),
            ]:  # refused before anything is received: the broadcast waits for the good request
                status, answer = post(server, DIST, {**bucket, **bad})
                assert status == 400 and fragment in message(answer), (bad, answer)
            assert bool((norm != 0.5).all())
            assert post(server, DIST, bucket) == (200, {"success": True, "message": "received 1 tensors"})
            assert bool((norm == 0.5).all())
            assert post(server, "/destroy_weights_update_group", {"group_name": "push"})[0] == 200
        trainer.communicate(b"done\n", timeout=60)
        assert trainer.returncode == 0
    finally:
        if trainer.poll() is None:
            trainer.kill()


def test_weights_load_only_from_under_the_weights_roots(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    engine = NativeEngine.from_pretrained(str(tiny_model_dir))
    norm = dict(engine.model.named_parameters())["model.norm.weight"]
    root, outside = tmp_path / "root", tmp_path / "outside"
    for folder, tensor in ((root / "push", torch.full((128,), 2.0)), (outside, torch.full((128,), 3.0)),
                           (root / "wrong_shape", torch.zeros(3))):
        folder.mkdir(parents=True)
        save_file({"model.norm.weight": tensor}, folder / "w.safetensors")
    (root / "dir_link").symlink_to(outside)
    (root / "file_link").mkdir()
    (root / "file_link" / "w.safetensors").symlink_to(outside / "w.safetensors")
    before = norm.clone()
    with serving(engine, tiny_model_dir, weights_roots=[str(root)]) as port:
        for path in (outside, root / "dir_link", root / "push" / ".." / ".." / "outside"):
            status, answer = post(port, DISK, {"model_path": str(path)})
            assert status == 403 and f"is outside this server's weights roots (--weights-root): {root}" in \
                message(answer), path
        status, answer = post(port, DISK, {"model_path": str(root / "file_link")})
        assert status == 400 and "no *.safetensors files" in message(answer)  # the link out is not read
        status, answer = post(port, DISK, {"model_path": str(root / "wrong_shape")})
        assert status == 400 and "model.norm.weight: shape [3] where the model has [128]" in message(answer)
        assert torch.equal(norm, before)
        assert post(port, DISK, {"model_path": str(root / "push"), "weight_version": "v7"})[0] == 200
        assert bool((norm == 2.0).all())
    assert EngineService(engine, str(tiny_model_dir)).weights_roots == [tiny_model_dir.resolve().parent]


def test_the_api_key_is_compared_exactly(tiny_model_dir):
    engine = NativeEngine.from_pretrained(str(tiny_model_dir))
    with serving(engine, tiny_model_dir, api_key="s3cret") as port:
        for header in (None, "Bearer wrong", "bearer s3cret", "Bearer s3cre", "Bearer s3crets", "Bearer s3crét"):
            status, answer = post(port, "/flush_cache", {}, headers={"Authorization": header} if header else None)
            assert (status, answer) == (401, {"error": "Unauthorized"}), header
        assert post(port, "/flush_cache", {}, headers={"Authorization": "Bearer s3cret"}) == (200, "Cache flushed.")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            assert resp.status == 200  # the probe stays open, as in SGLang


def serve_args(*argv):
    import argparse

    from ascend_rl.cli import serve_cmd

    parser = argparse.ArgumentParser()
    serve_cmd.add_arguments(parser)
    return parser.parse_args(["--model-path", "m", *argv])


def test_the_api_key_comes_from_the_flag_a_file_or_the_environment(tmp_path):
    from ascend_rl.cli.serve_cmd import api_key
    from ascend_rl.errors import UserError

    env = {"ASCEND_RL_API_KEY": "from-env"}
    (tmp_path / "key").write_text("from-file\n")
    (tmp_path / "empty").write_text("\n")
    assert api_key(serve_args(), {}) is None
    assert api_key(serve_args(), env) == "from-env"
    assert api_key(serve_args("--api-key-file", str(tmp_path / "key")), env) == "from-file"
    assert api_key(serve_args("--api-key", "from-flag"), env) == "from-flag"
    with pytest.raises(UserError, match="--api-key-file .*/empty: the first line is empty"):
        api_key(serve_args("--api-key-file", str(tmp_path / "empty")), env)
    with pytest.raises(UserError, match="--api-key-file .*/missing: cannot read it"):
        api_key(serve_args("--api-key-file", str(tmp_path / "missing")), env)
    with pytest.raises(SystemExit):  # one source on the command line
        serve_args("--api-key", "a", "--api-key-file", str(tmp_path / "key"))


@pytest.mark.parametrize("port,error", [("99999", "must be at most 65535, got 99999"),
                                        ("-1", "must be at least 0, got -1"),
                                        ("http", "expected an integer, got 'http'")])
def test_a_bad_port_is_a_one_line_error(port, error, capsys):
    from ascend_rl.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model-path", "m", "--port", port])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"ascend-rl serve: error: argument --port: {error}"


def test_sigterm_stops_the_server_within_seconds_while_it_waits(long_model_dir):
    """A generation decoding and a group join waiting on an address that never answers: SIGTERM ends both
    (the generation aborted, the join given up) and the process exits within seconds. The key comes from
    the environment."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ascend_rl", "serve", "--model-path", str(long_model_dir),
                             "--port", str(port), "--weights-group-timeout", "300"],
                            env={**os.environ, "ASCEND_RL_API_KEY": "from-env"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    silent = socket.create_server(("127.0.0.1", 0))
    key = {"Authorization": "Bearer from-env"}
    try:
        HttpEngine(f"http://127.0.0.1:{port}").wait_until_healthy(timeout_s=120, poll_s=0.2)
        assert post(port, "/flush_cache", {})[0] == 401
        join, joined = in_background(lambda: post(port, INIT, {**JOIN, "master_port": silent.getsockname()[1]},
                                                  headers=key))
        decode, decoded = in_background(lambda: post(port, G, {"input_ids": PROMPT, "sampling_params": {
            "max_new_tokens": 30_000, "ignore_eos": True}}, headers=key))
        time.sleep(2.0)
        assert join.is_alive() and decode.is_alive()
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - start
        join.join(5)
        decode.join(5)
    finally:
        silent.close()
        if proc.poll() is None:
            proc.kill()
    assert took < 6, proc.stderr.read()
    assert joined["value"] == (503, {"error": {"message": "the server is shutting down"}})
    assert decoded["value"][0] == 200 and decoded["value"][1]["meta_info"]["finish_reason"]["type"] == "abort"
