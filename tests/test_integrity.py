"""Per-bucket checksums: one byte flipped after the checksum was taken is caught on every
transport before the bucket is applied; clean pushes with checksums on stay bit-exact.

The corruption is injected on the sender, between the checksum (taken by ``refit.send`` right
after packing) and the transport's send: the bytes that leave are not the bytes checked, as
when a NIC, a shared-memory segment or a GPU corrupts them on the way. Receivers run in a thread
of this process (the transports are the same as across processes; tests/test_*_gloo.py and
friends cover the process boundaries).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
import xxhash

from refit import Refitter
from refit.digest import digest
from refit.errors import IntegrityError, RefitError, TornStateError, TransportError, WireError
from refit.integrity import Checksum, bucket_checksum, check_checksum_option, pick
from refit.load import Loader
from refit.plan import PlanEntry, plan
from refit.receiver import RefitReceiver
from refit.resolve import TensorsResolver
from refit.wire import Bucket, Hello, Verdict, decode, encode

BUCKET = 64 << 10
RX_TX: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # receiver and sender options
    "zmq": ({}, {}),
    "cuda_ipc": ({"device": "cpu"}, {"device": "cpu"}),  # the shared-memory twin
    "nccl": ({"device": "cpu"}, {"device": "cpu", "backend": "gloo"}),  # the gloo path
}


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {f"layers.{i}.w": torch.randn(64, 256, generator=g) for i in range(6)}  # one bucket each
    out["big"] = torch.randn(40_000, generator=g).to(torch.bfloat16)  # 80 KB: chunked over two buckets
    out["odd"] = torch.randint(0, 255, (13,), dtype=torch.uint8, generator=g)  # a bucket of odd length
    return out


# ---------------------------------------------------------------- the algorithms


@pytest.mark.unit
def test_xxh3_is_xxhash_of_the_bytes() -> None:
    data = torch.randint(0, 256, (1001,), dtype=torch.uint8)
    assert bucket_checksum(Checksum.XXH3, data) == xxhash.xxh3_64_digest(bytes(data.tolist()))
    assert bucket_checksum(Checksum.XXH3, torch.empty(0, dtype=torch.uint8)) == xxhash.xxh3_64_digest(b"")


@pytest.mark.unit
@pytest.mark.parametrize("algorithm", list(Checksum))
@pytest.mark.parametrize("n", [1, 7, 8, 1000, 1003, (1 << 22) * 8 + 5])  # the last spans two reduction chunks
def test_every_single_byte_flip_and_word_swap_is_caught(algorithm: Checksum, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    good = bucket_checksum(algorithm, data)
    assert len(good) == (8 if algorithm is Checksum.XXH3 else 16) and bucket_checksum(algorithm, data.clone()) == good
    for pos in sorted({0, n // 2, n - 1, max(0, n - 9)}):
        for flip in (1, 0x80, 0xFF):
            bad = data.clone()
            bad[pos] ^= flip
            assert bucket_checksum(algorithm, bad) != good, f"flip {flip:#x} at {pos} of {n} missed"
    if n >= 16:  # two 64-bit words swapped: a plain sum would miss it
        swapped = data.clone()
        swapped[:8], swapped[8:16] = data[8:16].clone(), data[:8].clone()
        if not torch.equal(swapped, data):
            assert bucket_checksum(algorithm, swapped) != good
    assert bucket_checksum(algorithm, torch.cat([data, torch.zeros(1, dtype=torch.uint8)])) != good  # a trailing zero counts


@pytest.mark.unit
def test_options_are_validated() -> None:
    assert check_checksum_option(None) is None and check_checksum_option("auto") == "auto"
    assert pick("auto", torch.device("cpu")) is Checksum.XXH3 and pick("auto", torch.device("cuda", 0)) is Checksum.SUM64
    for bad in ("md5", 3, "XXH3", ["xxh3"]):
        with pytest.raises(RefitError, match="checksum must be None"):
            check_checksum_option(bad)
        with pytest.raises(RefitError, match="checksum must be None"):
            Refitter("local", target={"a": torch.zeros(1)}, checksum=bad)  # type: ignore[arg-type]
    with pytest.raises(RefitError, match="record_digests"):
        Refitter("local", target={"a": torch.zeros(1)}, record_digests="yes")  # type: ignore[arg-type]


@pytest.mark.unit
def test_wire_carries_and_validates_checksums() -> None:
    m = plan([PlanEntry("a", (4,), torch.float32)], bucket_bytes=1024)
    hello = Hello(1, 2, m.digest, m, 2, b"", "xxh3", True)
    assert decode(encode(hello)) == hello
    assert decode(encode(Verdict(1, True, False, (), "rx", "sum64"))).checksum == "sum64"  # type: ignore[union-attr]
    top = Bucket(1, 0, 16, 0, b"\xff" * 16)
    assert decode(encode(top)) == top and decode(encode(Bucket(1, 0, 16))).checksum is None  # type: ignore[union-attr]
    old = encode(Hello(1, 2, m.digest, m, 2))
    assert b"checksum" not in old and decode(old) == Hello(1, 2, m.digest, m, 2)  # off: the wire is as before
    import msgpack

    for field, value in [("checksum", "md5"), ("checksum", 5), ("record", 1)]:
        d = msgpack.unpackb(encode(hello), raw=False)
        d[field] = value
        with pytest.raises(WireError, match=field):
            decode(msgpack.packb(d, use_bin_type=True))
    for value in (-1, b"", b"x" * 33, "00"):
        d = msgpack.unpackb(encode(top), raw=False)
        d["checksum"] = value
        with pytest.raises(WireError, match="checksum"):
            decode(msgpack.packb(d, use_bin_type=True))


@pytest.mark.unit
def test_loader_refuses_a_bucket_without_its_checksum_and_a_corrupt_one() -> None:
    target = {"a": torch.zeros(64), "b": torch.zeros(64)}
    m = plan([PlanEntry("a", (64,), torch.float32), PlanEntry("b", (64,), torch.float32)], bucket_bytes=256)
    loader = Loader(TensorsResolver(target), name="rx")
    data = torch.ones(256, dtype=torch.uint8)
    assert loader.prepare(m, 1, checksum="xxh3") == []
    with pytest.raises(IntegrityError, match="bucket 0 came without"):
        loader.apply(0, data)
    assert not loader.torn and not loader.active and torch.equal(target["a"], torch.zeros(64))
    assert loader.prepare(m, 1, checksum="xxh3") == []
    loader.apply(0, data, checksum=bucket_checksum(Checksum.XXH3, data))
    with pytest.raises(IntegrityError, match=r"bucket 1 is corrupt.*holds b"):
        loader.apply(1, data, checksum=bytes(8))
    assert loader.torn and torch.equal(target["b"], torch.zeros(64))  # bucket 1 not applied; bucket 0 was
    with pytest.raises(TornStateError, match="a"):
        loader.check_serving()


# ---------------------------------------------------------------- every transport


@contextlib.contextmanager
def pushing(transport: str, target: dict[str, torch.Tensor], device: str = "cpu", **refitter: Any) -> Iterator[tuple[Refitter, Any]]:
    """A Refitter to one receiver of ``transport`` (in a thread; the sender's own loader for
    ``local``) and that receiver's loader-like object (``torn``, ``check_serving``)."""
    if transport == "local":
        with Refitter("local", target=target, bucket_bytes=BUCKET, **refitter) as r:
            yield r, r.sender.loader  # type: ignore[attr-defined]
        return
    rx_opts, tx_opts = RX_TX[transport]
    if device != "cpu":
        rx_opts, tx_opts = {**rx_opts, "device": device}, {**tx_opts, "device": device}
    rx = RefitReceiver(target, transport, name="rx", **rx_opts)
    t = threading.Thread(target=rx.serve, kwargs={"poll": 0.2}, daemon=True)
    t.start()
    try:
        with Refitter(transport, peers=[rx.info()], bucket_bytes=BUCKET, timeout=30, **tx_opts, **refitter) as r:
            yield r, rx
    finally:
        rx.stop()
        t.join(30)
        rx.close()
    assert not t.is_alive()


def corrupt(r: Refitter, bucket: int) -> list[int]:
    """Flip one byte of ``bucket`` after its checksum was taken, before the transport sends it
    (once: nccl's send of bucket 0 runs twice, broadcast then header)."""
    original, done = r.sender.send, list[int]()

    def send(index: int, slot: int, nbytes: int, **kw: Any) -> None:
        if index == bucket and not done:
            buf = r.sender.buffers(r.bucket_bytes, r.num_buffers)[slot]
            buf[nbytes // 2] ^= 0x10
            done.append(index)
        original(index, slot, nbytes, **kw)

    r.sender.send = send  # type: ignore[method-assign]
    if r.sender.sends_in_place:  # zmq: the bucket is sent as pieces, some of them the tensors' own bytes
        send_pieces = r.sender.send_pieces

        def send_in_place(index: int, slot: int, pieces: Sequence[memoryview], checksum: bytes | None = None) -> None:
            if index == bucket and not done:
                data = bytearray(b"".join(pieces))
                data[len(data) // 2] ^= 0x10  # a copy: the trainer's tensors stay as they were
                pieces = [memoryview(data)]
                done.append(index)
            send_pieces(index, slot, pieces, checksum)

        r.sender.send_pieces = send_in_place  # type: ignore[method-assign]
    return done


TRANSPORTS = ["local", *sorted(RX_TX)]


@pytest.mark.integration
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_clean_push_with_checksums_is_bit_exact(transport: str) -> None:
    target = {k: torch.zeros_like(v) for k, v in state(0).items()}
    with pushing(transport, target, checksum="auto") as (r, rx):
        for seed in (1, 2):
            report = r.push(state(seed))
            assert digest(target) == digest(state(seed)) and report.buckets == 8 and not rx.torn
            assert report.seconds["checksum"] >= 0 and report.receivers[0].seconds["checksum"] >= 0  # both sides checked
        assert r.sender.checksum is Checksum.XXH3


@pytest.mark.integration
@pytest.mark.parametrize("algorithm", ["xxh3", "sum64"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_corrupt_bucket_is_refused_before_it_is_applied(transport: str, algorithm: str) -> None:
    check_corruption_refused(transport, algorithm, "cpu")


def check_corruption_refused(transport: str, algorithm: str, device: str) -> None:
    target = {k: torch.zeros_like(v, device=device) for k, v in state(0).items()}
    with pushing(transport, target, device, checksum=algorithm) as (r, rx):
        r.push(state(1))
        before = {k: v.clone() for k, v in target.items()}
        # the first bucket: refused, the target bit for bit as it was, not torn
        flipped = corrupt(r, 0)
        with pytest.raises(TransportError, match=rf"bucket 0 is corrupt: its {algorithm} checksum .* layers\.0\.w"):
            r.push(state(2))
        assert flipped == [0] and digest(target) == digest(before) and not rx.torn
        rx.check_serving()
        # a later bucket (the second half of the chunked "big"): buckets before it applied, so torn
        flipped = corrupt(r, 7)
        with pytest.raises(TransportError, match=r"bucket 7 is corrupt.*\(it holds big, odd\)"):
            r.push(state(3))
        assert flipped == [7] and rx.torn
        assert torch.equal(target["odd"], before["odd"]), "nothing of the corrupt bucket may be applied"
        with pytest.raises(TornStateError, match="big"):
            rx.check_serving()
        # a clean push heals it
        del r.sender.send  # the class method again
        if r.sender.sends_in_place:
            del r.sender.send_pieces
        r.push(state(4))
        assert digest(target) == digest(state(4)) and not rx.torn


@pytest.mark.integration
def test_receiver_that_does_not_verify_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A receiver that predates checksums accepts without echoing the algorithm: the sender
    stops the push before any bucket rather than believe it checked."""
    import refit.transports.control as control

    real = control.Verdict
    monkeypatch.setattr(control, "Verdict", lambda *a: real(*a[:5]))  # drops the echo, like an older receiver
    target = {k: torch.zeros_like(v) for k, v in state(0).items()}
    with pushing("zmq", target, checksum="xxh3") as (r, rx):
        with pytest.raises(TransportError, match="does not verify xxh3 checksums"):
            r.push(state(1))
        assert digest(target) == digest({k: torch.zeros_like(v) for k, v in state(0).items()}) and not rx.torn


# ---------------------------------------------------------------- device buckets (the accelerator machine)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_sum64_on_the_gpu_agrees_with_the_cpu_and_catches_flips() -> None:
    for n in (13, 1 << 20, (1 << 22) * 8 + 3):
        data = torch.randint(0, 256, (n,), dtype=torch.uint8)
        gpu = data.cuda()
        assert bucket_checksum(Checksum.SUM64, gpu) == bucket_checksum(Checksum.SUM64, data)
        gpu[n // 3] ^= 4
        assert bucket_checksum(Checksum.SUM64, gpu) != bucket_checksum(Checksum.SUM64, data)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("transport", ["local", "cuda_ipc"])
def test_gpu_buckets_corruption_refused(transport: str) -> None:
    assert pick("auto", torch.device("cuda")) is Checksum.SUM64
    check_corruption_refused(transport, "sum64", "cuda")
