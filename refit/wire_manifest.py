"""Field checks of the wire decoder and the manifest's decoder (the longest part of decoding a
``hello``): every value is checked for type, range, length, alignment, chunk continuity and
overlap, and a bad one raises :class:`WireError` naming the field. Used by :mod:`refit.wire`
(which re-exports these names) and by the transports' own payload decoders.
"""

from __future__ import annotations

import math
from typing import Any

from refit.errors import PlanError, WireError
from refit.meta import DTYPES, Manifest, Role, TensorMeta, dtype_from_name, itemsize
from refit.plan import MAX_NAME_LEN, MIN_ALIGNMENT

MAX_DIMS = 16
MAX_DIM = 1 << 48
MAX_U64 = (1 << 63) - 1


def check_int(v: Any, field: str, lo: int = 0, hi: int = MAX_U64) -> int:
    """``v`` if it is an int in ``[lo, hi]``; else :class:`WireError` naming ``field``."""
    if type(v) is not int or not lo <= v <= hi:
        raise WireError(f"field {field!r}: expected an int in [{lo}, {hi}], got {v!r:.80}")
    return v


def check_str(v: Any, field: str, max_len: int = MAX_NAME_LEN) -> str:
    """``v`` if it is a string of at most ``max_len`` characters; else :class:`WireError`."""
    if type(v) is not str or len(v) > max_len:
        raise WireError(f"field {field!r}: expected a string of at most {max_len} characters")
    return v


def check_list(v: Any, field: str, max_len: int = MAX_U64) -> list[Any]:
    """``v`` if it is a list of at most ``max_len`` items; else :class:`WireError`."""
    if type(v) is not list or len(v) > max_len:
        raise WireError(f"field {field!r}: expected a list of at most {max_len} items")
    return v


def check_bytes(v: Any, field: str, max_len: int) -> bytes:
    """``v`` if it is bytes of at most ``max_len``; else :class:`WireError`."""
    if type(v) is not bytes or len(v) > max_len:
        raise WireError(f"field {field!r}: expected at most {max_len} bytes")
    return v


def check_bool(v: Any, field: str) -> bool:
    """``v`` if it is a bool; else :class:`WireError` naming ``field``."""
    if type(v) is not bool:
        raise WireError(f"field {field!r}: expected a bool, got {v!r:.80}")
    return v


def manifest_from_wire(d: Any) -> Manifest:
    """Validate and decode a manifest; raises :class:`WireError` naming the bad field."""
    if type(d) is not dict:
        raise WireError("field 'manifest': expected a map")
    bucket_bytes = check_int(d.get("bucket_bytes"), "manifest.bucket_bytes", 1)
    alignment = check_int(d.get("alignment"), "manifest.alignment", 1, 1 << 30)
    if alignment & (alignment - 1) or alignment < MIN_ALIGNMENT:
        raise WireError(f"field 'manifest.alignment': must be a power of two >= {MIN_ALIGNMENT}")
    raw_sizes = check_list(d.get("bucket_sizes"), "manifest.bucket_sizes")
    sizes = [check_int(s, f"manifest.bucket_sizes[{i}]", 0, bucket_bytes) for i, s in enumerate(raw_sizes)]
    rows = check_list(d.get("tensors"), "manifest.tensors")
    metas: list[TensorMeta] = []
    names: set[str] = set()
    last_bucket = 0
    pending: TensorMeta | None = None  # the previous chunk of a chunked tensor in progress
    for i, row in enumerate(rows):
        f = f"manifest.tensors[{i}]"
        if type(row) is not list or len(row) != 10:
            raise WireError(f"field {f!r}: expected a list of 10 values")
        name = check_str(row[0], f + ".name")
        if not name:
            raise WireError(f"field {f + '.name'!r}: empty name")
        try:
            dtype = dtype_from_name(row[1])
        except PlanError:
            raise WireError(f"field {f + '.dtype'!r}: unknown dtype {row[1]!r:.40}; known: {sorted(DTYPES)}") from None
        shape = tuple(check_int(x, f"{f}.shape[{j}]", 0, MAX_DIM) for j, x in enumerate(check_list(row[2], f + ".shape", MAX_DIMS)))
        try:
            role = Role(row[3])
        except ValueError:
            raise WireError(f"field {f + '.role'!r}: expected one of {[r.value for r in Role]}") from None
        bucket = check_int(row[4], f + ".bucket", 0, max(len(sizes) - 1, 0))
        if not sizes or bucket < last_bucket:
            raise WireError(f"field {f + '.bucket'!r}: buckets must be non-decreasing and exist")
        last_bucket = bucket
        offset = check_int(row[5], f + ".offset", 0, bucket_bytes)
        nbytes = check_int(row[6], f + ".nbytes", 0, bucket_bytes)
        chunk = check_int(row[7], f + ".chunk", 0)
        chunks = check_int(row[8], f + ".chunks", 1)
        start = check_int(row[9], f + ".start", 0)
        if offset % alignment:
            raise WireError(f"field {f + '.offset'!r}: {offset} is not aligned to {alignment}")
        if offset + nbytes > sizes[bucket]:
            raise WireError(f"field {f + '.nbytes'!r}: bytes [{offset}, {offset + nbytes}) exceed bucket {bucket} ({sizes[bucket]} bytes)")
        total = math.prod(shape) * itemsize(dtype)
        if chunk >= chunks:
            raise WireError(f"field {f + '.chunk'!r}: chunk {chunk} of {chunks}")
        if pending is not None:
            expect = (pending.name, pending.chunk + 1, pending.chunks, pending.start + pending.nbytes)
            if (name, chunk, chunks, start) != expect or (dtype, shape) != (pending.dtype, pending.shape):
                raise WireError(f"field {f!r}: expected chunk {pending.chunk + 1} of {pending.name!r}")
        elif chunk != 0 or start != 0:
            raise WireError(f"field {f + '.chunk'!r}: a tensor must start with chunk 0 at byte 0")
        else:
            if name in names:
                raise WireError(f"field {f + '.name'!r}: duplicate name {name!r}")
            names.add(name)
        if chunks == 1 and nbytes != total:
            raise WireError(f"field {f + '.nbytes'!r}: {nbytes} != {total} bytes of shape {shape} {row[1]}")
        if chunks > 1 and (start + nbytes > total or nbytes % itemsize(dtype)):
            raise WireError(f"field {f + '.nbytes'!r}: chunk outside the tensor's {total} bytes")
        meta = TensorMeta(name, dtype, shape, role, bucket, offset, nbytes, chunk, chunks, start)
        last = chunk == chunks - 1
        if last and chunks > 1 and start + nbytes != total:
            raise WireError(f"field {f + '.nbytes'!r}: chunks of {name!r} cover {start + nbytes} of {total} bytes")
        pending = None if last else meta
        metas.append(meta)
    if pending is not None:
        raise WireError(f"field 'manifest.tensors': {pending.name!r} ends before its last chunk")
    _check_no_overlap(metas)
    return Manifest(tuple(metas), tuple(sizes), bucket_bytes, alignment)


def _check_no_overlap(metas: list[TensorMeta]) -> None:
    by_bucket: dict[int, list[tuple[int, int, str]]] = {}
    for m in metas:
        if m.nbytes:
            by_bucket.setdefault(m.bucket, []).append((m.offset, m.offset + m.nbytes, m.name))
    for b, spans in by_bucket.items():
        spans.sort()
        for (_, end, a), (start, _, c) in zip(spans, spans[1:]):
            if start < end:
                raise WireError(f"field 'manifest.tensors': {a!r} and {c!r} overlap in bucket {b}")
