"""Bucket planning: a pure, deterministic function from tensor metadata to a :class:`Manifest`.

Tensors are laid out in the order given, each at an offset aligned to ``alignment`` bytes (a
power of two, at least 16, so that every dtype's view into the byte bucket is legal). A tensor
that does not fit in what is left of the current bucket starts a new one; a tensor larger than
``bucket_bytes`` is split into chunks that fill consecutive buckets and are reassembled exactly
by the receiver. With ``tail_bytes``, the buckets at the end are cut so that the last one holds
about ``tail_bytes`` (at most twice that): nothing overlaps the receivers' apply of the last bucket, so a short last
bucket ends a push sooner. The function does no I/O and touches no tensor data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch

from refit.errors import PlanError, problem_list
from refit.meta import Manifest, Role, TensorMeta, itemsize

DEFAULT_BUCKET_BYTES = 512 << 20
DEFAULT_ALIGNMENT = 256
#: What ``Refitter`` cuts the last bucket to when buckets are at least 4x larger.
DEFAULT_TAIL_BYTES = 64 << 20
MIN_ALIGNMENT = 16


class PlanEntry(NamedTuple):
    """What the planner needs to know of one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    role: Role = Role.WEIGHT


#: Longest tensor name a push carries (characters): receivers refuse longer ones on the wire,
#: so the sender refuses them first, naming the tensor.
MAX_NAME_LEN = 4096


def check_layout_options(bucket_bytes: int, alignment: int) -> None:
    """Validate bucket size and alignment; raises :class:`PlanError` with the fix."""
    if not isinstance(alignment, int) or alignment < MIN_ALIGNMENT or alignment & (alignment - 1):
        raise PlanError(f"alignment must be a power of two >= {MIN_ALIGNMENT}, got {alignment!r}")
    if not isinstance(bucket_bytes, int) or bucket_bytes < alignment:
        raise PlanError(f"bucket_bytes must be an int >= alignment ({alignment}), got {bucket_bytes!r}")
    if bucket_bytes % alignment:
        raise PlanError(f"bucket_bytes ({bucket_bytes}) must be a multiple of alignment ({alignment}); use {bucket_bytes // alignment * alignment}")


def default_tail_bytes(bucket_bytes: int) -> int:
    """``Refitter``'s default ``tail_bytes``: 64 MiB when buckets are at least 256 MiB, else 0."""
    return DEFAULT_TAIL_BYTES if bucket_bytes >= 4 * DEFAULT_TAIL_BYTES else 0


def plan(
    entries: Iterable[PlanEntry],
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    alignment: int = DEFAULT_ALIGNMENT,
    tail_bytes: int = 0,
) -> Manifest:
    """Lay out ``entries`` into buckets.

    Args:
        entries: ``PlanEntry(name, shape, dtype, role)`` in stream order. Names must be unique.
        bucket_bytes: capacity of one bucket; a multiple of ``alignment``.
        alignment: byte alignment of every tensor's offset (power of two, >= 16).
        tail_bytes: when more than ``2 * tail_bytes`` and at most ``bucket_bytes + tail_bytes``
            bytes are left as a bucket opens, that bucket takes all but about ``tail_bytes`` of
            them, so the last bucket holds at most ``2 * tail_bytes`` (plus alignment); 0
            (default) fills every bucket up to ``bucket_bytes``.

    Returns:
        The :class:`Manifest`; an empty state gives a manifest with no bucket.

    Raises:
        PlanError: duplicate, empty or over-long names (more than ``MAX_NAME_LEN``
            characters, or a NUL), negative dimensions, dtypes that cannot travel, or invalid
            options; every bad entry is listed.

    Example:
        >>> m = plan([PlanEntry("w", (4, 4), torch.float32)], bucket_bytes=1024)
        >>> (m.metas[0].bucket, m.metas[0].offset, m.metas[0].nbytes)
        (0, 0, 64)
    """
    check_layout_options(bucket_bytes, alignment)
    if isinstance(tail_bytes, bool) or not isinstance(tail_bytes, int) or not 0 <= tail_bytes < bucket_bytes:
        raise PlanError(f"tail_bytes must be an int in [0, bucket_bytes), got {tail_bytes!r}")
    entries = list(entries)
    mask = alignment - 1
    after, total = _bytes_after(entries)  # after[i]: bytes of the entries after entry i

    def capacity(left: int) -> int:
        """Capacity of a bucket opened with ``left`` bytes still to place."""
        if tail_bytes and 2 * tail_bytes < left <= bucket_bytes + tail_bytes:  # no sliver bucket
            return max((left - tail_bytes) & ~mask, alignment)
        return bucket_bytes

    metas: list[TensorMeta] = []
    sizes: list[int] = []
    problems: list[str] = []
    seen: set[str] = set()
    bucket, cursor = 0, 0  # cursor: first free byte of the current bucket
    cap = capacity(total)  # of the current bucket

    for i, entry in enumerate(entries):
        name, shape, dtype, role = entry
        if not isinstance(name, str) or not name:
            problems.append(f"{name!r}: names must be non-empty strings")
            continue
        if len(name) > MAX_NAME_LEN or "\x00" in name:
            problems.append(f"{name[:80]!r}... ({len(name)} characters): names must have at most {MAX_NAME_LEN} characters and no NUL")
            continue
        if name in seen:
            problems.append(f"{name}: duplicate name (each tensor may appear once per push)")
            continue
        seen.add(name)
        if any((not isinstance(d, int)) or d < 0 for d in shape):
            problems.append(f"{name}: invalid shape {shape}")
            continue
        try:
            size = itemsize(dtype)
        except (PlanError, KeyError) as exc:
            problems.append(f"{name}: {exc}")
            continue
        nbytes = math.prod(shape) * size
        offset = (cursor + mask) & ~mask
        if offset + nbytes <= cap:
            metas.append(TensorMeta(name, dtype, tuple(shape), role, bucket, offset, nbytes))
            cursor = offset + nbytes
            continue
        fresh = capacity(nbytes + after[i])
        if nbytes <= fresh:  # fits in a fresh bucket
            sizes.append(cursor)
            bucket, cursor, cap = bucket + 1, nbytes, fresh
            metas.append(TensorMeta(name, dtype, tuple(shape), role, bucket, 0, nbytes))
            continue
        # Larger than a bucket: fill what is left of this bucket, then whole buckets.
        if offset >= cap:
            sizes.append(cursor)
            bucket, offset, cap = bucket + 1, 0, fresh
        pieces: list[tuple[int, int, int]] = []  # (bucket, offset, nbytes)
        left = nbytes
        while left:
            take = min(left, cap - offset)
            pieces.append((bucket, offset, take))
            left -= take
            if left:
                sizes.append(offset + take)
                bucket, offset, cap = bucket + 1, 0, capacity(left + after[i])
            else:
                cursor = offset + take
        start = 0
        for k, (b, off, n) in enumerate(pieces):
            metas.append(TensorMeta(name, dtype, tuple(shape), role, b, off, n, k, len(pieces), start))
            start += n

    if problems:
        raise PlanError("cannot plan this push:\n" + problem_list(problems))
    if metas:
        sizes.append(cursor)
    return Manifest(tuple(metas), tuple(sizes), bucket_bytes, alignment)


def _bytes_after(entries: list[PlanEntry]) -> tuple[list[int], int]:
    """For each entry, the bytes of the entries after it, and the total (a bad entry counts 0:
    the planning loop refuses it, naming it)."""
    sizes = []
    for entry in entries:
        try:
            sizes.append(math.prod(entry[1]) * itemsize(entry[2]))
        except (TypeError, ValueError, KeyError, PlanError):  # reported by the planning loop
            sizes.append(0)
    after, total = [0] * len(entries), 0
    for i in range(len(entries) - 1, -1, -1):
        after[i] = total
        total += sizes[i]
    return after, total
