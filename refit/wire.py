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

from refit.errors import WireError
from refit.integrity import Checksum
from refit.meta import Manifest
from refit.meta import manifest_to_wire as manifest_to_wire
from refit.report import RefitReport
from refit.wire_manifest import MAX_U64 as MAX_U64
from refit.wire_manifest import check_bool, check_bytes, check_int, check_list, check_str
from refit.wire_manifest import manifest_from_wire as manifest_from_wire

MAX_MESSAGE_BYTES = 1 << 30
MAX_PROBLEMS = 10_000
MAX_CHECKSUM_BYTES = 32  # a checksum travels as its digest bytes (8 for xxh3, 16 for sum64)
MAX_FINGERPRINTS = 1 << 20
CHECKSUMS = ("", *(c.value for c in Checksum))  # "" = off

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
    checksum: str = ""  # per-bucket checksum algorithm of this push ("" = none), see refit.integrity
    record: bool = False  # receivers keep a sha256 of every tensor they receive (for verify)


@dataclass(frozen=True)
class Verdict:
    """Receiver -> sender: accept, ask for the full manifest, or refuse with every problem."""

    push_id: int
    accept: bool
    need_manifest: bool
    problems: tuple[str, ...]
    peer: str
    checksum: str = ""  # the Hello's checksum algorithm, echoed: this receiver verifies it


@dataclass(frozen=True)
class Bucket:
    """Sender -> receiver: bucket ``index`` is ready, ``nbytes`` long.

    Its bytes travel beside this header (``zmq``) or already sit in shared staging buffer
    ``slot`` (``cuda_ipc``); with ``nccl`` it only carries the checksum (the bytes are
    broadcast). ``checksum`` is the sender's checksum of the bytes (None: checksums are off).
    """

    push_id: int
    index: int
    nbytes: int
    slot: int = 0
    checksum: bytes | None = None


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
    receivers instead of starting again at 1)."""

    push_id: int


@dataclass(frozen=True)
class Status:
    """Receiver -> sender: the answer to a :class:`Probe`."""

    push_id: int
    version: int
    torn: bool
    peer: str


@dataclass(frozen=True)
class FingerprintRequest:
    """Sender -> receiver, between pushes: the sha256 of every tensor you hold (``refit verify``)."""

    push_id: int


@dataclass(frozen=True)
class Fingerprints:
    """Receiver -> sender: the answer to a :class:`FingerprintRequest`.

    ``digests`` maps a tensor name to the 32-byte sha256 of its dtype, shape and bytes
    (:func:`refit.digest.tensor_digest`). ``source`` says what was hashed: ``stored`` (the
    target's tensors as they are now), ``received`` (what the last pushes delivered, recorded
    while applying, for targets that store tensors in another form) or ``none``.
    """

    push_id: int
    version: int
    source: str
    digests: dict[str, bytes]
    peer: str


FINGERPRINT_SOURCES = ("stored", "received", "none")

Message = Hello | Verdict | Bucket | Ack | Finish | Done | Abort | Probe | Status | FingerprintRequest | Fingerprints


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
        if msg.checksum:  # absent when off: the wire of a push without checksums is unchanged
            d["checksum"] = msg.checksum
        if msg.record:
            d["record"] = True
    elif isinstance(msg, Verdict):
        d = {
            "type": "verdict",
            "push_id": msg.push_id,
            "accept": msg.accept,
            "need_manifest": msg.need_manifest,
            "problems": list(msg.problems),
            "peer": msg.peer,
        }
        if msg.checksum:
            d["checksum"] = msg.checksum
    elif isinstance(msg, Bucket):
        d = {"type": "bucket", "push_id": msg.push_id, "index": msg.index, "nbytes": msg.nbytes, "slot": msg.slot}
        if msg.checksum is not None:
            d["checksum"] = msg.checksum
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
    elif isinstance(msg, FingerprintRequest):
        d = {"type": "fingerprint", "push_id": msg.push_id}
    elif isinstance(msg, Fingerprints):
        d = {"type": "fingerprints", "push_id": msg.push_id, "version": msg.version, "source": msg.source, "digests": msg.digests, "peer": msg.peer}
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


def _checksum_name(v: Any) -> str:
    if v not in CHECKSUMS or type(v) is not str:
        raise WireError(f"field 'checksum': unknown checksum algorithm {v!r:.40}; known: {[c for c in CHECKSUMS if c]} (upgrade refit on this side?)")
    return v


def _checksum_bytes(v: Any) -> bytes:
    if type(v) is not bytes or not 1 <= len(v) <= MAX_CHECKSUM_BYTES:
        raise WireError(f"field 'checksum': expected 1 to {MAX_CHECKSUM_BYTES} bytes, got {v!r:.40}")
    return v


def _digests(v: Any) -> dict[str, bytes]:
    if type(v) is not dict or len(v) > MAX_FINGERPRINTS:
        raise WireError(f"field 'digests': expected a map of at most {MAX_FINGERPRINTS} names")
    for k, x in v.items():
        check_str(k, "digests.name")
        if type(x) is not bytes or len(x) != 32:
            raise WireError(f"field 'digests[{k!r:.80}]': expected a 32-byte sha256")
    return v


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
            checksum=_checksum_name(d.get("checksum", "")),
            record=check_bool(d.get("record", False), "record"),
        )
    if kind == "verdict":
        problems = check_list(d.get("problems"), "problems", MAX_PROBLEMS)
        return Verdict(
            push_id=push_id,
            accept=check_bool(d.get("accept"), "accept"),
            need_manifest=check_bool(d.get("need_manifest"), "need_manifest"),
            problems=tuple(check_str(p, f"problems[{i}]") for i, p in enumerate(problems)),
            peer=check_str(d.get("peer"), "peer", 256),
            checksum=_checksum_name(d.get("checksum", "")),
        )
    if kind == "bucket":
        raw_sum = d.get("checksum")
        return Bucket(
            push_id,
            check_int(d.get("index"), "index"),
            check_int(d.get("nbytes"), "nbytes"),
            check_int(d.get("slot"), "slot", 0, 63),
            None if raw_sum is None else _checksum_bytes(raw_sum),
        )
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
    if kind == "fingerprint":
        return FingerprintRequest(push_id)
    if kind == "fingerprints":
        source = d.get("source")
        if source not in FINGERPRINT_SOURCES:
            raise WireError(f"field 'source': expected one of {list(FINGERPRINT_SOURCES)}, got {source!r:.40}")
        version = check_int(d.get("version"), "version")
        return Fingerprints(push_id, version, source, _digests(d.get("digests")), check_str(d.get("peer"), "peer", 256))
    raise WireError(f"field 'type': unknown message type {kind!r:.40}")
