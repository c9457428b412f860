"""The zmq transport between real processes: data, fan-out, refusals, failures, leaks, garbage."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from refit import Lazy, Refitter, ResolveError, TransportError
from refit.meta import Role, dtype_name
from refit.plan import PlanEntry, plan
from refit.send import stream
from tests import procs
from tests.conftest import random_tensor

pytestmark = pytest.mark.integration
CTX = mp.get_context("spawn")


def mixed_state(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    state = {
        "embed.weight": random_tensor((64, 32), torch.bfloat16, g),
        "layers.0.qkv.weight": random_tensor((96, 32), torch.float8_e4m3fn, g),
        "layers.0.o.weight": random_tensor((32, 32), torch.float16, g),
        "layers.0.norm.weight": random_tensor((32,), torch.float32, g),
        "big.weight": random_tensor((3000,), torch.float32, g),  # 12 kB: chunked over 4 kB buckets
        "steps": random_tensor((), torch.int64, g),
        "mask": random_tensor((5,), torch.bool, g),
        "empty": random_tensor((0, 4), torch.float16, g),
    }
    scales = {
        "layers.0.qkv.weight_scale": torch.tensor(0.5, dtype=torch.float32),
        "layers.0.attn.k_scale": torch.tensor(0.125, dtype=torch.bfloat16),
        "layers.0.attn.v_scale": torch.tensor(2.0, dtype=torch.float32),
        "layers.0.o.input_amax": torch.rand(4) + 0.1,
    }
    return state, scales


def spec_of(*dicts: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), dtype_name(v.dtype)) for d in dicts for k, v in d.items()}


class Rx:
    """A receiver process and its queues."""

    def __init__(self, spec: dict[str, Any], **kw: Any) -> None:
        self.out, self.control = CTX.Queue(), CTX.Queue()
        self.proc = CTX.Process(target=procs.zmq_receiver, args=(spec, self.out, self.control), kwargs=kw, daemon=True)
        self.proc.start()
        self.info = self.get("info")[1]

    def get(self, kind: str, timeout: float = 60) -> tuple[Any, ...]:
        msg = self.out.get(timeout=timeout)
        if msg[0] == "crash":
            raise AssertionError(msg[1])
        assert msg[0] == kind, msg
        return msg

    def final(self) -> tuple[Any, ...]:
        while True:
            msg = self.out.get(timeout=120)
            if msg[0] == "crash":
                raise AssertionError(msg[1])
            if msg[0] == "final":
                self.control.put("bye")
                return msg

    def stop(self) -> None:
        self.control.put("bye")
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)


@contextmanager
def receivers(spec: dict[str, Any], n: int = 1, **kw: Any) -> Iterator[list[Rx]]:
    rxs = [Rx(spec, name=f"rx{i}", **kw) for i in range(n)]
    try:
        yield rxs
    finally:
        for r in rxs:
            r.stop()


@pytest.mark.parametrize("scheme", ["tcp", "ipc"])
def test_two_process_push_bit_exact(scheme: str, tmp_path: Any) -> None:
    state, scales = mixed_state()
    address = "tcp://127.0.0.1:*" if scheme == "tcp" else f"ipc://{tmp_path}/rx.sock"
    with receivers(spec_of(state, scales), address=address) as [rx]:
        if scheme == "ipc":
            assert oct(os.stat(f"{tmp_path}/rx.sock").st_mode & 0o777) == "0o600"
        with Refitter("zmq", peers=[rx.info["address"]], bucket_bytes=4096, timeout=20) as r:
            rep = r.push(state, scales, version=7)
        _, report = rx.get("report")
        digests, version, torn, _ = rx.final()[1:]
    assert digests == procs.digests({**state, **scales})
    assert (version, torn) == (7, False)
    assert report["loaded"] == len(state) + len(scales) and rep.receivers[0].peer == "rx0"


def test_fan_out_to_three_receivers() -> None:
    state, scales = mixed_state(1)
    with receivers(spec_of(state, scales), n=3, pushes=2) as rxs:
        with Refitter("zmq", peers=[r.info["address"] for r in rxs], bucket_bytes=4096, timeout=20) as r:
            r.push(state, scales)
            state2, scales2 = mixed_state(2)
            rep = r.push(state2, scales2)
        assert len(rep.receivers) == 3
        for rx in rxs:
            digests, version, torn, _ = rx.final()[1:]
            assert digests == procs.digests({**state2, **scales2}) and version == 2 and not torn


def test_one_gib_push() -> None:
    n = 16
    state = {f"w{i}": torch.full((2**24,), float(i + 1), dtype=torch.float32) for i in range(n)}  # 16 x 64 MiB
    spec = {k: ((2**24,), "float32") for k in state}
    with receivers(spec, timeout=120) as [rx]:
        with Refitter("zmq", peers=[rx.info["address"]], bucket_bytes=128 << 20, timeout=120) as r:
            rep = r.push(state)
        assert rep.bytes == 1 << 30
        digests = rx.final()[1]
    assert digests == procs.digests(state)


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda s, c: s.update({"embed.wieght": s.pop("embed.weight")}), "embed.wieght: no such parameter"),
        (lambda s, c: s.update({"layers.0.o.weight": torch.zeros(32, 31, dtype=torch.float16)}), "shape [32, 31]"),
        (lambda s, c: s.update({"layers.0.norm.weight": torch.zeros(32, dtype=torch.float64)}), "dtype torch.float64"),
        (lambda s, c: c.update({"layers.0.attn.q_scale": torch.tensor(1.0)}), "layers.0.attn.q_scale: no such"),
    ],
)
def test_refusals_leave_target_untouched(mutate: Any, expect: str) -> None:
    state, scales = mixed_state()
    spec = spec_of(state, scales)
    mutate(state, scales)
    with receivers(spec) as [rx]:
        with Refitter("zmq", peers=[rx.info["address"]], bucket_bytes=4096, timeout=20) as r, pytest.raises(ResolveError) as err:
            r.push(state, scales)
        assert expect in str(err.value) and "[rx0]" in str(err.value)
        kind, name, text, torn, version = rx.get("error")
        assert name == "ResolveError" and expect in text and not torn and version == 0
        assert rx.final()[1] == procs.digests(procs.make_target(spec))


def test_require_complete_refuses_partial_push() -> None:
    state, scales = mixed_state()
    spec = spec_of(state, scales)
    del state["embed.weight"]
    with receivers(spec, require_complete=True) as [rx]:
        with Refitter("zmq", peers=[rx.info["address"]], timeout=20) as r, pytest.raises(ResolveError, match="embed.weight: missing"):
            r.push(state, scales)
        assert rx.final()[1] == procs.digests(procs.make_target(spec))


def test_receiver_checks_scales_too() -> None:
    """A sender that skips validation (or corrupts data) is still refused by the receiver."""
    spec = {"k_scale": ((), "float32"), "w": ((8,), "float32")}
    with receivers(spec) as [rx]:
        from refit.transports.zmq import ZmqSender

        sender = ZmqSender([rx.info["address"]], timeout=10)
        m = plan([PlanEntry("k_scale", (), torch.float32, Role.SCALE), PlanEntry("w", (8,), torch.float32)], bucket_bytes=1024)
        sender.handshake(m, 1)
        with pytest.raises(TransportError, match="non-finite"):
            stream(sender, m, {"k_scale": torch.tensor(float("nan")), "w": torch.ones(8)}, num_buffers=2)
            sender.finish()
        sender.close()
        assert rx.get("error")[3] is False  # not torn: refused before applying
        assert rx.final()[1] == procs.digests(procs.make_target(spec))


def _slow_sender(address: str, out: Any) -> None:
    def stall(t: torch.Tensor) -> None:
        out.put("stalled")
        time.sleep(600)

    state: dict[str, Any] = {f"w{i}": torch.ones(1024) for i in range(4)}
    state["w4"] = Lazy((1024,), torch.float32, stall)
    Refitter("zmq", peers=[address], bucket_bytes=4096, num_buffers=1, timeout=60).push(state)


def test_sender_killed_mid_stream_leaves_receiver_torn() -> None:
    spec = {f"w{i}": ((1024,), "float32") for i in range(5)}
    with receivers(spec, timeout=8, pushes=2) as [rx]:
        out = CTX.Queue()
        sender = CTX.Process(target=_slow_sender, args=(rx.info["address"], out), daemon=True)
        sender.start()
        assert out.get(timeout=60) == "stalled"
        time.sleep(0.5)
        os.kill(sender.pid, signal.SIGKILL)  # type: ignore[arg-type]
        sender.join(timeout=10)
        t0 = time.monotonic()
        kind, name, text, torn, version = rx.get("error", timeout=30)
        assert name == "TransportError" and "went silent" in text and "phase buckets" in text
        assert torn and version == 0 and time.monotonic() - t0 < 12
        # the receiver keeps serving: a complete push clears the torn state
        state = {f"w{i}": torch.full((1024,), 2.0) for i in range(5)}
        with Refitter("zmq", peers=[rx.info["address"]], bucket_bytes=4096, timeout=20) as r:
            r.push(state, version=9)
        digests, version, torn, _ = rx.final()[1:]
        assert digests == procs.digests(state) and version == 9 and not torn


def test_receiver_killed_sender_times_out() -> None:
    spec = {f"w{i}": ((1024,), "float32") for i in range(6)}
    with receivers(spec, timeout=60) as [rx]:
        pid = rx.proc.pid

        def kill(t: torch.Tensor) -> None:
            os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]
            rx.proc.join(timeout=10)
            t.fill_(1.0)

        state: dict[str, Any] = {f"w{i}": torch.ones(1024) for i in range(6)}
        state["w2"] = Lazy((1024,), torch.float32, kill)
        t0 = time.monotonic()
        with Refitter("zmq", peers=[rx.info["address"]], bucket_bytes=4096, num_buffers=1, timeout=2) as r:
            with pytest.raises(TransportError, match=r"did not answer within 2 s \(phase buckets, bucket \d\)"):
                r.push(state)
        assert time.monotonic() - t0 < 15


def test_two_hundred_pushes_no_leaks() -> None:
    state, scales = mixed_state()
    with receivers(spec_of(state, scales), pushes=200) as [rx]:
        fds0 = procs.open_fds()
        with Refitter("zmq", peers=[rx.info["address"]], bucket_bytes=4096, timeout=20) as r:
            for i in range(200):
                state["steps"] = torch.tensor(i)
                r.push(state, scales)
                if i == 20:
                    fds20, rss20 = procs.open_fds(), procs.rss_mb()
            fds_end, rss_end = procs.open_fds(), procs.rss_mb()
        digests, version, torn, stats = rx.final()[1:]
    assert digests == procs.digests({**state, **scales}) and version == 200
    assert fds_end == fds20 and fds20 - fds0 <= 8, (fds0, fds20, fds_end)
    assert rss_end - rss20 < 30, (rss20, rss_end)
    assert stats[-1][0] <= stats[20][0], "receiver file descriptors grew"
    assert stats[-1][1] - stats[20][1] < 30, "receiver memory grew"


DROPPED_IN_A_CYCLE = """
import gc, os, sys, torch
from refit.auth import CurveAuth
from refit.receiver import RefitReceiver
path = sys.argv[1]

def drop() -> None:
    own = {"io_cpus": [min(os.sched_getaffinity(0))]} if hasattr(os, "sched_getaffinity") else {}
    for kw in [own, {"auth": CurveAuth.from_secret("sixteen chars or more")}, {"address": "ipc://" + path}]:
        rx = RefitReceiver({"w": torch.zeros(4)}, "zmq", **kw)
        rx.itself = rx  # a reference cycle, as a traceback holding the receiver makes
gc.disable()
drop()
print("collected", gc.collect() > 0, "socket file left", os.path.exists(path), flush=True)
# and one still receiving on a daemon thread when the process exits: the exit must not wait on it
import threading
alive = RefitReceiver({"w": torch.zeros(4)}, "zmq", auth=CurveAuth.from_secret("sixteen chars or more"))
threading.Thread(target=alive.receive, kwargs={"timeout": 600}, daemon=True).start()
"""


def test_a_receiver_dropped_without_close_is_collected_and_releases_everything(tmp_path: Any) -> None:
    """A receiver never closed and left in a reference cycle: the collector releases its socket,
    its own ZMQ context (I/O threads placed elsewhere, or a CURVE authenticator) and its socket
    file. Left to pyzmq, the context's ``__del__`` would wait forever for the unclosed socket.
    A receiver still receiving when the process exits does not hold the exit up."""
    import subprocess
    import sys

    path = tmp_path / "rx.sock"
    out = subprocess.run([sys.executable, "-c", DROPPED_IN_A_CYCLE, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "collected True socket file left False", out


def test_garbage_is_answered_and_dropped_and_the_receiver_keeps_waiting() -> None:
    """Garbage from anyone but the sender of a push in progress never ends a receiver's wait:
    its sender hears why, and the next real push lands."""
    import msgpack
    import zmq

    from refit.wire import decode

    spec = {"w": ((8,), "float32")}
    with receivers(spec, pushes=1) as [rx]:
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(rx.info["address"])
        for junk, why in (
            ([b"\xc1\x00garbage"], "not a msgpack"),
            ([msgpack.packb({"type": "hello", "push_id": 1, "version": 1})], "field"),  # fields missing
            ([b""], "msgpack"),
        ):
            sock.send_multipart(junk)
            assert sock.poll(10_000), f"no answer to {junk!r}"
            reply = decode(sock.recv())
            assert type(reply).__name__ == "Abort" and why in reply.reason.lower(), reply  # type: ignore[union-attr]
        sock.close()
        state = {"w": torch.arange(8.0)}
        with Refitter("zmq", peers=[rx.info["address"]], timeout=20) as r:
            r.push(state)
        assert rx.get("report")[0] == "report"  # the first thing the receiver reports: no error
        assert rx.final()[1] == procs.digests(state)


def test_serve_bounds_pushes_by_push_timeout_not_poll() -> None:
    """serve(poll=0.2) polls for new pushes every 0.2 s, but a push with a 1 s pause between
    buckets (a slow all-gather) must still land."""
    import threading

    from refit.receiver import RefitReceiver

    target = {"a": torch.zeros(1024), "b": torch.zeros(1024)}
    rx = RefitReceiver(target, "zmq", push_timeout=30)
    t = threading.Thread(target=rx.serve, kwargs={"max_pushes": 1, "poll": 0.2}, daemon=True)
    t.start()

    def slow(out: torch.Tensor) -> None:
        time.sleep(1.0)
        out.fill_(2.0)

    state: dict[str, torch.Tensor | Lazy] = {"a": torch.ones(1024), "b": Lazy((1024,), torch.float32, slow)}
    with Refitter("zmq", peers=[rx.info()["address"]], bucket_bytes=4096, timeout=20) as r:
        r.push(state)
    t.join(30)
    rx.close()
    assert rx.last_error is None and not rx.torn
    assert torch.equal(target["a"], torch.ones(1024)) and torch.equal(target["b"], torch.full((1024,), 2.0))


def test_stale_abort_does_not_end_the_next_wait_and_bad_hello_is_answered() -> None:
    import threading

    import msgpack
    import zmq

    from refit.receiver import RefitReceiver
    from refit.wire import decode

    target = {"a": torch.zeros(4)}
    rx = RefitReceiver(target, "zmq")
    with Refitter("zmq", peers=[rx.info()["address"]], timeout=10) as r:
        errors: list[BaseException] = []

        def refused() -> None:
            try:
                rx.receive(10)
            except ResolveError as exc:
                errors.append(exc)

        th = threading.Thread(target=refused, daemon=True)
        th.start()
        with pytest.raises(ResolveError):
            r.push({"nope": torch.ones(4)})  # refused; the sender's Abort stays queued
        th.join(10)
    assert len(errors) == 1
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(rx.transport.receive(rx.loader, 1.5)), daemon=True)
    t0 = time.monotonic()
    waiter.start()
    waiter.join(10)
    assert got == [None] and time.monotonic() - t0 >= 1.4  # waited the whole time
    # a Hello that fails validation is answered with its own push id, so its sender hears why
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(rx.info()["address"])
    sock.send(msgpack.packb({"type": "hello", "push_id": 77, "version": -1, "digest": "x", "manifest": None, "num_buffers": 2}))
    assert rx.transport.receive(rx.loader, 2) is None  # answered and dropped: the wait goes on
    assert sock.poll(5000)
    reply = decode(sock.recv())
    assert reply.push_id == 77 and "version" in reply.reason  # type: ignore[union-attr]
    sock.close()
    rx.close()


class _ThreadEngine:
    """An EngineHandle whose one worker is a zmq receiver served from a thread."""

    def __init__(self, target: dict[str, torch.Tensor]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from refit.load import Loader
        from refit.resolve import TensorsResolver
        from refit.transports.zmq import ZmqReceiver

        self.rx, self.loader = ZmqReceiver(), Loader(TensorsResolver(target))
        self.pool = ThreadPoolExecutor(1)
        self.begun = 0

    def open(self, transport: str, options: Any) -> list[dict[str, Any]]:
        return [self.rx.info()]

    def begin_receive(self, timeout: float) -> Any:
        self.begun += 1
        return self.pool.submit(lambda: [r for r in [self.rx.receive(self.loader, timeout)] if r is not None])

    def close(self) -> None:
        self.rx.close()
        self.pool.shutdown()


def test_engine_push_failing_before_the_handshake_leaves_the_workers_idle() -> None:
    """Bucket 0 is packed before the handshake; if that fails, the engine's workers must not have
    been started on a receive that no hello (and no abort) would ever end."""
    target = {"w": torch.zeros(8)}
    engine = _ThreadEngine(target)

    def boom(out: torch.Tensor) -> None:
        raise RuntimeError("fill failed")

    with Refitter("zmq", engine=engine, timeout=30) as r:
        with pytest.raises(RuntimeError, match="fill failed"):
            r.push({"w": Lazy((8,), torch.float32, boom)})
        assert engine.begun == 0
        report = r.push({"w": torch.ones(8)})
    assert engine.begun == 1 and report.receivers[0].loaded == 1
    assert torch.equal(target["w"], torch.ones(8))
