"""The CUDA runtime as refit's shared-buffer transports use it: one checked call, raw device
memory as a torch tensor, and the identities (GPU UUID, host) that decide whether two processes
can share buffers."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from refit.errors import TransportError

T = TypeVar("T")


_HINTS = {
    2: " (out of device memory: lower bucket_bytes or num_buffers)",
    201: " (invalid context: a CUDA IPC handle cannot be opened by the process that exported it)",
    400: " (invalid handle: the sender freed or re-allocated its buckets; push again)",
    205: " (map failed: the handle is already open in this process, or the GPUs differ)",
}


def runtime() -> Any:
    """``cupy.cuda.runtime`` (CuPy is needed for CUDA buffers)."""
    try:
        import cupy.cuda.runtime as rt
    except ImportError as exc:
        raise TransportError(f"cuda_ipc on GPUs needs CuPy: pip install cupy-cuda12x (or cupy-cuda13x for CUDA 13): {exc}") from exc
    return rt


def cuda_call(what: str, fn: Callable[..., T], *args: Any) -> T:
    """Run one CUDA runtime call (a ``cupy.cuda.runtime`` function); its failure raises here.

    Raises:
        TransportError: naming the call and the CUDA status, with a hint where one helps.
    """
    rt = runtime()
    try:
        return fn(*args)
    except rt.CUDARuntimeError as exc:
        status = getattr(exc, "status", None)
        hint = _HINTS.get(status, "") if isinstance(status, int) else ""
        raise TransportError(f"CUDA {what} failed: {exc}{hint}") from None


class _DeviceMemory:
    """Presents ``nbytes`` of raw device memory at ``ptr`` to ``torch.as_tensor``.

    Version 2 of the interface carries no stream: torch does not synchronize on import, and the
    transport orders work itself.
    """

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 2, "strides": None}


def device_tensor(ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A 1-D uint8 tensor over raw device memory (valid only while that memory is)."""
    return torch.as_tensor(_DeviceMemory(ptr, nbytes), device=device)


def gpu_uuid(device: torch.device) -> str:
    """The UUID of ``device``'s physical GPU (the same whatever CUDA_VISIBLE_DEVICES says)."""
    return str(torch.cuda.get_device_properties(device).uuid)


def host_id() -> str:
    """Identity of this host for the shared-memory path (boot id where Linux has one)."""
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()
    return socket.gethostname()


def cuda_index(device: torch.device) -> int:
    """The index of CUDA ``device`` (the current device when it has none)."""
    return device.index if device.index is not None else torch.cuda.current_device()
