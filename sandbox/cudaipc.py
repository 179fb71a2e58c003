"""A CUDA buffer shared between two processes through the driver's IPC handles.

The model worker allocates its logits buffer and exports it; the trusted scorer opens it
and reads the logits where they are, on the GPU. It goes this way round because opening
a handle needs ptrace-level access to the exporting process: the scorer has it over the
confined worker, the worker (rightly) has none over the scorer. The handle is 64 opaque
bytes and an offset, sent over the fixed-format control channel; no shared-memory file
and no pickle is involved.
"""

from __future__ import annotations

import ctypes
from typing import Any

HANDLE_BYTES = 64
CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1


class CudaIpcError(Exception):
    """The driver refused to export or open a buffer."""


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * HANDLE_BYTES)]


_driver: Any = None


def _cuda() -> Any:
    global _driver
    if _driver is None:
        _driver = ctypes.CDLL("libcuda.so.1")
    return _driver


# The driver's signatures (cuda.h): ctypes must know them to pass the handle by value.
_SIGNATURES = {
    "cuMemGetAddressRange": [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t),
                             ctypes.c_uint64],
    "cuIpcGetMemHandle": [ctypes.POINTER(_Handle), ctypes.c_uint64],
    "cuIpcOpenMemHandle": [ctypes.POINTER(ctypes.c_uint64), _Handle, ctypes.c_uint],
}  # fmt: skip


def _symbol(name: str) -> Any:
    driver = _cuda()
    for candidate in (f"{name}_v2", name):
        if hasattr(driver, candidate):
            function = getattr(driver, candidate)
            function.argtypes, function.restype = _SIGNATURES[name], ctypes.c_int
            return function
    raise CudaIpcError(f"the CUDA driver has no {name}")


def _check(code: int, what: str) -> None:
    if code != 0:
        raise CudaIpcError(f"{what} failed with CUDA driver error {code}")


def _range(pointer: int) -> tuple[int, int]:
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    _check(_symbol("cuMemGetAddressRange")(ctypes.byref(base), ctypes.byref(size),
                                           ctypes.c_uint64(pointer)), "cuMemGetAddressRange")  # fmt: skip
    return base.value, size.value


def export(tensor: Any) -> tuple[bytes, int]:
    """(handle, offset) of a CUDA tensor's memory, for open_buffer() in another process."""
    pointer = tensor.data_ptr()
    base, _ = _range(pointer)
    handle = _Handle()
    _check(_symbol("cuIpcGetMemHandle")(ctypes.byref(handle), ctypes.c_uint64(base)),
           "cuIpcGetMemHandle")  # fmt: skip
    return ctypes.string_at(ctypes.addressof(handle), HANDLE_BYTES), pointer - base


def open_buffer(handle: bytes, offset: int, shape: tuple[int, ...], torch: Any) -> Any:
    """A float32 tensor of `shape` over another process's exported buffer. The buffer must
    hold all of it: a handle to a smaller allocation is refused, not read past."""
    if len(handle) != HANDLE_BYTES or offset < 0:
        raise CudaIpcError("a malformed CUDA IPC handle")
    torch.zeros(1, device="cuda")  # the primary context, current on this thread
    raw = _Handle.from_buffer_copy(handle)  # (a field of c_char reads back as a copy)
    pointer = ctypes.c_uint64()
    _check(_symbol("cuIpcOpenMemHandle")(ctypes.byref(pointer), raw,
                                         ctypes.c_uint(CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)),
           "cuIpcOpenMemHandle")  # fmt: skip
    base, size = _range(pointer.value)
    needed = 4 * int(__import__("math").prod(shape))
    if offset + needed > base + size - pointer.value:
        raise CudaIpcError(f"the shared buffer holds {size} bytes, fewer than {offset + needed}")

    class View:
        __cuda_array_interface__ = {
            "shape": tuple(shape), "typestr": "<f4", "data": (pointer.value + offset, False),
            "version": 3, "strides": None,
        }  # fmt: skip

    return torch.as_tensor(View(), device="cuda")
