"""The memory handles in what SGLang's MultiprocessingSerializer sends (a ForkingPickler pickle), rebuilt only
after every field is checked: the globals torch.multiprocessing's reductions write are answered here with
checking wrappers, never with torch's functions or classes themselves.

How a tensor travels under ForkingPickler (torch.multiprocessing.reductions):

- CPU, sharing strategy "file_system": `rebuild_tensor(cls, rebuild_typed_storage(rebuild_storage_filename(
  UntypedStorage, manager_socket, shm_name, nbytes), dtype), (offset, size, stride, requires_grad))`. The
  segment is a file in /dev/shm that any process of the sender's user can open by name. Read here: the name
  must be torch's (`/torch_<pid>_<n>[_<n>]`), the segment a regular file of this server's user, at least as
  large as declared (a mapping past the end of the file is a SIGBUS, not an exception), and the manager
  socket one of torch's shm managers of this user (torch registers the mapping there).
- CPU, strategy "file_descriptor" (Linux's default): `rebuild_storage_fd(cls, DupFd, size)`: the descriptor
  is fetched from the sender's resource sharer with the sender's multiprocessing authkey, which only its own
  child processes hold. Refused, saying how to send instead.
- CUDA: `rebuild_cuda_tensor(...)` with a CUDA IPC handle; SGLang's `monkey_patch_torch_reductions` renames it
  `sglang.srt.utils.patch_torch._rebuild_cuda_tensor_modified` and sends the device's UUID for its index.
  Opened only by a server on CUDA.
- NPU: torch_npu (7.2+) registers `torch_npu.multiprocessing.reductions.rebuild_npu_tensor`, same arguments
  (SGLang patches the receiving side only, `_rebuild_npu_tensor_modified`). Opened only by a server on NPU.

The checks cannot make a handle safe against its own sender (it can unmap or rewrite its memory); they stop a
request from naming memory, files or sockets that are not a live tensor of this user, and from declaring a
view larger than what it names. A handle is only meaningful on this host.
"""

from __future__ import annotations

import os
import re
import stat

import torch

SHM_DIR = "/dev/shm"  # where Linux's shm_open keeps segments
SHM_NAME = re.compile(r"/torch_[0-9]+_[0-9]+(_[0-9]+)?")  # torch's NewProcessWideShmHandle
SHM_HEADER = 64  # torch's RefcountedMapAllocator keeps its refcount before the data (map_alloc_alignment)
MANAGER_DIR = re.compile(r"torch-shm-dir-[A-Za-z0-9_]+")  # torch_shm_manager's: <tmp>/torch-shm-dir-XXXXXX/manager.sock
IPC_ARGS = 15  # rebuild_cuda_tensor's and rebuild_npu_tensor's arguments
REF_COUNTERS = 10000  # torch's CUDA_IPC_REF_COUNTER_FILE_SIZE: int64 counters per refcount segment, all mapped
FILE_SYSTEM_HINT = ('call torch.multiprocessing.set_sharing_strategy("file_system") in the sender before '
                    'serializing, or send the tensors\' data (tensor_transfer.encode_named_tensors)')


class Refused(Exception):
    """Why a payload is not accepted (reported under the field's name)."""


class ClassRef:
    """A class the pickle names as an argument (a tensor's or storage's type): a token the wrappers read,
    not the class, so the pickle cannot call it (torch.Tensor(n) or UntypedStorage(n) would allocate n)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


TENSOR, PARAMETER = ClassRef("torch.Tensor"), ClassRef("torch.nn.Parameter")
UNTYPED, TYPED = ClassRef("torch.UntypedStorage"), ClassRef("torch.TypedStorage")
CLASSES = {("torch", "Tensor"): TENSOR, ("torch.nn.parameter", "Parameter"): PARAMETER,
           ("torch.storage", "UntypedStorage"): UNTYPED, ("torch.storage", "TypedStorage"): TYPED}
STORAGE_TYPES = {UNTYPED: torch.UntypedStorage, TYPED: torch.TypedStorage}

REDUCTIONS = "torch.multiprocessing.reductions"
SGLANG_PATCH = "sglang.srt.utils.patch_torch"
CUDA_IPC = {(REDUCTIONS, "rebuild_cuda_tensor"), (SGLANG_PATCH, "_rebuild_cuda_tensor_modified")}
NPU_IPC = {("torch_npu.multiprocessing.reductions", "rebuild_npu_tensor"),
           (SGLANG_PATCH, "_rebuild_npu_tensor_modified")}
FILE_DESCRIPTOR = {(REDUCTIONS, "rebuild_storage_fd"), ("multiprocessing.resource_sharer", "DupFd"),
                   ("multiprocessing.reduction", "DupFd")}


def find(module: str, name: str, device: torch.device):
    """The stand-in for a global of a handle pickle; None: not one of them. Raises Refused for handles this
    server, on `device`, cannot open."""
    key = (module, name)
    if key in CLASSES:
        return CLASSES[key]
    if key in HOST_REBUILDS:
        return HOST_REBUILDS[key]
    if key in FILE_DESCRIPTOR:
        raise Refused("tensors sent as memory handles under torch.multiprocessing's default \"file_descriptor\" "
                      f"sharing strategy ({module}.{name}) can only be opened by the sender's own child "
                      f"processes: {FILE_SYSTEM_HINT}")
    for kind, names in (("cuda", CUDA_IPC), ("npu", NPU_IPC)):
        if key in names:
            if device.type != kind:
                raise Refused(f"the payload holds {kind.upper()} IPC handles ({module}.{name}) and this server "
                              f"runs on {device.type}: send CPU tensors shared under the file_system strategy "
                              f"or the tensors' data (tensor_transfer.encode_named_tensors)")
            return lambda *args: _device_tensor(kind, args, device)
    return None


# --- CPU shared memory ------------------------------------------------------------------------------------

def _rebuild_tensor(cls, storage, metadata):
    """reductions.rebuild_tensor: a plain tensor (a Parameter's requires_grad is of no use to a weight)."""
    if cls not in (TENSOR, PARAMETER):
        raise Refused(f"a shared tensor of type {cls!r}")
    if not (isinstance(metadata, tuple) and len(metadata) == 4):
        raise Refused("a shared tensor without (offset, size, stride, requires_grad)")
    offset, size, stride, _ = metadata
    return checked_view(storage, offset, size, stride)


def _rebuild_typed_storage(storage, dtype):
    if not isinstance(storage, torch.UntypedStorage) or not isinstance(dtype, torch.dtype):
        raise Refused("a typed storage without an untyped storage and a dtype")
    return torch.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)


def _rebuild_storage_empty(cls):
    if cls is not UNTYPED:
        raise Refused(f"an empty storage of type {cls!r}")
    return torch.UntypedStorage()


def _rebuild_storage_filename(cls, manager, handle, size, dtype=None):
    """reductions.rebuild_storage_filename, after checking the segment and its manager."""
    from torch.multiprocessing import reductions

    if cls is not (UNTYPED if dtype is None else TYPED) or (dtype is not None and not isinstance(dtype, torch.dtype)):
        raise Refused(f"a shared-memory storage of type {cls!r} with dtype {dtype!r}")
    if not is_int(size) or size < 0:
        raise Refused("a shared-memory storage without a size")
    nbytes = size if dtype is None else size * torch._utils._element_size(dtype)
    check_segment(handle, SHM_HEADER + nbytes)
    check_manager(manager)
    return reductions.rebuild_storage_filename(STORAGE_TYPES[cls], manager, handle, size, dtype)


def check_segment(handle, min_bytes: int) -> None:
    """`handle` names a shared-memory segment of torch's, of this user, of at least `min_bytes` bytes."""
    name = os.fsdecode(handle) if isinstance(handle, bytes) else None
    if name is None or not SHM_NAME.fullmatch(name):
        raise Refused(f"shared memory {handle!r} is not the name of a torch segment (/torch_<pid>_<n>_<n>)")
    try:
        info = os.lstat(SHM_DIR + name)
    except OSError:
        raise Refused(f"shared memory {name} does not exist on this host (is the sender on another host, or "
                      f"did it free the tensor before the answer?)") from None
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        raise Refused(f"shared memory {name} is not a segment of this server's user")
    if info.st_size < min_bytes:
        raise Refused(f"shared memory {name} has {info.st_size} bytes, the payload declares {min_bytes}")


def check_manager(manager) -> None:
    """`manager` is the socket of one of torch's shm managers run by this user (torch connects to it)."""
    path = os.fsdecode(manager) if isinstance(manager, bytes) else ""
    head, tail = os.path.split(path)
    if not (os.path.isabs(path) and tail == "manager.sock" and MANAGER_DIR.fullmatch(os.path.basename(head))):
        raise Refused(f"{manager!r} is not the socket of torch's shm manager (<tmp>/torch-shm-dir-*/manager.sock)")
    try:
        info = os.lstat(path)
    except OSError:
        raise Refused(f"torch's shm manager {path} does not exist on this host") from None
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.geteuid():
        raise Refused(f"{path} is not a socket of this server's user")


HOST_REBUILDS = {
    (REDUCTIONS, "rebuild_tensor"): _rebuild_tensor,
    (REDUCTIONS, "rebuild_typed_storage"): _rebuild_typed_storage,
    (REDUCTIONS, "rebuild_storage_filename"): _rebuild_storage_filename,
    (REDUCTIONS, "rebuild_storage_empty"): _rebuild_storage_empty,
}


# --- device IPC -------------------------------------------------------------------------------------------

def _device_tensor(kind: str, args: tuple, own: torch.device) -> torch.Tensor:
    """rebuild_cuda_tensor / rebuild_npu_tensor after checking each argument (the same 15 for both)."""
    if len(args) != IPC_ARGS:
        raise Refused(f"a {kind.upper()} IPC handle with {len(args)} arguments, not {IPC_ARGS}")
    (tensor_cls, size, stride, offset, storage_cls, dtype, device, handle, storage_bytes, storage_offset_bytes,
     requires_grad, ref_counter_handle, ref_counter_offset, event_handle, event_sync) = args
    if tensor_cls not in (TENSOR, PARAMETER) or storage_cls not in STORAGE_TYPES:
        raise Refused(f"a {kind.upper()} IPC handle of type {tensor_cls!r} over {storage_cls!r}")
    if not isinstance(dtype, torch.dtype):
        raise Refused(f"a {kind.upper()} IPC handle without a dtype")
    if not (isinstance(handle, bytes) or handle is None) or not (isinstance(event_handle, bytes) or
                                                                 event_handle is None):
        raise Refused(f"a {kind.upper()} IPC handle whose memory or event handle is not bytes")
    if not (is_int(storage_bytes) and is_int(storage_offset_bytes) and is_int(ref_counter_offset)
            and min(storage_bytes, storage_offset_bytes, ref_counter_offset) >= 0):
        raise Refused(f"a {kind.upper()} IPC handle with a malformed size or offset")
    if not (isinstance(requires_grad, bool) and isinstance(event_sync, bool)):
        raise Refused(f"a {kind.upper()} IPC handle with malformed flags")
    elements = storage_bytes // torch._utils._element_size(dtype)
    check_view_bounds(elements, offset, size, stride)
    if handle is not None and storage_bytes:  # torch maps the sender's refcount segment and writes one counter
        if ref_counter_offset >= REF_COUNTERS:
            raise Refused(f"a {kind.upper()} IPC handle with refcount slot {ref_counter_offset} of {REF_COUNTERS}")
        check_segment(ref_counter_handle, SHM_HEADER + 8 * (ref_counter_offset + 1))
    rebuild = _device_rebuild(kind)
    tensor = rebuild(torch.Tensor, tuple(size), tuple(stride), offset, STORAGE_TYPES[storage_cls], dtype,
                     _device_index(kind, device, own), handle, storage_bytes, storage_offset_bytes, False,
                     ref_counter_handle, ref_counter_offset, event_handle, event_sync)
    return tensor.detach()


def _device_rebuild(kind: str):
    if kind == "npu":
        from torch_npu.multiprocessing import reductions as npu_reductions

        return getattr(npu_reductions, "_rebuild_npu_tensor_original", npu_reductions.rebuild_npu_tensor)
    from torch.multiprocessing import reductions

    return getattr(reductions, "_rebuild_cuda_tensor_original", reductions.rebuild_cuda_tensor)


def _device_index(kind: str, device, own: torch.device) -> int:
    """The device to open the handle on. CUDA: the sender's, an index or (SGLang's patch) the GPU's UUID, which
    survives CUDA_VISIBLE_DEVICES. NPU: this server's own, as SGLang's NPU patch does (torch_npu maps a handle
    onto the device it is opened on; the sender's index may number the devices differently)."""
    module = getattr(torch, kind)
    count = module.device_count()
    if kind == "npu" and is_int(device):
        return own.index if own.index is not None else module.current_device()
    if is_int(device) and 0 <= device < count:
        return device
    if kind == "cuda" and isinstance(device, str):
        for index in range(count):
            if str(torch.cuda.get_device_properties(index).uuid) == device:
                return index
        raise Refused(f"CUDA device {device!r} is not a GPU this server sees: the sender must be on this host")
    raise Refused(f"{kind.upper()} device {device!r}: this server sees {count} device(s)")


# --- shared checks ----------------------------------------------------------------------------------------

def checked_view(storage, offset, size, stride) -> torch.Tensor:
    """torch._utils._rebuild_tensor for a view that lies within its storage: Tensor.set_ would grow a storage
    too small for the view (uninitialized memory), and a view past a shared segment's end reads unmapped
    memory."""
    if not isinstance(storage, torch.TypedStorage):
        raise Refused("a tensor whose storage is not inline data or a shared storage")
    check_view_bounds(storage.size(), offset, size, stride)
    return torch._utils._rebuild_tensor(storage, offset, tuple(size), tuple(stride))


def check_view_bounds(elements: int, offset, size, stride) -> None:
    if not (is_int(offset) and ints(size) and ints(stride) and len(size) == len(stride)):
        raise Refused("a tensor with a malformed offset, size or stride")
    if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise Refused("a tensor with a negative offset, size or stride")
    if 0 not in size and offset + sum((n - 1) * step for n, step in zip(size, stride)) >= elements:
        raise Refused(f"a tensor view of size {tuple(size)} past the end of its {elements}-element storage")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def ints(values) -> bool:
    return isinstance(values, (tuple, list, torch.Size)) and all(is_int(v) for v in values)
