"""Which elements of a pushed tensor vLLM's weight loaders read: the exact-shape check.

Why: many vLLM loaders *narrow* the tensor they are given to the size of the parameter (or of
this rank's shard) and copy that, so an oversized tensor (``up_proj.weight`` [300, 128] for a
[256, 128] slot, a column-oversized ``down_proj``) loads its first rows without any error, and
under tensor parallelism a rank only sees its own shard. Reaching a loader proves the name; it
does not prove the shape. So the resolver's probe records, for every ``copy_`` a loader makes,
which region of the probe input it reads (the probe input is a contiguous meta tensor, so a
region is a strided view of it: storage offset, sizes, strides). Over the loader calls of every
tensor-parallel rank, the regions must cover every element pushed.

Rejected: comparing element counts written (a fused target hides which rows were read) and
per-layer tables of expected shapes (they drift with every vLLM release). A source that is not
a view of the probe input (a loader that copies or converts first) cannot be traced; such reads
mark the probe ``untraced`` and the loader's own checks are all that applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MAX_RUNS = 1 << 22  # bound on the contiguous runs enumerated per read (a safety valve, not a limit hit in practice)


@dataclass(frozen=True)
class Region:
    """A strided view of the probe input, in elements: what one ``copy_`` read."""

    offset: int
    sizes: tuple[int, ...]
    strides: tuple[int, ...]


@dataclass
class Reads:
    """What loader calls read from one probe input; ``untraced`` if some source was not a view of it."""

    regions: list[Region] = field(default_factory=list)
    untraced: bool = False


class CopyTrace(TorchDispatchMode):
    """Inside a loader call: counts elements written by ``copy_`` and ``fill_`` and records the
    regions of ``source`` (the probe input) the copies read. ``fill_`` counts because it is how
    a loader writes what the checkpoint does not hold: vLLM pads a vocabulary to a multiple of
    64 rows and its embedding loader zero-fills the padding rows, so a pushed embedding fills
    its whole layer although it holds fewer rows."""

    def __init__(self, source: torch.Tensor | None, reads: Reads) -> None:
        super().__init__()
        self.numel = 0
        self.source = source
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.fill_.Scalar, torch.ops.aten.fill_.Tensor):
            self.numel += args[0].numel()
        elif func is torch.ops.aten.copy_.default:
            self.numel += args[0].numel()
            src = args[1]
            if self.source is not None and isinstance(src, torch.Tensor):
                if _same_storage(src, self.source):
                    offset = int(src.storage_offset() - self.source.storage_offset())
                    self.reads.regions.append(Region(offset, tuple(int(n) for n in src.shape), tuple(int(s) for s in src.stride())))
                else:
                    self.reads.untraced = True
        return func(*args, **(kwargs or {}))


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage()._cdata == b.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # tensors without storage (subclasses)
        return False


def _runs(region: Region) -> tuple[torch.Tensor, int] | None:
    """Start offsets of the contiguous runs a region covers, and the run length (None: too many)."""
    dims = sorted(((n, s) for n, s in zip(region.sizes, region.strides) if n != 1 and s != 0), key=lambda d: -d[1])
    run = 1
    while dims and dims[-1][1] == run:  # merge the innermost dims that are contiguous
        run *= dims.pop()[0]
    count = 1
    for n, _ in dims:
        count *= n
    if count > MAX_RUNS:
        return None
    starts = torch.tensor([region.offset], dtype=torch.int64)
    for n, s in dims:
        starts = (starts[:, None] + torch.arange(n, dtype=torch.int64) * s).reshape(-1)
    return starts, run


def covered(regions: list[Region]) -> int | None:
    """Distinct elements the regions cover together (None if too many runs to count)."""
    starts, ends = [], []
    for r in regions:
        if 0 in r.sizes:
            continue
        got = _runs(r)
        if got is None:
            return None
        starts.append(got[0])
        ends.append(got[0] + got[1])
    if not starts:
        return 0
    s, order = torch.cat(starts).sort()
    e = torch.cat(ends)[order]
    reach = torch.cummax(e, 0).values
    prev = torch.cat([torch.tensor([0], dtype=torch.int64), reach[:-1]])
    return int((e - torch.maximum(s, prev)).clamp(min=0).sum())


def bounding_shape(regions: list[Region], shape: tuple[int, ...]) -> list[int] | None:
    """Extent per dimension of the box the regions span inside a contiguous tensor of ``shape``
    (the shape the loaders took from it), or None if nothing was read."""
    boxes = []
    for r in regions:
        if 0 in r.sizes:
            continue
        last = r.offset + sum((n - 1) * s for n, s in zip(r.sizes, r.strides))
        boxes.append((_unravel(r.offset, shape), _unravel(last, shape)))
    if not boxes:
        return None
    return [max(b[1][d] for b in boxes) - min(b[0][d] for b in boxes) + 1 for d in range(len(shape))]


def _unravel(index: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for n in reversed(shape):
        out.append(index % n)
        index //= n
    return out[::-1]
