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

ForkingPickler uses torch.multiprocessing's reductions, so such a tensor travels as a handle to memory, not
as its data: a CUDA IPC handle (SGLang patches the reduction to carry the device UUID); for a CPU tensor, a
file descriptor fetched from the sender's multiprocessing resource sharer (sharing strategy
"file_descriptor", Linux's default), which only a process holding the sender's authkey (one it started with
multiprocessing) can fetch; or, with strategy "file_system", the name of a shared-memory segment and of
torch's shm-manager socket. None of these is accepted here: they name memory and sockets outside the body,
and a wrong declared size crashes the reader (SIGBUS), so a request could read or crash what it names.

Accepted: payloads that carry the tensors' data. Either a plain pickle (`pickle.dumps`, or the inner values
of LocalSerializedTensor written that way) of the (name, tensor) pairs, read by a restricted unpickler that
knows only the globals a tensor's pickle uses, each checked, with the storage bytes read by torch's
weights_only loader; or `torch.save` output of the list (or of a name → tensor dict), read by
`torch.load(weights_only=True)`. A restricted unpickler and not weights_only alone, because a plain tensor
pickle stores its data through `torch.storage._load_from_bytes`, which calls torch.load with
weights_only=False: we substitute a weights_only reader for exactly that global. Everything else (another
global, a persistent id, a handle) is refused with a ValueError naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import pickle
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

FIELD = "serialized_named_tensors"
# The native engine copies named tensors by parameter name: SGLang's None (model.load_weights) and "direct".
# "flattened_bucket" and custom loaders need SGLang's classes and code.
TENSOR_LOAD_FORMATS = (None, "direct")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format
# Modules whose globals make a tensor a handle to memory elsewhere (see the module docstring).
HANDLE_MODULES = ("torch.multiprocessing.reductions", "multiprocessing.resource_sharer", "multiprocessing.reduction",
                  "sglang.srt.utils.patch_torch")
LOCAL_SERIALIZED = {("sglang.srt.model_executor.model_runner", "LocalSerializedTensor"),
                    ("sglang.srt.model_executor.model_runner_components.weight_updater", "LocalSerializedTensor")}


@dataclass(frozen=True)
class TensorUpdate:
    """A decoded body: the arguments of `NativeEngine.update_weights_from_tensor` and what the route does
    around it (abort running requests first; label the new weights)."""

    named_tensors: list[tuple[str, torch.Tensor]]
    load_format: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None


def decode_update_weights_from_tensor(body, tp_rank: int = 0) -> TensorUpdate:
    """SGLang's /update_weights_from_tensor body → named CPU tensors (this engine is one rank: entry 0).
    Raises ValueError naming the field for anything malformed or not plain tensor data."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    load_format = body.get("load_format")
    if load_format not in TENSOR_LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r}: this engine loads named tensors directly (null or "
                         f"'direct'), not SGLang's flattened buckets or custom loaders")
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
    return TensorUpdate(decode_named_tensors(payloads[tp_rank], tp_rank), load_format, flags["flush_cache"],
                        flags["abort_all_requests"], version)


def decode_named_tensors(payload: str | bytes, tp_rank: int = 0) -> list[tuple[str, torch.Tensor]]:
    """One payload (base64 text, or the raw bytes an in-process caller hands over) → (name, tensor) pairs."""
    try:
        return _named_tensors(_load(_payload_bytes(payload)), tp_rank)
    except _Refused as err:
        raise ValueError(f"{FIELD}: {err}") from None
    except Exception as err:  # noqa: BLE001 - whatever a hostile or broken payload raises is the request's fault
        raise ValueError(f"{FIELD}: not a readable payload ({type(err).__name__}: {err})") from None


def encode_named_tensors(named_tensors) -> str:
    """The sending side for this engine: one payload carrying the tensors' data (host copies), which
    `decode_named_tensors` reads. Send it as {"serialized_named_tensors": [payload]}."""
    pairs = [(name, tensor.detach().cpu()) for name, tensor in named_tensors]
    return base64.b64encode(pickle.dumps(pairs, protocol=pickle.HIGHEST_PROTOCOL)).decode()


class _Refused(Exception):
    """Why a payload is not accepted (reported under the field's name)."""


def _payload_bytes(payload) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if not isinstance(payload, str):
        raise _Refused(f"a payload must be base64 text, got {type(payload).__name__}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise _Refused(f"not valid base64 ({err})") from None


def _load(data: bytes):
    with warnings.catch_warnings():  # TypedStorage's deprecation warning, once per tensor
        warnings.simplefilter("ignore", UserWarning)
        if data.startswith(ZIP_MAGIC):
            return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        return _PlainTensorUnpickler(io.BytesIO(data)).load()


def _named_tensors(obj, tp_rank: int) -> list[tuple[str, torch.Tensor]]:
    pairs = list(obj.items()) if isinstance(obj, dict) else obj
    if not isinstance(pairs, (list, tuple)):
        raise _Refused(f"expected a list of (name, tensor) pairs, got {type(obj).__name__}")
    named = []
    for index, pair in enumerate(pairs):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise _Refused(f"item {index} is not a (name, tensor) pair")
        name, tensor = pair
        if isinstance(tensor, _LocalSerializedTensor):
            tensor = tensor.tensor(tp_rank)
        if not isinstance(tensor, torch.Tensor):
            raise _Refused(f"{name}: expected a tensor, got {type(tensor).__name__}")
        named.append((name, tensor.detach()))
    return named


# --- the restricted unpickler ------------------------------------------------------------------------------

def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """torch._utils._rebuild_tensor_v2 without hooks or metadata (attributes a weight does not need), for a view
    within its storage: Tensor.set_ would grow a storage too small for the view, with uninitialized memory."""
    if not isinstance(storage, torch.TypedStorage):
        raise _Refused("a tensor whose storage is not inline data")
    if not (_is_int(storage_offset) and _ints(size) and _ints(stride) and len(size) == len(stride)):
        raise _Refused("a tensor with a malformed offset, size or stride")
    if storage_offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise _Refused("a tensor with a negative offset, size or stride")
    if 0 not in size and storage_offset + sum((n - 1) * step for n, step in zip(size, stride)) >= storage.size():
        raise _Refused(f"a tensor view of size {tuple(size)} past the end of its {storage.size()}-element storage")
    return torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride))


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


class _LocalSerializedTensor:
    """Stand-in for SGLang's LocalSerializedTensor: one serialized tensor per TP rank (raw pickle bytes)."""

    def __setstate__(self, state):
        values = state.get("values") if isinstance(state, dict) else None
        if not isinstance(values, list) or not all(isinstance(v, (bytes, str)) for v in values):
            raise _Refused("LocalSerializedTensor without a list of serialized values")
        self.values = values

    def tensor(self, tp_rank: int) -> torch.Tensor:
        values = getattr(self, "values", None)
        if values is None or tp_rank >= len(values):
            raise _Refused(f"LocalSerializedTensor has no value for tensor-parallel rank {tp_rank}")
        inner = _load(_payload_bytes(values[tp_rank]))
        if not isinstance(inner, torch.Tensor):
            raise _Refused(f"LocalSerializedTensor value is a {type(inner).__name__}, not a tensor")
        return inner


ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): OrderedDict,  # a tensor's (empty) backward hooks
    ("torch", "Size"): torch.Size,
}


class _PlainTensorUnpickler(pickle.Unpickler):
    """Knows the globals of a plain tensor pickle and nothing else."""

    def find_class(self, module: str, name: str):
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in LOCAL_SERIALIZED:
            return _LocalSerializedTensor
        if module.startswith(HANDLE_MODULES):
            raise _Refused(f"tensors sent as memory handles ({module}.{name}: CUDA IPC, file descriptors or "
                           f"shared memory, as ForkingPickler writes them) are not accepted: send the tensors' "
                           f"data (a plain pickle or torch.save of the (name, tensor) pairs)")
        raise _Refused(f"the pickle names {module}.{name}, which is not part of a tensor")

    def persistent_load(self, pid):
        raise _Refused("the pickle uses persistent ids (not a plain tensor pickle)")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints(values) -> bool:
    return isinstance(values, (tuple, list, torch.Size)) and all(_is_int(v) for v in values)
