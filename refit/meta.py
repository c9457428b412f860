"""What travels: the dtype codec, one :class:`TensorMeta` per tensor (chunk), the :class:`Manifest`.

The manifest is the single source of truth about bucket layout. The sender plans it once, the
receivers read it and never recompute it, so the two sides cannot disagree about where a tensor
starts or ends.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import msgpack
import torch

from refit.errors import PlanError

# Explicit, closed table of the dtypes that may travel. Wire names are the torch attribute names;
# they are looked up here and nowhere else (never ``getattr(torch, untrusted)``).
_DTYPE_NAMES = (
    "bool",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
)
DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in _DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)}
DTYPE_NAMES: dict[torch.dtype, str] = {d: n for n, d in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of ``dtype``; raises :class:`PlanError` for a dtype that cannot travel."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise PlanError(
            f"dtype {dtype} cannot travel; supported: {', '.join(sorted(DTYPES))}. Convert the tensor (e.g. .to(torch.float32)) before pushing."
        ) from None


def dtype_from_name(name: str) -> torch.dtype:
    """Torch dtype for a wire name; raises :class:`PlanError` for an unknown name."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise PlanError(f"unknown dtype {name!r}; supported: {', '.join(sorted(DTYPES))}") from None


_ITEMSIZE: dict[torch.dtype, int] = {d: torch.empty(0, dtype=d).element_size() for d in DTYPES.values()}


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of a dtype that can travel; raises :class:`PlanError` for others."""
    try:
        return _ITEMSIZE[dtype]
    except KeyError:
        dtype_name(dtype)  # raises the PlanError that lists the dtypes that travel
        raise


class Role(enum.StrEnum):
    """What a tensor is to the receiver: a weight, or quantization state (scale / amax)."""

    WEIGHT = "weight"
    SCALE = "scale"


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Where one tensor, or one chunk of a tensor larger than a bucket, sits in the stream.

    ``offset`` and ``nbytes`` locate the bytes inside bucket ``bucket``; ``start`` is the byte
    offset of this chunk inside the whole tensor (0 for an unchunked tensor). A tensor of
    ``chunks`` > 1 has one meta per chunk, consecutive in the manifest.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    role: Role
    bucket: int
    offset: int
    nbytes: int
    chunk: int = 0
    chunks: int = 1
    start: int = 0

    @property
    def is_chunked(self) -> bool:
        """True if this entry is one of several chunks of a tensor too large for one bucket."""
        return self.chunks > 1


@dataclass(frozen=True)
class Manifest:
    """The ordered metas of one push plus bucket sizes and alignment.

    ``bucket_sizes[i]`` is the number of bytes of bucket ``i`` that carry data (the last bucket
    is usually shorter than ``bucket_bytes``). ``digest`` is a content hash of the layout: two
    pushes with the same names, shapes, dtypes and options have the same digest, so a receiver
    that has seen a layout once can accept it by hash.
    """

    metas: tuple[TensorMeta, ...]
    bucket_sizes: tuple[int, ...]
    bucket_bytes: int
    alignment: int

    @property
    def num_buckets(self) -> int:
        """How many buckets the push sends (empty ones included)."""
        return len(self.bucket_sizes)

    @cached_property
    def total_bytes(self) -> int:
        """Payload bytes (sum of tensor sizes, padding excluded)."""
        return sum(m.nbytes for m in self.metas)

    @cached_property
    def num_tensors(self) -> int:
        """How many tensors the push carries (a chunked tensor counts once)."""
        return sum(1 for m in self.metas if m.chunk == 0)

    @cached_property
    def digest(self) -> str:
        """The layout's content hash (:func:`manifest_digest`): equal digests mean equal plans."""
        return manifest_digest(self)

    @cached_property
    def segments(self) -> tuple[list[tuple[int, int, bool]], ...]:
        """Per bucket, ``(i, j, is_run)`` pieces of ``by_bucket[b]``: runs of 0-d tensors at a
        constant stride (handled as one strided view) and single tensors."""
        return tuple(segments(metas) for metas in self.by_bucket)

    @cached_property
    def by_bucket(self) -> tuple[tuple[TensorMeta, ...], ...]:
        """Metas grouped by bucket index, in stream order."""
        groups: list[list[TensorMeta]] = [[] for _ in self.bucket_sizes]
        for m in self.metas:
            groups[m.bucket].append(m)
        return tuple(tuple(g) for g in groups)


# ---------------------------------------------------------------- layout facts of a manifest


def manifest_to_wire(m: Manifest) -> dict[str, Any]:
    """Wire form of a manifest: columns of plain values, one row per meta (decoded and
    validated by :func:`refit.wire.manifest_from_wire`)."""
    return {
        "bucket_bytes": m.bucket_bytes,
        "alignment": m.alignment,
        "bucket_sizes": list(m.bucket_sizes),
        "tensors": [
            [x.name, dtype_name(x.dtype), list(x.shape), x.role.value, x.bucket, x.offset, x.nbytes, x.chunk, x.chunks, x.start] for x in m.metas
        ],
    }


def manifest_digest(m: Manifest) -> str:
    """Content hash of the layout (sha256 of its canonical msgpack form); it travels in every
    Hello, so both sides compute it the same way."""
    return hashlib.sha256(msgpack.packb(manifest_to_wire(m), use_bin_type=True)).hexdigest()


#: Runs of 0-d tensors shorter than this are cheaper one by one.
MIN_RUN = 8


def find_runs(metas: Sequence[TensorMeta]) -> list[tuple[int, int]]:
    """Index ranges ``[i, j)`` of ``metas`` that are runs of >= MIN_RUN 0-d tensors of one dtype
    at a constant stride (a multiple of the dtype's size)."""
    out: list[tuple[int, int]] = []
    i, n = 0, len(metas)
    while i < n:
        m = metas[i]
        j = i + 1
        if m.shape == () and i + 1 < n:
            step = metas[i + 1].offset - m.offset
            size = itemsize(m.dtype)
            if step > 0 and step % size == 0:
                while j < n and metas[j].shape == () and metas[j].dtype == m.dtype and metas[j].offset - metas[j - 1].offset == step:
                    j += 1
        if j - i >= MIN_RUN:
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


def segments(metas: Sequence[TensorMeta]) -> list[tuple[int, int, bool]]:
    """``metas`` cut into ``(i, j, is_run)`` pieces: runs, and the single tensors between them."""
    out: list[tuple[int, int, bool]] = []
    k = 0
    for i, j in find_runs(metas):
        out.extend((x, x + 1, False) for x in range(k, i))
        out.append((i, j, True))
        k = j
    out.extend((x, x + 1, False) for x in range(k, len(metas)))
    return out
