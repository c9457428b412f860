"""The zmq transport's framing: a bucket travels as frames of at most ``frame_bytes``, which the
receiver copies into a staging bucket it reuses (see refit/transports/zmq.py for why)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("zmq")

from refit import Refitter, TransportError
from refit.errors import WireError
from refit.transports.zmq import DEFAULT_FRAME_BYTES, ZmqReceiver, split_frames
from refit.wire import Bucket
from tests import procs
from tests.test_zmq import mixed_state, receivers, spec_of


class _Frame:
    def __init__(self, data: bytes) -> None:
        self.buffer = memoryview(bytearray(data))  # received ZMQ frames are writable


@pytest.mark.unit
def test_split_frames_covers_the_bytes_in_order() -> None:
    mem = memoryview(bytes(range(256)) * 40)  # 10240 bytes
    frames = split_frames(mem, 4096)
    assert [len(f) for f in frames] == [4096, 4096, 2048]
    assert b"".join(bytes(f) for f in frames) == bytes(mem)
    assert split_frames(memoryview(b""), 4096) == []
    assert [len(f) for f in split_frames(mem)] == [10240]  # the default (1 MiB) keeps a small bucket whole
    assert DEFAULT_FRAME_BYTES <= 32 << 20  # glibc reuses memory it serves for requests up to 32 MiB


@pytest.mark.unit
@pytest.mark.parametrize("bad", [0, 4095, True, "8M", 8.0, 1 << 41])
def test_a_bad_frame_size_is_refused_naming_the_option(bad: Any) -> None:
    with pytest.raises(TransportError, match="frame_bytes must be an int in"):
        Refitter("zmq", peers=["tcp://127.0.0.1:1"], frame_bytes=bad)


@pytest.mark.integration
def test_frames_that_do_not_add_up_to_the_header_are_a_wire_error() -> None:
    rx = ZmqReceiver(name="rx-frames")
    try:
        with pytest.raises(WireError, match="rx-frames: bucket 3 header says 8192 bytes, its 2 frames hold 6144"):
            rx._bucket(Bucket(1, 3, 8192), [_Frame(bytes(4096)), _Frame(bytes(2048))])
        with pytest.raises(WireError, match="its 3 frames hold 8192"):  # an empty frame in a bucket's bytes
            rx._bucket(Bucket(1, 3, 8192), [_Frame(bytes(4096)), _Frame(b""), _Frame(bytes(4096))])
        data, staged = rx._bucket(Bucket(1, 0, 8192, slot=1), [_Frame(bytes([1]) * 4096), _Frame(bytes([2]) * 4096)])
        assert staged and bytes(data[:4096].tolist()) == bytes([1]) * 4096 and bytes(data[4096:].tolist()) == bytes([2]) * 4096
        data, staged = rx._bucket(Bucket(1, 1, 4096), [_Frame(bytes([3]) * 4096)])
        assert not staged  # one frame: a view of it, no copy
    finally:
        rx.close()


@pytest.mark.integration
@pytest.mark.parametrize("checksum", [None, "xxh3"])
def test_buckets_in_many_frames_land_bit_for_bit_push_after_push(checksum: str | None) -> None:
    """16 KiB buckets in 4 KiB frames, two pushes of different values through the same staging
    buffers, a 12 kB tensor chunked over buckets, 0-d scales; with and without checksums."""
    if checksum:
        pytest.importorskip("xxhash")
    state, scales = mixed_state(3)
    with receivers(spec_of(state, scales), pushes=2) as [rx]:
        with Refitter("zmq", peers=[rx.info["address"]], bucket_bytes=16384, frame_bytes=4096, timeout=20, checksum=checksum) as r:
            assert r.sender.frame_bytes == 4096  # type: ignore[attr-defined]
            r.push(state, scales)
            state2, scales2 = mixed_state(4)
            rep = r.push(state2, scales2)
        assert rep.buckets > 1
        digests, version, torn, _ = rx.final()[1:]
    assert digests == procs.digests({**state2, **scales2})
    assert (version, torn) == (2, False)


@pytest.mark.integration
def test_a_staged_bucket_is_reused_and_its_bytes_are_copied() -> None:
    """A bucket of several frames lands in the slot's staging buffer (the frames can be freed at
    once); the same slot's next bucket reuses the buffer."""
    rx = ZmqReceiver(name="rx-stage")
    try:
        first, _ = rx._bucket(Bucket(1, 0, 8192, slot=0), [_Frame(bytes(4096)), _Frame(bytes(4096))])
        second, _ = rx._bucket(Bucket(1, 2, 8192, slot=0), [_Frame(bytes([7]) * 4096), _Frame(bytes([7]) * 4096)])
        assert first.data_ptr() == second.data_ptr()
        assert torch.equal(second, torch.full((8192,), 7, dtype=torch.uint8))
    finally:
        rx.close()
