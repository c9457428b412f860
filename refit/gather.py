"""Reading the values of many separately allocated 0-d tensors in one operation.

A trainer's scales are usually separate allocations (one buffer per quantizer), so reading
10,000 of them through ``torch.stack`` costs a tensor object per scale, about 1-2 ms per push
on a CPU. :class:`Gather` instead views the whole address range that holds them as one
tensor of integers of the scales' size (a *window*: nothing is allocated, copied or read
when it is made) and reads the scales with one ``index_select`` at their offsets in it, in
about 10 us. Only the indexed elements are ever read.

The caller guarantees, at every read, that each address is the data pointer of a live 0-d
tensor of the gather's dtype, type and bits, so that the raw memory read is its value:
:mod:`refit.collect` compares every scale's data pointer and signature (``signature.py``: type,
dtype, device, negative / conjugate / zero-tensor bits, shape, strides) with those the gather
was made for, every push. Where no window can be made, or the raw memory is not the value (a
tensor with torch's negative bit, a tensor with no memory), the tensors are stacked instead:
same values, slower.
"""

from __future__ import annotations

import torch

from refit.meta import itemsize
from refit.pack import host_memory

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # any dtype's bits, by size
_LOWEST = 1 << 16  # no tensor's memory starts below this (a null pointer plus an offset does)
_IS_NEG = torch.Tensor.is_neg


class _DeviceRange:
    """A CUDA address range in the form ``torch.as_tensor`` accepts (CUDA array interface)."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"data": (address, False), "shape": (nbytes,), "typestr": "|u1", "version": 2}


def _window(address: int, nbytes: int, device: torch.device) -> torch.Tensor | None:
    """``nbytes`` of memory at ``address`` on ``device`` as a uint8 tensor, without copying."""
    try:
        if device.type == "cpu":
            return torch.frombuffer(host_memory(address, nbytes), dtype=torch.uint8)
        if device.type == "cuda":
            window = torch.as_tensor(_DeviceRange(address, nbytes))
            return window if window.device == device else None
    except (RuntimeError, ValueError, TypeError, OverflowError):
        pass
    return None


class Gather:
    """Reads the current values of a list of 0-d tensors of one dtype and device.

    Args:
        values: the tensors (0-d, one dtype, one device).
        pointers: their data pointers.
        hold: keep a 1-d view of each tensor, which keeps its memory allocated even if the
            tensor is given other memory (``.data = ...``) or dropped. Without it nothing is
            kept (for new tensors every push, whose memory the trainer owns).
    """

    def __init__(self, values: list[torch.Tensor], pointers: list[int], *, hold: bool = True) -> None:
        self.dtype, device = values[0].dtype, values[0].device
        self.held = [v.detach().view(1) for v in values] if hold else None
        self._window: torch.Tensor | None = None
        self._index: torch.Tensor | None = None
        size, address = itemsize(self.dtype), min(pointers)
        if address < _LOWEST or address % size or any(map(_IS_NEG, values)):
            return
        offsets = torch.tensor(pointers, dtype=torch.int64) - address
        if bool((offsets % size).any()):
            return
        window = _window(address, int(offsets.max()) + size, device)
        if window is not None:
            self._window, self._index = window.view(_BITS[size]), (offsets // size).to(device)

    @property
    def windowed(self) -> bool:
        """True if the values are read through a window (else stacked)."""
        return self._window is not None

    def __call__(self, values: list[torch.Tensor]) -> torch.Tensor:
        """The values now of ``values`` (the tensors the gather was made for, or tensors of the
        same signature at the same addresses), as a new 1-D tensor."""
        if self._window is not None:
            return self._window.index_select(0, self._index).view(self.dtype)  # type: ignore[arg-type]
        with torch.inference_mode():  # only read: the cheapest mode
            return torch.stack(self.held if self.held is not None else values).view(len(values))
