"""/update_weights_from_tensor with what SGLang's MultiprocessingSerializer sends from another process: tensors
as handles to shared memory (CPU, file_system strategy) or to a GPU (CUDA IPC), read without running code.

The sender runs in a process of its own: this file run as a script (`sender_main`). SGLang cannot be imported
without its heavy dependencies (triton, zmq, ...), so its serializer and dataclasses are copied below, each
with the 0.5.8 source lines it copies, and pickled under SGLang's module names, as verl's sender names them."""

from __future__ import annotations

import base64
import dataclasses
import functools
import gc
import glob
import io
import json
import os
import subprocess
import sys
import threading
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

PROMPT = [1, 21, 15, 22, 33, 2, 99, 1]
GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


# --- the sending side, as SGLang 0.5.8 and verl 0.9.1 write it -------------------------------------------------

class MultiprocessingSerializer:
    """sglang/srt/utils/common.py (0.5.8) lines 2168-2190: ForkingPickler, then base64 (SGLang's pybase64 writes
    the standard alphabet)."""

    @staticmethod
    def serialize(obj, output_str: bool = False):
        from multiprocessing.reduction import ForkingPickler

        buf = io.BytesIO()
        ForkingPickler(buf).dump(obj)
        buf.seek(0)
        output = buf.read()
        if output_str:
            output = base64.b64encode(output).decode("utf-8")
        return output


@dataclasses.dataclass
class LocalSerializedTensor:
    """sglang/srt/model_executor/model_runner.py (0.5.8) lines 2491-2499: one serialized tensor per TP rank."""

    values: list


@dataclasses.dataclass
class FlattenedTensorMetadata:
    """sglang/srt/weight_sync/tensor_bucket.py (0.5.8)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def _as_sglang(obj, module: str, patch=None) -> None:
    """Pickle `obj` (a class or function) under SGLang's module name: pickle imports the module and checks the
    name. `patch`: pytest's monkeypatch, to undo it in the test process."""
    set_item = patch.setitem if patch else dict.__setitem__
    set_attr = functools.partial(patch.setattr, raising=False) if patch else setattr
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        set_item(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    set_attr(sys.modules[module], obj.__name__, obj)
    set_attr(obj, "__module__", module)
    if obj.__qualname__ != obj.__name__:  # a nested function (the sender's CUDA patch)
        set_attr(obj, "__qualname__", obj.__name__)


def flattened_bucket(named_tensors):
    """FlattenedTensorBucket(named_tensors=...) of tensor_bucket.py (0.5.8): each tensor's bytes, concatenated."""
    flat, metadata, start = [], [], 0
    for name, tensor in named_tensors:
        data = tensor.flatten().view(torch.uint8)
        metadata.append(FlattenedTensorMetadata(name, tensor.shape, tensor.dtype, start, start + data.numel(),
                                                data.numel()))
        flat.append(data)
        start += data.numel()
    return {"flattened_tensor": torch.cat(flat), "metadata": metadata}


def post(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/update_weights_from_tensor", method="POST",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def sender_main(port: int, model_dir: str, out_dir: str, device: str) -> None:
    """Push modified weights three ways SGLang's clients do, then a hostile and a default-strategy payload;
    keep every shared tensor alive until its answer, free them, and report which segments are left."""
    from safetensors.torch import load_file, save_file

    torch.multiprocessing.set_sharing_strategy("file_system")
    _as_sglang(LocalSerializedTensor, "sglang.srt.model_executor.model_runner")
    _as_sglang(FlattenedTensorMetadata, "sglang.srt.weight_sync.tensor_bucket")
    if device == "cuda":
        _patch_cuda_reductions_as_sglang()
    generator = torch.Generator().manual_seed(7)
    weights = {name: tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
               for name, tensor in sorted(load_file(f"{model_dir}/model.safetensors").items())}
    save_file(weights, f"{out_dir}/expected.safetensors")
    shared = [(name, tensor.to(device, copy=True)) for name, tensor in weights.items()]
    third = len(shared) // 3
    answers = {}
    # verl 0.9.1 (sglang_rollout.update_weights → sglang.srt.weight_sync.utils.update_weights): each tensor
    # serialized alone inside a LocalSerializedTensor, the list serialized again, base64 by the HTTP adapter
    verl = [(name, LocalSerializedTensor(values=[MultiprocessingSerializer.serialize(t.detach())]))
            for name, t in shared[:third]]
    answers["verl"] = post(port, {"serialized_named_tensors": [MultiprocessingSerializer.serialize(verl, True)],
                                  "load_format": None, "flush_cache": True, "weight_version": "step-7"})
    # SGLang's own HttpServerEngineAdapter (entrypoints/http_server_engine.py lines 72-94): plain pairs
    sglang = MultiprocessingSerializer.serialize(shared[third:2 * third], output_str=True)
    answers["sglang"] = post(port, {"serialized_named_tensors": [sglang], "load_format": "direct",
                                    "flush_cache": False, "abort_all_requests": True})
    bucket = flattened_bucket(shared[2 * third:])
    answers["flattened"] = post(port, {"serialized_named_tensors": [MultiprocessingSerializer.serialize(bucket, True)],
                                       "load_format": "flattened_bucket"})
    marker = f"{out_dir}/code_ran"
    hostile = [("model.norm.weight", torch.zeros(8)), ("x", RunsCode(marker))]
    answers["hostile"] = post(port, {"serialized_named_tensors": [MultiprocessingSerializer.serialize(hostile, True)]})
    torch.multiprocessing.set_sharing_strategy("file_descriptor")
    default = [(name, tensor.clone()) for name, tensor in weights.items()]
    answers["default"] = post(port, {"serialized_named_tensors": [MultiprocessingSerializer.serialize(default, True)]})
    del weights, shared, verl, bucket, hostile, default
    gc.collect()
    answers["segments_left"] = sorted(glob.glob(f"/dev/shm/torch_{os.getpid()}_*"))
    Path(f"{out_dir}/answers.json").write_text(json.dumps(answers))


def _patch_cuda_reductions_as_sglang() -> None:
    """sglang/srt/utils/patch_torch.py (0.5.8) monkey_patch_torch_reductions: a CUDA tensor carries its GPU's
    UUID in place of the device index, rebuilt by `_rebuild_cuda_tensor_modified` of that module."""
    from torch.multiprocessing import reductions

    def _rebuild_cuda_tensor_modified(*args):
        raise AssertionError("the sender never rebuilds")

    def _reduce_tensor_modified(*args, **kwargs):
        output_fn, output_args = original(*args, **kwargs)
        if len(output_args) <= 6:  # a CPU tensor: SGLang's patch raises IndexError (verl moves them to the GPU)
            return output_fn, output_args
        uuid = str(torch.cuda.get_device_properties(output_args[6]).uuid)
        return output_fn, (*output_args[:6], uuid, *output_args[7:])

    _as_sglang(_rebuild_cuda_tensor_modified, "sglang.srt.utils.patch_torch")
    original = reductions.reduce_tensor
    reductions.rebuild_cuda_tensor = _rebuild_cuda_tensor_modified
    reductions.reduce_tensor = _reduce_tensor_modified
    reductions.init_reductions()


# --- the server and its tests ----------------------------------------------------------------------------------

def _serve(model_dir, device: str = "cpu"):
    from ascend_rl.rollout.http_server import make_server
    from ascend_rl.rollout.native import NativeEngine

    engine = NativeEngine.from_pretrained(str(model_dir), device=device)
    srv = make_server(engine, str(model_dir), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, engine


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    srv, engine = _serve(tiny_model_dir)
    yield srv.server_port, engine
    srv.shutdown()
    srv.server_close()


def _params(engine) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in engine.model.named_parameters()}


def _generate(port: int) -> list[int]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", method="POST",
                                 data=json.dumps({"input_ids": PROMPT, "sampling_params": GREEDY}).encode())
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())["output_ids"]


def _run_sender(port: int, model_dir, out_dir: Path, device: str) -> dict:
    subprocess.run([sys.executable, __file__, str(port), str(model_dir), str(out_dir), device], check=True,
                   timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads((out_dir / "answers.json").read_text())


def _check_pushed(engine, port: int, answers: dict, out_dir: Path, before: list[int], device: str) -> None:
    from safetensors.torch import load_file

    assert answers["verl"] == [200, {"success": True, "message": "Success. Weight version updated to step-7."}]
    assert answers["sglang"] == [200, {"success": True, "message": "Success."}]
    assert answers["flattened"] == [200, {"success": True, "message": "Success."}]
    expected, held = load_file(str(out_dir / "expected.safetensors")), _params(engine)
    assert sorted(held) == sorted(expected)
    assert all(torch.equal(held[name], expected[name]) for name in expected)  # exactly the sender's weights
    assert _generate(port) != before
    status, body = answers["hostile"]
    assert status == 400 and body["error"]["message"].startswith(
        "serialized_named_tensors: the pickle names posix.system, which is not part of a tensor")
    assert not (out_dir / "code_ran").exists()
    status, body = answers["default"]
    assert status == 400 and 'torch.multiprocessing.set_sharing_strategy("file_system") in the sender' in \
        body["error"]["message"]
    assert all(torch.equal(held[name], p) for name, p in _params(engine).items())  # the 400s changed nothing
    if device == "cpu":  # the server let go of every segment it opened: freed by the sender, they are gone
        assert answers["segments_left"] == []


def test_cpu_tensors_shared_by_another_process_become_the_engines_weights(served, tiny_model_dir, tmp_path):
    port, engine = served
    before = _generate(port)
    answers = _run_sender(port, tiny_model_dir, tmp_path, "cpu")
    _check_pushed(engine, port, answers, tmp_path, before, "cpu")
    info = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/model_info", timeout=30).read())
    assert info["weight_version"] == "step-7"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_ipc_handles_from_another_process_on_a_cuda_server(tiny_model_dir, tmp_path):
    srv, engine = _serve(tiny_model_dir, "cuda")
    try:
        before = _generate(srv.server_port)
        answers = _run_sender(srv.server_port, tiny_model_dir, tmp_path, "cuda")
        _check_pushed(engine, srv.server_port, answers, tmp_path, before, "cuda")
    finally:
        srv.shutdown()
        srv.server_close()


class Rebuild:
    """A pickle that calls `function(*args)` when read: a forged handle."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _body(obj, **fields) -> dict:
    return {"serialized_named_tensors": [base64.b64encode(__import__("pickle").dumps(obj)).decode()], **fields}


def _calls(module: str, name: str) -> dict:
    """A payload whose first global is module.name (called with no arguments)."""
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."
    return {"serialized_named_tensors": [base64.b64encode(payload).decode()]}


def test_forged_handles_and_buckets_are_refused_naming_what_is_wrong(served, monkeypatch):
    from torch.multiprocessing import reductions

    port, engine = served
    held = _params(engine)
    real = torch.zeros(4).untyped_storage()
    manager, segment, size = real._share_filename_cpu_()  # a live segment of this process, 16 bytes

    def storage(*args):
        return [("model.norm.weight", Rebuild(reductions.rebuild_storage_filename, torch.UntypedStorage, *args))]

    flat = flattened_bucket([("model.norm.weight", torch.ones(8))])
    _as_sglang(FlattenedTensorMetadata, "sglang.srt.weight_sync.tensor_bucket", monkeypatch)
    cases = {
        "the segment's size": (_body(storage(manager, segment, 1 << 30)),
                               f"shared memory {segment.decode()} has 80 bytes, the payload declares 1073741888"),
        "a file, not a segment": (_body(storage(manager, b"/../../etc/passwd", size)),
                                  "is not the name of a torch segment"),
        "another socket": (_body(storage(b"/var/run/docker.sock", segment, size)),
                           "is not the socket of torch's shm manager"),
        "CUDA on a CPU server": (_calls("torch.multiprocessing.reductions", "rebuild_cuda_tensor"),
                                 "the payload holds CUDA IPC handles (torch.multiprocessing.reductions."
                                 "rebuild_cuda_tensor) and this server runs on cpu"),
        "SGLang's CUDA patch": (_calls("sglang.srt.utils.patch_torch", "_rebuild_cuda_tensor_modified"),
                                "the payload holds CUDA IPC handles"),
        "NPU on a CPU server": (_calls("torch_npu.multiprocessing.reductions", "rebuild_npu_tensor"),
                                "the payload holds NPU IPC handles (torch_npu.multiprocessing.reductions."
                                "rebuild_npu_tensor) and this server runs on cpu"),
        "a tensor class called": (_calls("torch", "Tensor"), "not a readable payload"),
        "a view past its storage": (_body([("model.norm.weight", Rebuild(
            reductions.rebuild_tensor, torch.Tensor, Rebuild(reductions.rebuild_typed_storage, Rebuild(
                reductions.rebuild_storage_empty, torch.UntypedStorage), torch.float32), (0, (8,), (1,), False)))]),
            r"a tensor view of size (8,) past the end of its 0-element storage"),
        "a bucket's bounds": (_body({**flat, "metadata": [FlattenedTensorMetadata(
            "model.norm.weight", torch.Size([8]), torch.float32, 0, 64, 64)]}, load_format="flattened_bucket"),
            "metadata entry model.norm.weight: bytes [0, 64) of 32 do not hold a [8] torch.float32 tensor"),
        "a custom loader": (_body([], load_format="verl.workers.rollout.sglang_rollout.delta_loader.load"),
                            "load_format='verl.workers.rollout.sglang_rollout.delta_loader.load'"),
        "an integer weight": (_body([("model.norm.weight", torch.ones(128, dtype=torch.int64))]),
                              "serialized_named_tensors: model.norm.weight: dtype int64, a weight must be a "
                              "floating-point tensor"),
    }
    for what, (body, message) in cases.items():
        status, answer = post(port, body)
        assert status == 400 and message in answer["error"]["message"], (what, answer)
    assert all(torch.equal(held[name], p) for name, p in _params(engine).items())


def test_cuda_handles_are_checked_before_cuda_sees_them(monkeypatch):
    """A CUDA server's checks, here on any machine: each is made before torch opens a handle."""
    import pickle

    from torch.multiprocessing import reductions

    from ascend_rl.rollout.tensor_transfer import decode_named_tensors

    real = torch.zeros(4).untyped_storage()
    _, segment, _ = real._share_filename_cpu_()  # stands for the sender's refcount segment

    def handle(size=(4,), storage_bytes=16, device=0, ref_counter=segment, slot=0):
        args = (torch.Tensor, size, (1,), 0, torch.storage.TypedStorage, torch.float32, device, b"h" * 64,
                storage_bytes, 0, False, ref_counter, slot, None, False)
        return pickle.dumps([("w", Rebuild(reductions.rebuild_cuda_tensor, *args))])

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(uuid="GPU-0"))
    cases = [
        (handle(size=(5,)), r"a tensor view of size \(5,\) past the end of its 4-element storage"),
        (handle(ref_counter=b"/etc/passwd"), "is not the name of a torch segment"),
        (handle(slot=10000), "refcount slot 10000 of 10000"),
        (handle(slot=9), f"shared memory {segment.decode()} has 80 bytes, the payload declares 144"),
        (handle(device="GPU-other"), "CUDA device 'GPU-other' is not a GPU this server sees"),
        (handle(device=1), r"CUDA device 1: this server sees 1 device\(s\)"),
        (pickle.dumps([("w", Rebuild(reductions.rebuild_cuda_tensor, 1, 2))]), "with 2 arguments, not 15"),
    ]
    for payload, message in cases:
        with pytest.raises(ValueError, match=message):
            decode_named_tensors(payload, device="cuda")


if __name__ == "__main__":
    sender_main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
