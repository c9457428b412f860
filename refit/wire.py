"""The only encoder/decoder of control messages.

Every control message is one msgpack map with a ``type`` key. :func:`decode` turns bytes into a
typed message record and validates every field (types, ranges, lengths, offsets inside the
bucket, no overlap); anything else raises :class:`WireError` naming the field. No pickle, ever:
a socket that unpickles is a remote code execution hole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

from refit.errors import PlanError, WireError
from refit.meta import DTYPES, Manifest, Role, TensorMeta, dtype_from_name, itemsize, manifest_to_wire
from refit.plan import MAX_NAME_LEN, MIN_ALIGNMENT
from refit.report import RefitReport

MAX_MESSAGE_BYTES = 1 << 30
MAX_DIMS = 16
MAX_DIM = 1 << 48
MAX_PROBLEMS = 10_000
MAX_U64 = (1 << 63) - 1

# ---------------------------------------------------------------- manifest


def check_int(v: Any, field: str, lo: int = 0, hi: int = MAX_U64) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise WireError(f"field {field!r}: expected an int in [{lo}, {hi}], got {v!r:.80}")
    return v


def check_str(v: Any, field: str, max_len: int = MAX_NAME_LEN) -> str:
    if type(v) is not str or len(v) > max_len:
        raise WireError(f"field {field!r}: expected a string of at most {max_len} characters")
    return v


def _list(v: Any, field: str, max_len: int = MAX_U64) -> list[Any]:
    if type(v) is not list or len(v) > max_len:
        raise WireError(f"field {field!r}: expected a list of at most {max_len} items")
    return v


def check_bytes(v: Any, field: str, max_len: int) -> bytes:
    if type(v) is not bytes or len(v) > max_len:
        raise WireError(f"field {field!r}: expected at most {max_len} bytes")
    return v


def check_bool(v: Any, field: str) -> bool:
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
    raw_sizes = _list(d.get("bucket_sizes"), "manifest.bucket_sizes")
    sizes = [check_int(s, f"manifest.bucket_sizes[{i}]", 0, bucket_bytes) for i, s in enumerate(raw_sizes)]
    rows = _list(d.get("tensors"), "manifest.tensors")
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
        shape = tuple(check_int(x, f"{f}.shape[{j}]", 0, MAX_DIM) for j, x in enumerate(_list(row[2], f + ".shape", MAX_DIMS)))
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


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class Hello:
    """Sender -> receiver: a push begins. ``manifest`` is None when only the digest is sent."""

    push_id: int
    version: int
    digest: str
    manifest: Manifest | None
    num_buffers: int
    extra: bytes = b""  # transport-specific set-up (IPC handles, rendezvous), decoded by the transport


@dataclass(frozen=True)
class Verdict:
    """Receiver -> sender: accept, ask for the full manifest, or refuse with every problem."""

    push_id: int
    accept: bool
    need_manifest: bool
    problems: tuple[str, ...]
    peer: str


@dataclass(frozen=True)
class Bucket:
    """Sender -> receiver: bucket ``index`` is ready, ``nbytes`` long.

    Its bytes travel beside this header (``zmq``) or already sit in shared staging buffer
    ``slot`` (``cuda_ipc``).
    """

    push_id: int
    index: int
    nbytes: int
    slot: int = 0


@dataclass(frozen=True)
class Ack:
    """Receiver -> sender: bucket ``index`` has been applied; its buffer may be reused."""

    push_id: int
    index: int


@dataclass(frozen=True)
class Finish:
    """Sender -> receiver: every bucket was sent; verify, post-load, commit."""

    push_id: int


@dataclass(frozen=True)
class Done:
    """Receiver -> sender: the push is committed; carries the receiver's report."""

    push_id: int
    report: RefitReport


@dataclass(frozen=True)
class Abort:
    """Either side: the push is abandoned; ``reason`` says why."""

    push_id: int
    reason: str


@dataclass(frozen=True)
class Probe:
    """Sender -> receiver, between pushes: which version have you committed? (A Refitter
    that numbers its pushes itself asks once, so a restarted trainer continues after the
    receivers instead of starting again at 1.)"""

    push_id: int


@dataclass(frozen=True)
class Status:
    """Receiver -> sender: the answer to a :class:`Probe`."""

    push_id: int
    version: int
    torn: bool
    peer: str


Message = Hello | Verdict | Bucket | Ack | Finish | Done | Abort | Probe | Status


def encode(msg: Message) -> bytes:
    """msgpack bytes of one control message."""
    d: dict[str, Any]
    if isinstance(msg, Hello):
        d = {
            "type": "hello",
            "push_id": msg.push_id,
            "version": msg.version,
            "digest": msg.digest,
            "manifest": None if msg.manifest is None else manifest_to_wire(msg.manifest),
            "num_buffers": msg.num_buffers,
            "extra": msg.extra,
        }
    elif isinstance(msg, Verdict):
        d = {
            "type": "verdict",
            "push_id": msg.push_id,
            "accept": msg.accept,
            "need_manifest": msg.need_manifest,
            "problems": list(msg.problems),
            "peer": msg.peer,
        }
    elif isinstance(msg, Bucket):
        d = {"type": "bucket", "push_id": msg.push_id, "index": msg.index, "nbytes": msg.nbytes, "slot": msg.slot}
    elif isinstance(msg, Ack):
        d = {"type": "ack", "push_id": msg.push_id, "index": msg.index}
    elif isinstance(msg, Finish):
        d = {"type": "finish", "push_id": msg.push_id}
    elif isinstance(msg, Done):
        d = {"type": "done", "push_id": msg.push_id, "report": msg.report.to_wire()}
    elif isinstance(msg, Abort):
        d = {"type": "abort", "push_id": msg.push_id, "reason": msg.reason}
    elif isinstance(msg, Probe):
        d = {"type": "probe", "push_id": msg.push_id}
    elif isinstance(msg, Status):
        d = {"type": "status", "push_id": msg.push_id, "version": msg.version, "torn": msg.torn, "peer": msg.peer}
    else:
        raise WireError(f"cannot encode {type(msg).__name__}")
    return msgpack.packb(d, use_bin_type=True)


def report_from_wire(d: Any) -> RefitReport:
    """Validate and decode a report's wire form (``RefitReport.to_wire``)."""
    if type(d) is not dict:
        raise WireError("field 'report': expected a map")
    secs = d.get("seconds")
    if type(secs) is not dict or len(secs) > 64:
        raise WireError("field 'report.seconds': expected a map of at most 64 stages")
    seconds: dict[str, float] = {}
    for k, v in secs.items():
        if type(k) is not str or type(v) not in (int, float) or not math.isfinite(v) or v < 0:
            raise WireError("field 'report.seconds': expected stage name -> non-negative seconds")
        seconds[k] = float(v)
    return RefitReport(
        version=check_int(d.get("version"), "report.version"),
        bytes=check_int(d.get("bytes"), "report.bytes"),
        buckets=check_int(d.get("buckets"), "report.buckets"),
        tensors=check_int(d.get("tensors"), "report.tensors"),
        seconds=seconds,
        loaded=check_int(d.get("loaded"), "report.loaded"),
        remote=check_int(d.get("remote"), "report.remote"),
        peer=check_str(d.get("peer"), "report.peer", 256),
    )


def peek_push_id(data: bytes | bytearray | memoryview) -> int:
    """The ``push_id`` of a message that failed validation, if it can be read (else 0), so
    the refusal reaches the push it belongs to."""
    try:
        d = msgpack.unpackb(bytes(data[:MAX_MESSAGE_BYTES]), raw=False, strict_map_key=False)
        v = d.get("push_id") if type(d) is dict else None
        return v if type(v) is int and 0 <= v <= MAX_U64 else 0
    except Exception:  # any garbage: no push to name
        return 0


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Decode and validate one control message.

    Raises:
        WireError: not msgpack, not a map, unknown type, or any field missing, of the wrong
            type, out of range or inconsistent; the message names the field.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        d = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types for malformed input
        raise WireError(f"not a msgpack message: {type(exc).__name__}: {exc}"[:300]) from None
    if type(d) is not dict:
        raise WireError("field 'type': a message must be a map with a 'type'")
    kind = d.get("type")
    push_id = check_int(d.get("push_id"), "push_id")
    if kind == "hello":
        raw_manifest = d.get("manifest")
        return Hello(
            push_id=push_id,
            version=check_int(d.get("version"), "version"),
            digest=check_str(d.get("digest"), "digest", 128),
            manifest=None if raw_manifest is None else manifest_from_wire(raw_manifest),
            num_buffers=check_int(d.get("num_buffers"), "num_buffers", 1, 64),
            extra=check_bytes(d.get("extra", b""), "extra", 1 << 20),
        )
    if kind == "verdict":
        problems = _list(d.get("problems"), "problems", MAX_PROBLEMS)
        return Verdict(
            push_id=push_id,
            accept=check_bool(d.get("accept"), "accept"),
            need_manifest=check_bool(d.get("need_manifest"), "need_manifest"),
            problems=tuple(check_str(p, f"problems[{i}]") for i, p in enumerate(problems)),
            peer=check_str(d.get("peer"), "peer", 256),
        )
    if kind == "bucket":
        return Bucket(push_id, check_int(d.get("index"), "index"), check_int(d.get("nbytes"), "nbytes"), check_int(d.get("slot"), "slot", 0, 63))
    if kind == "ack":
        return Ack(push_id, check_int(d.get("index"), "index"))
    if kind == "finish":
        return Finish(push_id)
    if kind == "done":
        return Done(push_id, report_from_wire(d.get("report")))
    if kind == "abort":
        return Abort(push_id, check_str(d.get("reason"), "reason", 1 << 20))
    if kind == "probe":
        return Probe(push_id)
    if kind == "status":
        return Status(push_id, check_int(d.get("version"), "version"), check_bool(d.get("torn"), "torn"), check_str(d.get("peer"), "peer", 256))
    raise WireError(f"field 'type': unknown message type {kind!r:.40}")
