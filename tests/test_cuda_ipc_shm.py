"""``cuda_ipc`` on hosts without CUDA: the same transport over ``/dev/shm`` buckets.

Two processes (spawn) exchange pushes of every dtype, 0-d scales and chunked tensors and the
receiver checks every tensor bit for bit; the buffer set is shared once and cached; 100 pushes
leak no segment; placement mismatches, foreign senders and restarted receivers are refused with
a clear verdict and heal on the next push.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import torch

from refit import Lazy, Refitter, ResolveError
from refit.errors import WireError
from refit.pack import raw
from refit.receiver import RefitReceiver
from refit.transports.cuda_ipc import CudaIpcReceiver, CudaIpcSender
from refit.transports.shared_buffers import _SHM_DIR, Kind, Offer, Sync, decode_offer
from tests import procs
from tests.conftest import every_dtype_state, same_bits

pytestmark = pytest.mark.integration

BUCKET = 32 << 10  # small buckets: many buckets and a chunked tensor per push


def make_state(version: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Deterministic (state, scales) of ``version``: every dtype, a chunked tensor, 0-d scales."""
    gen = torch.Generator().manual_seed(version)
    state = every_dtype_state(gen)
    state["big.weight"] = torch.randn(300, 70, generator=gen)  # 84,000 bytes: 3+ chunks
    state["big.bf16"] = torch.randn(50_000, generator=gen).to(torch.bfloat16)
    scales = {
        "big.weight_scale": (torch.rand((), generator=gen) + 0.5).to(torch.bfloat16),
        "attn.k_scale": torch.rand((), generator=gen) + 0.5,
        "attn.v_scale": torch.rand((), generator=gen) + 0.5,
        "big.input_scale": torch.rand(4, generator=gen) + 0.5,
    }
    return state, scales


def targets() -> dict[str, torch.Tensor]:
    state, scales = make_state(0)
    return {k: procs.zeros_like(v) for k, v in {**state, **scales}.items()}


def refit_segments(pid: int | None = None) -> set[str]:
    tag = f"refit_{pid:x}_" if pid is not None else "refit_"
    return {n for n in os.listdir(_SHM_DIR) if n.startswith(tag)}


def _receiver_main(conn: Any, pushes: int, address: str | None) -> None:
    """Child: serve ``pushes`` pushes; check each bit for bit against make_state(version)."""
    dst = targets()
    opts: dict[str, Any] = {"address": address} if address else {}
    with RefitReceiver(dst, "cuda_ipc", device="cpu", name="child", **opts) as rx:
        conn.send_bytes(msgpack.packb(rx.info()))
        bad: list[str] = []
        versions: list[int] = []
        handles: list[int] = []
        for _ in range(pushes):
            report = rx.receive(timeout=60)
            state, scales = make_state(report.version)
            bad += [f"v{report.version}:{k}" for k, v in {**state, **scales}.items() if not same_bits(dst[k], v)]
            versions.append(report.version)
            handles.append(len(rx.transport._sets))  # type: ignore[attr-defined]
        conn.send_bytes(msgpack.packb({"bad": bad, "versions": versions, "sets": handles, "loaded": report.loaded}))
        conn.recv_bytes()  # keep the mapping open until the parent has looked


def spawn_receiver(pushes: int, address: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver_main, args=(child, pushes, address), daemon=True)
    proc.start()
    for _ in range(240):
        if parent.poll(0.5) or not proc.is_alive():
            break
    if not parent.poll(0):
        proc.kill()
        pytest.fail(f"receiver process did not start (exit code {proc.exitcode})")
    return proc, parent, msgpack.unpackb(parent.recv_bytes())


@pytest.fixture
def thread_receiver() -> Iterator[tuple[RefitReceiver, dict[str, torch.Tensor]]]:
    dst = targets()
    rx = RefitReceiver(dst, "cuda_ipc", device="cpu", name="rx")
    yield rx, dst
    rx.close()


def serve(rx: RefitReceiver, pushes: int) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:  # ``pushes`` outcomes (a report or an error); a stray Abort is none
        done = 0
        while done < pushes:
            try:
                done += rx.transport.receive(rx.loader, 30) is not None
            except BaseException as exc:
                errors.append(exc)
                done += 1

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


# ---------------------------------------------------------------- two processes


def test_two_processes_bit_exact_every_dtype_chunked_and_scales() -> None:
    proc, conn, info = spawn_receiver(pushes=3)
    try:
        assert info["uuid"] == "" and info["pid"] == proc.pid
        sender = CudaIpcSender.for_receivers([info], timeout=60)
        assert isinstance(sender, CudaIpcSender)  # for_receivers is typed as returning the base Sender
        assert sender.kind is Kind.SHM and sender.sync is Sync.STREAM
        with Refitter(sender, bucket_bytes=BUCKET, num_buffers=2) as r:
            for v in (1, 2, 3):
                state, scales = make_state(v)
                report = r.push(state, scales, version=v)
                assert report.buckets > 4 and report.receivers[0].version == v
                assert sender.staging_bytes <= 2 * BUCKET
            result = msgpack.unpackb(conn.recv_bytes())
            assert result["bad"] == []
            assert result["versions"] == [1, 2, 3]
            assert result["sets"] == [1, 1, 1]  # opened once, cached across pushes
            assert result["loaded"] == len(targets())
            assert len(refit_segments(os.getpid())) == 2
        assert refit_segments(os.getpid()) == set()  # close() unlinked them
        conn.send_bytes(b"bye")
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        proc.kill()


def test_hundred_pushes_leak_no_segment_and_share_handles_once() -> None:
    proc, conn, info = spawn_receiver(pushes=100)
    before = refit_segments()
    try:
        sender = CudaIpcSender([info], timeout=60)
        offers: list[Offer] = []
        make_offer = sender._offer

        def recording_offer(i: int) -> bytes:
            b = make_offer(i)
            offers.append(decode_offer(b))
            return b

        sender._offer = recording_offer  # type: ignore[method-assign]  # spy on the offers it makes
        fds = len(os.listdir("/proc/self/fd"))
        with Refitter(sender, bucket_bytes=BUCKET, num_buffers=2) as r:
            state, scales = make_state(7)
            for v in range(1, 101):
                r.push(state, scales, version=v)
                assert len(refit_segments(os.getpid())) == 2
            assert len(os.listdir("/proc/self/fd")) <= fds + 2
        result = msgpack.unpackb(conn.recv_bytes())
        assert result["versions"] == list(range(1, 101)) and result["sets"] == [1] * 100
        assert offers[0].buffers is not None and all(o.buffers is None for o in offers[1:])
        assert len({o.set_id for o in offers}) == 1
        conn.send_bytes(b"bye")
        proc.join(30)
        assert proc.exitcode == 0
        assert refit_segments() - before == set()
    finally:
        proc.kill()


_CRASH = """
import os, torch
from refit.transports.shared_buffers import Kind, SharedBuffers
s = SharedBuffers(Kind.SHM, torch.device("cpu"), 1 << 16, 2)
print(" ".join(s.handles), flush=True)
os._exit(1)  # no close(): the resource tracker must unlink the segments
"""


def test_crashed_sender_segments_are_unlinked() -> None:
    if _SHM_DIR != "/dev/shm":
        pytest.skip("the resource tracker cleans /dev/shm segments only")
    # A process of its own (not a multiprocessing child, which would share pytest's tracker).
    out = subprocess.run([sys.executable, "-c", _CRASH], capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    names = set(out.stdout.split())
    assert len(names) == 2, out.stderr
    for _ in range(100):
        if not names & refit_segments():
            break
        threading.Event().wait(0.1)
    assert not names & refit_segments()


# ---------------------------------------------------------------- one process (logic)


def test_in_process_borrows_the_set_and_lazy_fills(thread_receiver: tuple[RefitReceiver, dict[str, torch.Tensor]]) -> None:
    rx, dst = thread_receiver
    state, scales = make_state(5)
    lazy: dict[str, torch.Tensor | Lazy] = dict(state)
    # an unchunked and a chunked Lazy: fill() lands in the shared bucket / is materialized once
    lazy["big.bf16"] = Lazy(state["big.bf16"].shape, torch.bfloat16, lambda out: out.copy_(state["big.bf16"]))
    lazy["big.weight"] = Lazy(state["big.weight"].shape, torch.float32, lambda out: out.copy_(state["big.weight"]))
    t, errors = serve(rx, 1)
    with Refitter(CudaIpcSender([rx.info()]), bucket_bytes=BUCKET) as r:
        r.push(lazy, scales, version=5)
    t.join(30)
    assert not errors
    assert all(same_bits(dst[k], v) for k, v in {**state, **scales}.items())
    assert rx.transport.open_handles == 0  # type: ignore[attr-defined]


def test_buffer_set_changes_are_followed(thread_receiver: tuple[RefitReceiver, dict[str, torch.Tensor]]) -> None:
    rx, dst = thread_receiver
    t, errors = serve(rx, 3)
    sender = CudaIpcSender([rx.info()], num_buffers=2)
    state, scales = make_state(9)
    small = {k: v for k, v in state.items() if v.numel() * v.element_size() < 1000}
    r = Refitter(sender, bucket_bytes=1 << 20, num_buffers=3)  # configure() sizes the first set
    r.push(small, scales)
    first = sender._set
    assert first is not None and first.count == 3 and first.capacity == 1 << 20
    r = Refitter(sender, bucket_bytes=1 << 20, num_buffers=2)  # another driver asks for 2: a new set, the old one unlinked
    r.push(state, scales)
    second = sender._set
    assert second is not None and second.count == 2 and second.set_id != first.set_id
    assert len(refit_segments(os.getpid())) == 2
    r.push(state, scales)
    t.join(30)
    r.close()
    assert not errors
    assert all(same_bits(dst[k], v) for k, v in {**state, **scales}.items())
    assert len(rx.transport._sets) == 1  # type: ignore[attr-defined]
    assert refit_segments(os.getpid()) == set()


def test_other_host_is_refused_before_anything_loads(thread_receiver: tuple[RefitReceiver, dict[str, torch.Tensor]]) -> None:
    rx, dst = thread_receiver
    rx.transport.host = "another-host"  # type: ignore[attr-defined]
    t, errors = serve(rx, 1)
    state, scales = make_state(3)
    with Refitter(CudaIpcSender([rx.info()]), bucket_bytes=BUCKET) as r, pytest.raises(ResolveError, match="same host"):
        r.push(state, scales)
    t.join(30)
    assert len(errors) == 1 and "same host" in str(errors[0])
    assert all(not raw(v).any() for v in dst.values())
    assert rx.version == 0 and not rx.torn


def test_receiver_that_lost_the_set_is_refused_once_then_heals(thread_receiver: tuple[RefitReceiver, dict[str, torch.Tensor]]) -> None:
    rx, dst = thread_receiver
    state, scales = make_state(4)
    r = Refitter(CudaIpcSender([rx.info()], timeout=20), bucket_bytes=BUCKET)
    t, errors = serve(rx, 1)
    r.push(state, scales)
    t.join(30)
    for mapped in rx.transport._sets.values():  # type: ignore[attr-defined]
        mapped.close()
    rx.transport._sets.clear()  # type: ignore[attr-defined]  # as after a receiver restart
    t, errors = serve(rx, 2)
    with pytest.raises(ResolveError, match="not open here"):
        r.push(state, scales)
    r.push(state, scales, version=8)  # the sender sent its handles again
    t.join(30)
    r.close()
    assert rx.version == 8 and len(errors) == 1
    assert all(same_bits(dst[k], v) for k, v in {**state, **scales}.items())


def test_zmq_sender_reaching_a_cuda_ipc_receiver_is_refused(thread_receiver: tuple[RefitReceiver, dict[str, torch.Tensor]]) -> None:
    rx, _ = thread_receiver
    t, errors = serve(rx, 1)
    state, scales = make_state(2)
    with Refitter("zmq", peers=[rx.info()["address"]], bucket_bytes=BUCKET) as r, pytest.raises(ResolveError, match="transport 'cuda_ipc'"):
        r.push(state, scales)
    t.join(30)
    assert len(errors) == 1


def test_options_are_checked() -> None:
    with pytest.raises(Exception, match="sync must be"):
        CudaIpcSender(["ipc:///tmp/x"], sync="sometimes")
    with pytest.raises(Exception, match="sync='event' needs CUDA"):
        CudaIpcSender(["ipc:///tmp/x"], sync="event")
    with pytest.raises(Exception, match="'address'"):
        CudaIpcSender([{"uuid": ""}])
    with pytest.raises(Exception, match="cuda_ipc supports"):
        CudaIpcReceiver(device="meta")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"v": 2}, "extra"),
        ({"kind": "tcp"}, "extra.kind"),
        ({"count": 0}, "extra.count"),
        ({"buffers": ["../../etc/passwd"]}, "extra.buffers"),
        ({"buffers": ["refit_1_2_0", "refit_1_2_1"]}, "extra.buffers"),
        ({"capacity": -1}, "extra.capacity"),
        ({"place": 7}, "extra.place"),
    ],
)
def test_offer_decoder_names_the_bad_field(change: dict[str, Any], field: str) -> None:
    good = Offer(Kind.SHM, 1, 2, 3, "host", 4096, 1, Sync.STREAM, ("refit_1_2_0",), None)
    assert decode_offer(good.encode()) == good
    d = msgpack.unpackb(good.encode())
    d.update(change)
    with pytest.raises(WireError, match=field.replace(".", r"\.")):
        decode_offer(msgpack.packb(d))
    with pytest.raises(WireError, match="not a cuda_ipc offer"):
        decode_offer(b"\xc1garbage")
