"""Pack tensors into, and unpack them out of, flat byte buckets.

Copies are done on raw integer views of the same element size (``uint8``/``int16``/``int32``/
``int64``), so every dtype, float8 and packed float4 included, moves bit for bit, NaN payloads
too, and no dtype needs a copy kernel of its own. Small tensors go through one multi-tensor
``torch._foreach_copy_`` launch (on CPU only when there are many; a few go through a loop);
large ones through plain ``copy_`` (a ``memmove`` between contiguous host tensors), which
reaches higher bandwidth than the multi-tensor kernel does for big contiguous blocks.
"""

from __future__ import annotations

import ctypes
import operator
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from refit.errors import PlanError
from refit.meta import TensorMeta, itemsize

_RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Above this many bytes a tensor is copied on its own (plain copy_ beats the foreach kernel).
LARGE_COPY_BYTES = 1 << 20
# On CPU, up to this many small tensors are copied in a loop of copy_: the multi-tensor kernel
# gained nothing there and sometimes stalled for 4-30 ms (OpenMP waits while the other core was
# busy, 2-core machine, torch 2.13); above it the per-call overhead of the loop dominates
# (10,000 0-d tensors: 4.6 ms foreach, 8.8 ms loop).
CPU_LOOP_MAX = 64


@dataclass(frozen=True)
class Lazy:
    """A tensor the sender writes straight into its bucket, saving the pack copy.

    ``fill(out)`` receives a view of shape ``shape`` and dtype ``dtype`` in the send buffer (on
    the transport's device) and must write the whole tensor into it, e.g. the output of an
    all-gather or a format conversion. Only ``shape`` and ``dtype`` are needed to plan.

    Example:
        >>> lazy = Lazy((4, 4), torch.bfloat16, lambda out: out.fill_(1))
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: Callable[[torch.Tensor], object]

    def __post_init__(self) -> None:
        try:
            if isinstance(self.shape, str | bytes) or any(isinstance(d, bool) for d in self.shape):
                raise TypeError
            shape = tuple(operator.index(d) for d in self.shape)
        except TypeError:
            shape = (-1,)
        if any(d < 0 for d in shape):
            raise PlanError(f"Lazy.shape must be a tuple of ints >= 0 (e.g. tensor.shape), got {self.shape!r:.80}")
        object.__setattr__(self, "shape", shape)
        if not callable(self.fill):
            raise PlanError(f"Lazy.fill must be callable, got {type(self.fill).__name__}")
        if not isinstance(self.dtype, torch.dtype):
            raise PlanError(f"Lazy.dtype must be a torch.dtype, got {self.dtype!r}")

    def materialize(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """A new tensor on ``device`` holding what ``fill`` writes, for where the value is needed outside a bucket (e.g. ``refit verify``)."""
        out = torch.empty(self.shape, dtype=self.dtype, device=device)
        self.fill(out)
        return out


_HOST_MEMORY = ctypes.c_char * sys.maxsize  # one buffer type for any host address range (never read whole)


def host_memory(address: int, nbytes: int, owner: object = None) -> memoryview:
    """``nbytes`` of host memory at ``address`` as a writable memoryview, without copying or
    reading it; ``owner`` is kept alive for as long as the view (or a slice of it) is."""
    arr = _HOST_MEMORY.from_address(address)
    arr._refit_owner = owner  # type: ignore[attr-defined]
    return memoryview(arr).cast("B")[:nbytes]


def host_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a writable memoryview: no copy, no numpy.

    The view keeps ``t`` alive for as long as anything (a queued ZMQ frame) holds it.
    """
    if t.device.type != "cpu" or not t.is_contiguous():
        raise PlanError(f"host_bytes needs a contiguous CPU tensor, got {t.device} contiguous={t.is_contiguous()}")
    n = t.numel() * t.element_size()
    return host_memory(t.data_ptr(), n, owner=t) if n else memoryview(bytearray())


def raw(t: torch.Tensor) -> torch.Tensor:
    """Integer view of ``t`` with the same element size (keeps shape and strides)."""
    return t.view(_RAW[t.element_size()])


def bucket_view(bucket: torch.Tensor, meta: TensorMeta) -> torch.Tensor:
    """Typed view of ``meta``'s bytes in ``bucket`` (a 1-D ``uint8`` tensor).

    A whole tensor comes back with its dtype and shape (``()`` for 0-d); a chunk of a larger
    tensor comes back flat (1-D) in the tensor's dtype, covering elements
    ``meta.start // itemsize`` onwards.
    """
    region = bucket[meta.offset : meta.offset + meta.nbytes]
    if meta.is_chunked:
        return region.view(meta.dtype)
    return region.view(meta.dtype).view(meta.shape)


def unpack(bucket: torch.Tensor, metas: Sequence[TensorMeta]) -> list[torch.Tensor]:
    """Views of every meta's tensor in ``bucket``.

    The returned tensors are *views* of the bucket, not copies: they are overwritten when the
    bucket is reused for the next one. Copy what you want to keep.
    """
    return [bucket_view(bucket, m) for m in metas]


def chunk_of(t: torch.Tensor, meta: TensorMeta) -> torch.Tensor:
    """The flat slice of ``t`` that ``meta`` (a chunk) carries."""
    size = itemsize(meta.dtype)
    first = meta.start // size
    return t.reshape(-1)[first : first + meta.nbytes // size]


class CopyPlan:
    """Bit-exact copies ``srcs[i] -> dsts[i]`` (same shapes, same element sizes), grouped once.

    Large tensors get one ``copy_`` each (a ``memmove`` when both are contiguous host tensors:
    one thread, no OpenMP, 0.10-0.15 s per GB against 0.17-0.29 s for ``copy_`` on the 2-core
    CPU box, where a busy second core stalls OpenMP); the rest one ``_foreach_copy_`` per device
    pair (on CPU a loop of ``copy_`` for up to ``CPU_LOOP_MAX`` of them). A
    plan over persistent buffers can be built once and run for every push.
    """

    def __init__(self, dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> None:
        self.large: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.host: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # large contiguous host-to-host copies: memmove
        self.small: dict[tuple[torch.device, torch.device], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for d, s in zip(dsts, srcs, strict=True):
            if d.numel() == 0:
                continue
            if d.numel() != s.numel() or d.element_size() != s.element_size():
                raise PlanError(f"cannot copy {s.dtype}{list(s.shape)} into {d.dtype}{list(d.shape)}: sizes differ (was a tensor changed in place?)")
            rd, rs = raw(d), raw(s)
            nbytes = d.numel() * d.element_size()
            if nbytes >= LARGE_COPY_BYTES and d.device.type == s.device.type == "cpu" and d.is_contiguous() and s.is_contiguous():
                self.host.append((d, s, nbytes))
            elif nbytes >= LARGE_COPY_BYTES or rd.shape != rs.shape:
                self.large.append((rd, rs.reshape(rd.shape)))
            else:
                pair = self.small.setdefault((d.device, s.device), ([], []))
                pair[0].append(rd)
                pair[1].append(rs)

    def run(self, non_blocking: bool = False) -> None:
        """Do every copy of the plan.

        Args:
            non_blocking: passed to ``copy_`` (device/pinned-host copies are then only queued on the current stream).
        """
        for d, s, nbytes in self.host:
            ctypes.memmove(d.data_ptr(), s.data_ptr(), nbytes)
        for d, s in self.large:
            d.copy_(s, non_blocking=non_blocking)
        for (dev_d, dev_s), (ds, ss) in self.small.items():
            if dev_d == dev_s and (dev_d.type != "cpu" or len(ds) > CPU_LOOP_MAX):
                torch._foreach_copy_(ds, ss)
            else:
                for d, s in zip(ds, ss, strict=True):
                    d.copy_(s, non_blocking=non_blocking)


def copy_many(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], non_blocking: bool = False) -> None:
    """Copy ``srcs[i]`` into ``dsts[i]`` bit for bit (see :class:`CopyPlan`)."""
    CopyPlan(dsts, srcs).run(non_blocking)


def pack(
    bucket: torch.Tensor,
    metas: Sequence[TensorMeta],
    sources: Sequence[torch.Tensor | Lazy],
    non_blocking: bool = False,
) -> None:
    """Write ``sources[i]`` (the whole tensor of ``metas[i]``) into ``bucket``.

    For a chunk, ``sources[i]`` is the whole tensor and only the chunk's slice is copied. A
    :class:`Lazy` source of an unchunked meta is filled directly into its bucket view; a
    chunked Lazy must be materialized by the caller first (see ``Sender``).
    """
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    for meta, src in zip(metas, sources, strict=True):
        view = bucket_view(bucket, meta)
        if isinstance(src, Lazy):
            if meta.is_chunked:
                raise PlanError(f"{meta.name}: a chunked Lazy tensor must be materialized before packing")
            try:
                src.fill(view)
            except BaseException as exc:
                exc.add_note(f"refit: raised by the Lazy producer of {meta.name!r} (bucket {meta.bucket}); the push was abandoned")
                raise
            continue
        dsts.append(view)
        srcs.append(chunk_of(src, meta) if meta.is_chunked else src)
    copy_many(dsts, srcs, non_blocking=non_blocking)
