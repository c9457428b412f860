"""The zmq sender sends large contiguous host tensors from where they lie (no pack copy), with
the rest of each bucket packed around them (refit/send.py, ``sends_in_place``)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

pytest.importorskip("zmq")

import refit.send
from refit import Refitter
from refit.digest import digest
from refit.errors import PlanError
from refit.meta import Role, TensorMeta
from refit.pack import LARGE_COPY_BYTES, Lazy
from refit.receiver import RefitReceiver
from refit.send import bucket_pieces, in_place_bytes
from refit.transports.zmq import ZmqReceiver

MIB = 1 << 20


def meta(name: str, shape: tuple[int, ...], *, offset: int = 0, start: int = 0, nbytes: int | None = None, chunks: int = 1, chunk: int = 0) -> TensorMeta:
    whole = 2 * int(torch.Size(shape).numel())
    size = whole if nbytes is None else nbytes
    return TensorMeta(name, torch.bfloat16, shape, Role.WEIGHT, bucket=0, offset=offset, nbytes=size, start=start, chunk=chunk, chunks=chunks)


@pytest.mark.unit
def test_bucket_pieces_cover_the_bucket_in_order_around_the_tensors_sent_in_place() -> None:
    staging = memoryview(bytearray(b"s" * 100))
    a, b = memoryview(b"A" * 20), memoryview(b"B" * 30)
    pieces = bucket_pieces(staging, [(60, b), (10, a)], 100)  # given out of order
    assert [bytes(p[:1]) for p in pieces] == [b"s", b"A", b"s", b"B", b"s"]
    assert [len(p) for p in pieces] == [10, 20, 30, 30, 10]
    assert bucket_pieces(staging, [(0, memoryview(b"A" * 100))], 100)[0].obj is not staging.obj  # no staging slice at all
    assert [len(p) for p in bucket_pieces(staging, [(0, a), (20, b)], 50)] == [20, 30]  # adjacent tensors: no empty piece
    assert [len(p) for p in bucket_pieces(staging, [], 40)] == [40]


@pytest.mark.unit
def test_only_large_contiguous_host_tensors_are_sent_in_place() -> None:
    big = torch.randn(1024, 1024).to(torch.bfloat16)  # 2 MiB
    m = meta("w", (1024, 1024))
    view = in_place_bytes(m, big)
    assert view is not None and len(view) == 2 * MIB
    assert torch.frombuffer(view, dtype=torch.uint8).data_ptr() == big.data_ptr()  # its own bytes, not a copy
    assert in_place_bytes(m, big.t()) is None  # not contiguous: packed
    small = torch.zeros(16, 16, dtype=torch.bfloat16)
    assert in_place_bytes(meta("s", (16, 16)), small) is None and LARGE_COPY_BYTES > 512
    assert in_place_bytes(m, Lazy((1024, 1024), torch.bfloat16, lambda out: out.zero_())) is None
    chunk = meta("w", (1024, 1024), start=MIB, nbytes=MIB, chunks=2, chunk=1)  # the second half
    view = in_place_bytes(chunk, big)
    assert view is not None and torch.frombuffer(view, dtype=torch.uint8).data_ptr() == big.data_ptr() + MIB
    with pytest.raises(PlanError, match=r"w: .* no longer has the 2097152 bytes planned"):
        in_place_bytes(m, big[:512])


def mixed(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    lazy_value = rand(512, 1024)
    return {
        "embed": rand(2048, 1024),  # 4 MiB: chunked over the 3 MiB buckets, sent in place
        "layers.0.w": rand(1024, 1024),  # 2 MiB, in place
        "layers.0.wt": rand(1024, 1024).t(),  # 2 MiB, not contiguous: packed
        "layers.0.norm": rand(1024),  # small: packed
        "layers.0.lazy": Lazy((512, 1024), torch.bfloat16, lambda out: out.copy_(lazy_value)),  # 1 MiB, written into the bucket
        "layers.1.w": rand(1536, 1024),  # 3 MiB: a bucket of its own
        "layers.1.scale": torch.tensor(float(seed), dtype=torch.float32),
        "_lazy_value": lazy_value,
    }


@pytest.mark.integration
@pytest.mark.parametrize("checksum", [None, "xxh3"])
def test_a_push_with_tensors_sent_in_place_is_bit_exact_and_skips_their_pack_copy(checksum: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if checksum:
        pytest.importorskip("xxhash")
    packed: set[str] = set()
    pack = refit.send.pack

    def spy(bucket: torch.Tensor, metas: list[TensorMeta], *args: Any, **kw: Any) -> None:
        packed.update(m.name for m in metas)
        pack(bucket, metas, *args, **kw)

    monkeypatch.setattr(refit.send, "pack", spy)
    first = mixed(1)
    target = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in first.items() if not k.startswith("_")}
    rx = RefitReceiver(target, "zmq", name="rx")
    t = threading.Thread(target=rx.serve, kwargs={"poll": 0.2}, daemon=True)
    t.start()
    try:
        with Refitter("zmq", peers=[rx.info()], bucket_bytes=3 * MIB, frame_bytes=MIB, timeout=30, checksum=checksum) as r:
            for seed in (1, 2):
                values = mixed(seed)
                lazy_value = values.pop("_lazy_value")
                packed.clear()
                report = r.push(values)
                expected = {k: (lazy_value if k == "layers.0.lazy" else v) for k, v in values.items()}
                assert digest(target) == digest(expected) and not rx.torn
                assert report.buckets >= 4
                assert packed == {"layers.0.wt", "layers.0.norm", "layers.0.lazy", "layers.1.scale"}  # the rest went in place
    finally:
        rx.stop()
        t.join(30)
        rx.close()
    assert not t.is_alive()


@pytest.mark.integration
def test_frames_as_large_as_a_bucket_keep_one_frame_per_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    """frame_bytes >= bucket_bytes asks for one frame per bucket (a CPU receiver applies it from
    the frame, no copy): nothing is sent in place, which would split the bucket at tensor edges."""
    frames_per_bucket: list[int] = []
    get_bucket = ZmqReceiver._bucket

    def spy(self: ZmqReceiver, msg: Any, frames: Any) -> tuple[torch.Tensor, bool]:
        frames_per_bucket.append(len(frames))
        return get_bucket(self, msg, frames)

    monkeypatch.setattr(ZmqReceiver, "_bucket", spy)
    values = {f"w{i}": torch.randn(1024, 1024).to(torch.bfloat16) for i in range(3)}  # 2 MiB each
    target = {k: torch.zeros_like(v) for k, v in values.items()}
    rx = RefitReceiver(target, "zmq", name="rx")
    t = threading.Thread(target=rx.serve, kwargs={"poll": 0.2}, daemon=True)
    t.start()
    try:
        with Refitter("zmq", peers=[rx.info()], bucket_bytes=4 * MIB, frame_bytes=4 * MIB, timeout=30) as r:
            r.push(values)
            assert not r.sender.sends_in_place
    finally:
        rx.stop()
        t.join(30)
        rx.close()
    assert digest(target) == digest(values) and frames_per_bucket and set(frames_per_bucket) == {1}
