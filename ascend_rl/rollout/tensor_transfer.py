"""Decoding the body of SGLang's POST /update_weights_from_tensor into named tensors, safely: the body comes
from the network, and a pickle can run any code its author names.

Wire format (SGLang 0.5.8 `UpdateWeightsFromTensorReqInput`; verl's http_server_engine sends the same):

    {"serialized_named_tensors": [payload, ...],  # one per tensor-parallel rank: rank r reads entry r
     "load_format": null | "direct" | "flattened_bucket" | a custom loader's import path,
     "flush_cache": true, "abort_all_requests": false, "weight_version": null | "..."}

A payload is base64 text (standard alphabet; SGLang decodes it with validate=True) of
`MultiprocessingSerializer.serialize(named_tensors)`: a pickle, written by multiprocessing's ForkingPickler,
of a list of (name, tensor) pairs. SGLang's weight_sync (and verl) wrap each tensor in a
`LocalSerializedTensor(values=[...])`: one inner pickle of the tensor per TP rank, raw bytes.

Two kinds of payload are read:

- SGLang's own: ForkingPickler writes tensors as handles to memory, not their data (torch.multiprocessing's
  reductions). `tensor_handles` rebuilds the ones another process can open after checking every field: CPU
  tensors shared under the "file_system" strategy (a named /dev/shm segment), and CUDA / NPU IPC handles
  when this server runs on that device. The default "file_descriptor" strategy's handles can only be opened
  by the sender's own children: refused, with the sender's fix in the message.
- The tensors' data: a plain pickle (`pickle.dumps`, what `encode_named_tensors` writes) of the (name, tensor)
  pairs, or `torch.save` output of the list (or of a name → tensor dict), read by
  `torch.load(weights_only=True)`.

Pickles of either kind go through one restricted unpickler that knows only the globals a tensor's pickle
uses, each answered by a checking stand-in, never by the callable the pickle names; anything else (another
global, a persistent id) is refused with a ValueError naming the field. Not weights_only alone, because a plain
tensor pickle stores its data through `torch.storage._load_from_bytes`, which calls torch.load with
weights_only=False: we substitute a weights_only reader for exactly that global.

load_format "flattened_bucket" (SGLang's FlattenedTensorBucket, 0.5.8's model_runner): the payload is
{"flattened_tensor": uint8 tensor, "metadata": [FlattenedTensorMetadata(name, shape, dtype, start_idx,
end_idx, numel)]}; each metadata entry is checked against the flat tensor before it is cut into named views.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import pickle
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ascend_rl.rollout import tensor_handles as handles
from ascend_rl.rollout.tensor_handles import Refused as _Refused

FIELD = "serialized_named_tensors"
# The native engine copies named tensors by parameter name: SGLang's None (model.load_weights) and "direct".
TENSOR_LOAD_FORMATS = (None, "direct")
# Over HTTP also SGLang's flattened buckets, cut into named tensors here. Custom loaders would run SGLang's code.
BODY_LOAD_FORMATS = (*TENSOR_LOAD_FORMATS, "flattened_bucket")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format
LOCAL_SERIALIZED = {("sglang.srt.model_executor.model_runner", "LocalSerializedTensor"),
                    ("sglang.srt.model_executor.model_runner_components.weight_updater", "LocalSerializedTensor")}
FLATTENED_METADATA = ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata")


@dataclass(frozen=True)
class TensorUpdate:
    """A decoded body: the arguments of `NativeEngine.update_weights_from_tensor` and what the route does
    around it (abort running requests first; label the new weights). `load_format` is the engine's: a
    flattened bucket arrives already cut into named tensors (None)."""

    named_tensors: list[tuple[str, torch.Tensor]]
    load_format: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None


def decode_update_weights_from_tensor(body, tp_rank: int = 0, device="cpu") -> TensorUpdate:
    """SGLang's /update_weights_from_tensor body → named tensors (this engine is one rank: entry 0).
    `device`: the engine's; CUDA / NPU IPC handles are opened only on that kind of device.
    Raises ValueError naming the field for anything malformed or not a tensor."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    load_format = body.get("load_format")
    if load_format not in BODY_LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r}: this engine loads named tensors (null or 'direct') or "
                         f"SGLang's 'flattened_bucket', not custom loaders")
    flags = {key: body.get(key, default) for key, default in (("flush_cache", True), ("abort_all_requests", False))}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
    version = body.get("weight_version")
    if version is not None and not isinstance(version, str):
        raise ValueError(f"weight_version must be a string or null, got {type(version).__name__}")
    payloads = body.get(FIELD)
    if not isinstance(payloads, list) or not payloads:
        raise ValueError(f"{FIELD} must be a non-empty list (one payload per tensor-parallel rank)")
    if tp_rank >= len(payloads):
        raise ValueError(f"{FIELD} has {len(payloads)} payload(s): none for tensor-parallel rank {tp_rank}")
    flattened = load_format == "flattened_bucket"
    named = decode_named_tensors(payloads[tp_rank], tp_rank, device, flattened)
    return TensorUpdate(named, None if flattened else load_format, flags["flush_cache"],
                        flags["abort_all_requests"], version)


def decode_named_tensors(payload: str | bytes, tp_rank: int = 0, device="cpu",
                         flattened: bool = False) -> list[tuple[str, torch.Tensor]]:
    """One payload (base64 text, or the raw bytes an in-process caller hands over) → (name, tensor) pairs;
    `flattened`: the payload is a flattened bucket."""
    device = torch.device(device)
    try:
        obj = _load(_payload_bytes(payload), device)
        return _unflatten(obj) if flattened else _named_tensors(obj, tp_rank, device)
    except _Refused as err:
        message = f"{FIELD}: {err}"
    except Exception as err:  # noqa: BLE001 - whatever a hostile or broken payload raises is the request's fault
        message = f"{FIELD}: not a readable payload ({type(err).__name__}: {err})"
    # Raised here, not in the handler: the error's traceback holds the unpickler and the shared segments it
    # opened, which then go (and the sender's memory with them) now, not at the next garbage collection.
    raise ValueError(message)


def encode_named_tensors(named_tensors) -> str:
    """The sending side for this engine: one payload carrying the tensors' data (host copies), which
    `decode_named_tensors` reads. Send it as {"serialized_named_tensors": [payload]}."""
    pairs = [(name, tensor.detach().cpu()) for name, tensor in named_tensors]
    return base64.b64encode(pickle.dumps(pairs, protocol=pickle.HIGHEST_PROTOCOL)).decode()


def _payload_bytes(payload) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if not isinstance(payload, str):
        raise _Refused(f"a payload must be base64 text, got {type(payload).__name__}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise _Refused(f"not valid base64 ({err})") from None


def _load(data: bytes, device: torch.device):
    with warnings.catch_warnings():  # TypedStorage's deprecation warning, once per tensor
        warnings.simplefilter("ignore", UserWarning)
        if data.startswith(ZIP_MAGIC):
            return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        return _TensorUnpickler(io.BytesIO(data), device).load()


def _named_tensors(obj, tp_rank: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    pairs = list(obj.items()) if isinstance(obj, dict) else obj
    if not isinstance(pairs, (list, tuple)):
        raise _Refused(f"expected a list of (name, tensor) pairs, got {type(obj).__name__}")
    named = []
    for index, pair in enumerate(pairs):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise _Refused(f"item {index} is not a (name, tensor) pair")
        name, tensor = pair
        if isinstance(tensor, _LocalSerializedTensor):
            tensor = tensor.tensor(tp_rank, device)
        if not isinstance(tensor, torch.Tensor):
            raise _Refused(f"{name}: expected a tensor, got {type(tensor).__name__}")
        named.append((name, tensor.detach()))
    return named


def _unflatten(obj) -> list[tuple[str, torch.Tensor]]:
    """SGLang's FlattenedTensorBucket.reconstruct_tensors, each entry checked against the flat tensor first."""
    if not (isinstance(obj, dict) and set(obj) == {"flattened_tensor", "metadata"}):
        raise _Refused("load_format='flattened_bucket': a payload must be a dict of flattened_tensor and metadata "
                       f"(SGLang's FlattenedTensorBucket), got {type(obj).__name__}")
    flat, metadata = obj["flattened_tensor"], obj["metadata"]
    if not (isinstance(flat, torch.Tensor) and flat.dim() == 1 and flat.dtype == torch.uint8):
        raise _Refused("flattened_tensor must be a one-dimensional uint8 tensor")
    if not (isinstance(metadata, list) and all(isinstance(m, _FlattenedMetadata) for m in metadata)):
        raise _Refused("metadata must be a list of FlattenedTensorMetadata")
    named = []
    for meta in metadata:
        name, shape, dtype, start, end, numel = (getattr(meta, key, None) for key in _FlattenedMetadata.FIELDS)
        if not (isinstance(name, str) and handles.ints(shape) and isinstance(dtype, torch.dtype)
                and all(handles.is_int(v) for v in (start, end, numel))):
            raise _Refused(f"metadata entry {name!r}: malformed name, shape, dtype or indices")
        nbytes = math.prod(shape) * torch._utils._element_size(dtype)
        if not (0 <= start <= end <= flat.numel() and end - start == numel == nbytes):
            raise _Refused(f"metadata entry {name}: bytes [{start}, {end}) of {flat.numel()} do not hold a "
                           f"{list(shape)} {dtype} tensor")
        named.append((name, flat[start:end].view(dtype).reshape(tuple(shape))))
    return named


# --- the restricted unpickler ------------------------------------------------------------------------------

def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """torch._utils._rebuild_tensor_v2 without hooks or metadata (attributes a weight does not need), for a view
    within its storage."""
    return handles.checked_view(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, torch.Tensor):
        raise _Refused("a parameter without a tensor")
    return data


def _load_storage(data):
    """torch.storage._load_from_bytes, but weights_only: the storage's bytes are torch.save output."""
    if not isinstance(data, bytes):
        raise _Refused("storage data must be bytes")
    storage = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if not isinstance(storage, torch.TypedStorage):
        raise _Refused("storage data that is not a storage")
    return storage


class _State:
    """A stand-in for an SGLang dataclass: the pickle may only set its fields (pickle's BUILD)."""

    FIELDS: tuple[str, ...] = ()

    def __setstate__(self, state):
        if not (isinstance(state, dict) and set(state) == set(self.FIELDS)):
            raise _Refused(f"{type(self).__name__[1:]} without exactly the fields {', '.join(self.FIELDS)}")
        self.__dict__.update(state)


class _LocalSerializedTensor(_State):
    """SGLang's LocalSerializedTensor: one serialized tensor per TP rank (raw pickle bytes, or base64)."""

    FIELDS = ("values",)

    def __setstate__(self, state):
        super().__setstate__(state)
        if not isinstance(self.values, list) or not all(isinstance(v, (bytes, str)) for v in self.values):
            raise _Refused("LocalSerializedTensor without a list of serialized values")

    def tensor(self, tp_rank: int, device: torch.device) -> torch.Tensor:
        values = getattr(self, "values", None)
        if values is None or tp_rank >= len(values):
            raise _Refused(f"LocalSerializedTensor has no value for tensor-parallel rank {tp_rank}")
        inner = _load(_payload_bytes(values[tp_rank]), device)
        if not isinstance(inner, torch.Tensor):
            raise _Refused(f"LocalSerializedTensor value is a {type(inner).__name__}, not a tensor")
        return inner


class _FlattenedMetadata(_State):
    """SGLang's FlattenedTensorMetadata (sglang/srt/weight_sync/tensor_bucket.py)."""

    FIELDS = ("name", "shape", "dtype", "start_idx", "end_idx", "numel")


ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): OrderedDict,  # a tensor's (empty) backward hooks
    ("torch", "Size"): torch.Size,
    FLATTENED_METADATA: _FlattenedMetadata,
    **{key: _LocalSerializedTensor for key in LOCAL_SERIALIZED},
}


class _TensorUnpickler(pickle.Unpickler):
    """Knows the globals of a tensor's pickle (its data, or a handle `tensor_handles` can open) and nothing
    else; `device`: the engine's, which decides whether CUDA / NPU IPC handles may be opened."""

    def __init__(self, file, device: torch.device):
        super().__init__(file)
        self.device = device

    def find_class(self, module: str, name: str):
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        handle = handles.find(module, name, self.device)
        if handle is not None:
            return handle
        raise _Refused(f"the pickle names {module}.{name}, which is not part of a tensor")

    def persistent_load(self, pid):
        raise _Refused("the pickle uses persistent ids (not a tensor pickle)")
