"""Wire codec: round trips, validation naming the field, fuzzing (only WireError escapes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refit.errors import WireError
from refit.meta import Role
from refit.plan import PlanEntry, plan
from refit.report import RefitReport
from refit.wire import Abort, Ack, Bucket, Done, Finish, Hello, Message, Probe, Status, Verdict, decode, encode, manifest_to_wire

pytestmark = pytest.mark.unit

MANIFEST = plan(
    [
        PlanEntry("s.k_scale", (), torch.float32, Role.SCALE),
        PlanEntry("w", (20, 30), torch.bfloat16),
        PlanEntry("big", (5000,), torch.uint8),
        PlanEntry("f8", (8, 8), torch.float8_e4m3fn),
    ],
    bucket_bytes=2048,
)

MESSAGES: list[Message] = [
    Hello(7, 3, MANIFEST.digest, MANIFEST, 2, b"xx"),
    Hello(7, 3, MANIFEST.digest, None, 2),
    Verdict(7, False, False, ("a: unknown", "b: shape"), "rx0"),
    Bucket(7, 1, 2048, 1),
    Ack(7, 1),
    Finish(7),
    Done(7, RefitReport(3, 10, 1, 2, {"apply": 0.5, "total": 1.0}, loaded=2, remote=0, peer="rx0")),
    Abort(7, "because"),
    Probe(7),
    Status(7, 12, True, "rx0"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_roundtrip(msg: Message) -> None:
    got = decode(encode(msg))
    assert type(got) is type(msg)
    if isinstance(msg, Hello) and msg.manifest is not None:
        assert isinstance(got, Hello) and got.manifest is not None
        assert got.manifest.metas == msg.manifest.metas and got.manifest.digest == msg.manifest.digest
    else:
        assert got == msg


def _hello_with(mutate: Callable[[dict[str, Any]], object]) -> bytes:
    d = {"type": "hello", "push_id": 1, "version": 1, "digest": "x", "num_buffers": 2, "manifest": manifest_to_wire(MANIFEST)}
    mutate(d)
    return msgpack.packb(d, use_bin_type=True)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(push_id=-1), "push_id"),
        (lambda d: d.update(num_buffers=0), "num_buffers"),
        (lambda d: d["manifest"]["tensors"][1].__setitem__(1, "complex64"), "dtype"),
        (lambda d: d["manifest"]["tensors"][1].__setitem__(5, 300), "offset"),
        (lambda d: d["manifest"]["tensors"][1].__setitem__(6, 99999), "nbytes"),
        (lambda d: d["manifest"]["tensors"][1].__setitem__(2, [21, 30]), "nbytes"),
        (lambda d: d["manifest"]["tensors"][1].__setitem__(0, "s.k_scale"), "name"),
        (lambda d: d["manifest"]["tensors"][1].__setitem__(3, "bias"), "role"),
        (lambda d: d["manifest"].update(alignment=100), "alignment"),
        (lambda d: d["manifest"]["tensors"].pop(3), "tensors"),
        (lambda d: d["manifest"]["tensors"][0].__setitem__(5, 256), "overlap"),
        (lambda d: d["manifest"]["bucket_sizes"].__setitem__(0, 4096), "bucket_sizes"),
        (lambda d: d.update(type="bogus"), "type"),
    ],
)
def test_validation_names_the_field(mutate: Callable[[dict[str, Any]], object], field: str) -> None:
    with pytest.raises(WireError, match=field):
        decode(_hello_with(mutate))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"version": -1, "torn": False, "peer": "rx"}, "version"),
        ({"version": 3, "torn": 0, "peer": "rx"}, "torn"),
        ({"version": 3, "torn": False}, "peer"),
    ],
)
def test_status_validation_names_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(WireError, match=field):
        decode(msgpack.packb({"type": "status", "push_id": 1, **fields}, use_bin_type=True))


def test_garbage_is_wire_error() -> None:
    for data in (b"", b"\xc1", b"\x92\x01\x02", msgpack.packb([1, 2]), msgpack.packb({"type": "ack"})):
        with pytest.raises(WireError):
            decode(data)


VALID = [encode(m) for m in MESSAGES]


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        decode(data)
    except WireError:
        pass


@settings(max_examples=600, deadline=None)
@given(which=st.integers(0, len(VALID) - 1), pos=st.integers(0, 10_000), byte=st.integers(0, 255), cut=st.booleans())
def test_fuzz_mutated_messages(which: int, pos: int, byte: int, cut: bool) -> None:
    data = bytearray(VALID[which])
    pos %= len(data)
    if cut:
        data = data[:pos]
    else:
        data[pos] = byte
    try:
        decode(bytes(data))
    except WireError:
        pass


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(
    kind=st.sampled_from(["hello", "verdict", "bucket", "ack", "finish", "done", "abort", "probe", "status"]),
    fields=st.dictionaries(
        st.sampled_from(
            [
                "push_id",
                "version",
                "digest",
                "manifest",
                "num_buffers",
                "accept",
                "need_manifest",
                "problems",
                "peer",
                "index",
                "nbytes",
                "slot",
                "report",
                "reason",
                "extra",
                "torn",
            ]
        ),
        _values,
    ),
)
def test_fuzz_structured_messages(kind: str, fields: dict[str, Any]) -> None:
    try:
        decode(msgpack.packb({"type": kind, **fields}, use_bin_type=True))
    except WireError:
        pass
    except (OverflowError, ValueError):  # msgpack refuses to *encode* some generated values
        pass
