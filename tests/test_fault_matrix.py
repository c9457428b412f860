"""The fault matrix (issue 19): real processes, every transport and its CPU twin.

``zmq``; ``cuda_ipc`` over shared memory (``device="cpu"``); ``nccl`` over gloo. Each side runs
in its own process (forked from a server that imported torch and refit once, so a case starts
in a fraction of a second) and stalls at a hook that makes the phase deterministic:

* **handshake**: the receiver's loader is preparing the push (after the Hello, before the
  sender has read the verdict);
* **bucket**: the sender stalls after sending bucket 0, or the receiver after applying it
  (the parent waits until the receiver applied bucket 0 either way);
* **before_finish**: every bucket sent and applied, Finish not yet sent (sender) or not yet
  read (receiver);
* **finish**: the receiver's post-load hook (the receiver holds the Finish).

The parent then SIGKILLs (or SIGSTOPs) one side and checks the other: it ends with a
``RefitError`` within its documented bound (sender ``timeout``; receiver ``push_timeout``)
plus a margin for a loaded box, never a hang; the receiver keeps its version, torn iff it had
applied a bucket, or committed completely when the sender died after handing it the Finish;
a surviving receiver then takes a complete push from a new sender process, bit for bit.

Also: a second sender starting a push mid-push (refused "busy", never interleaved), and a
receiver restarted on the same address between pushes (the same Refitter reaches it).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import pytest

from refit.errors import ResolveError
from tests import procs

pytestmark = pytest.mark.integration

CTX = mp.get_context("forkserver")
CTX.set_forkserver_preload(
    ["torch", "refit.api", "refit.receiver", "refit.transports.zmq", "refit.transports.cuda_ipc", "refit.transports.nccl", "tests.procs"]
)

TRANSPORTS = ["zmq", "cuda_ipc", "nccl"]
PHASES = ["handshake", "bucket", "before_finish", "finish"]
T = 3.0  # the surviving side's bound: sender timeout, receiver push_timeout
MARGIN = 6.0  # a loaded 2-core box
LONG = 60.0  # the stalled side's own bound (it is killed or stopped long before)
ZEROS = procs.digests(procs.make_target(procs.FAULT_SPEC))


class World:
    """The processes of one case, their event queue, and the release / stop files."""

    def __init__(self, tmp: Path) -> None:
        self.pipes: list[Any] = []  # one per process: a killed one cannot hold a lock the others need
        self.procs: dict[str, Any] = {}
        self.seen: list[tuple[Any, ...]] = []
        self.frozen: list[str] = []
        self.release, self.stop = str(tmp / "release"), str(tmp / "stop")

    def receiver(self, transport: str, role: str = "rx", **cfg: Any) -> dict[str, Any]:
        cfg = {"transport": transport, "role": role, "release": self.release, "stop": self.stop, "timeout": T, "pushes": 2, **cfg}
        self._start(role, procs.fault_receiver, (cfg,))
        info: dict[str, Any] = self.wait(role, "info")[0]
        return info

    def sender(self, transport: str, peers: list[Any], role: str = "tx", **cfg: Any) -> None:
        cfg = {"transport": transport, "role": role, "release": self.release, "timeout": T, "seed": 1, "version": 5, **cfg}
        self._start(role, procs.fault_sender, (cfg, peers))

    def _start(self, role: str, target: Any, args: tuple[Any, ...]) -> None:
        reader, writer = CTX.Pipe(duplex=False)
        p = CTX.Process(target=target, args=(*args, writer), name=role, daemon=True)
        p.start()
        writer.close()
        self.procs[role] = p
        self.pipes.append(reader)

    def wait(self, role: str, event: str, timeout: float = 60, match: Any = None) -> tuple[Any, float]:
        """The next ``event`` of ``role`` (payload, monotonic time); fails on a crash or at ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for i, (r, e, payload, t) in enumerate(self.seen):
                if e == "crash":
                    pytest.fail(f"{r} crashed: {payload}")
                if r == role and e == event and (match is None or match(payload)):
                    del self.seen[i]
                    return payload, t
            ready: list[Any] = wait(self.pipes, timeout=max(0.05, deadline - time.monotonic()))
            if not ready and time.monotonic() >= deadline:
                pytest.fail(f"no {event!r} from {role} within {timeout} s; got {self.seen}")
            for conn in ready:
                try:
                    self.seen.append(conn.recv())
                except EOFError:  # that process ended (or was killed)
                    self.pipes.remove(conn)

    def signal(self, role: str, sig: int) -> float:
        t = time.monotonic()
        os.kill(self.procs[role].pid, sig)
        if sig == signal.SIGSTOP:
            self.frozen.append(role)
        return t

    def let_go(self) -> None:
        Path(self.release).touch()

    def close(self) -> None:
        Path(self.stop).touch()
        self.let_go()
        for role in self.frozen:  # stopped, never to go on
            self.procs[role].kill()
        for p in self.procs.values():
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for conn in self.pipes:
            conn.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    try:
        yield w
    finally:
        w.close()


def push_from_here(transport: str, info: dict[str, Any], seed: int) -> int:
    """A complete push from this process (a new sender); returns its version."""
    with procs.fault_refitter(transport, [info], timeout=20) as r:
        return int(r.push(procs.fault_state(seed)).version)


def within_bound(t_fault: float, t_error: float) -> None:
    print(f"[the surviving side's error came {t_error - t_fault:.2f} s after the fault]")
    assert t_error - t_fault <= T + MARGIN, f"the surviving side took {t_error - t_fault:.1f} s after the fault (bound {T} s)"


# (side stalled, hook) for each (victim, phase); the parent faults the victim once it is there
STALLS = {
    ("sender", "handshake"): ("rx", "handshake"),
    ("sender", "bucket"): ("tx", "bucket"),
    ("sender", "before_finish"): ("tx", "before_finish"),
    ("sender", "finish"): ("rx", "finish"),
    ("receiver", "handshake"): ("rx", "handshake"),
    ("receiver", "bucket"): ("rx", "bucket"),
    ("receiver", "before_finish"): ("rx", "last_bucket"),
    ("receiver", "finish"): ("rx", "finish"),
}
CASES = [(t, v, p, "kill") for t in TRANSPORTS for v in ("sender", "receiver") for p in PHASES]
CASES += [(t, v, "bucket", "freeze") for t in TRANSPORTS for v in ("sender", "receiver")]


@pytest.mark.parametrize(("transport", "victim", "phase", "fault"), CASES, ids=["-".join(c) for c in CASES])
def test_peer_killed_or_frozen_in_each_phase(world: World, transport: str, victim: str, phase: str, fault: str) -> None:
    stalled, hook = STALLS[(victim, phase)]
    rx_hook = {"stall": hook} if stalled == "rx" else {}
    info = world.receiver(transport, timeout=T if victim == "sender" else LONG, **rx_hook)
    world.sender(transport, [info], timeout=T if victim == "receiver" else LONG, **({"stall": hook} if stalled == "tx" else {}))
    world.wait(stalled, "at", match=lambda p: p == hook)
    if victim == "sender" and phase in ("bucket", "before_finish"):  # the receiver applied what the phase says
        world.wait("rx", "applied", match=lambda p: p[0] == (0 if phase == "bucket" else p[1]))
    t_fault = world.signal("tx" if victim == "sender" else "rx", signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    if victim == "sender" and stalled == "rx":
        world.let_go()  # the receiver goes on, now without its sender
    if victim == "receiver":
        (kind, text), t_error = world.wait("tx", "result", timeout=T + MARGIN + 30)
        assert kind == "TransportError", (kind, text)
        assert "rx" in text or "receiver" in text, text
        within_bound(t_fault, t_error)
        return
    (kind, *rest), t_error = world.wait("rx", "result", timeout=T + MARGIN + 30)
    # it commits without its sender once it holds the Finish, or on nccl the last bucket (its
    # bucket loop proves the stream complete: it commits without waiting for a Finish)
    if phase == "finish" or (phase == "before_finish" and transport == "nccl"):
        assert (kind, rest[0], rest[1], rest[2]) == ("ok", 5, False, procs.digests(procs.fault_state(1))), (kind, rest)
        expect_version = 6
    else:
        text, version, torn, digest = rest
        assert kind == "TransportError", (kind, text)
        within_bound(t_fault, t_error)
        assert version == 0 and torn == (phase != "handshake"), (version, torn, text)
        if phase == "handshake":
            assert digest == ZEROS  # no bucket applied: untouched
        expect_version = 1
    # the surviving receiver takes a complete push from a new sender, bit for bit
    assert push_from_here(transport, info, seed=2) == expect_version
    (kind, *rest), _ = world.wait("rx", "result")
    assert (kind, rest[0], rest[1], rest[2]) == ("ok", expect_version, False, procs.digests(procs.fault_state(2))), (kind, rest)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_second_push_while_one_is_in_flight_is_refused_never_interleaved(world: World, transport: str) -> None:
    info = world.receiver(transport, timeout=20)
    world.sender(transport, [info], role="a", stall="bucket", seed=1, version=None, timeout=20)
    world.wait("a", "at")
    world.wait("rx", "applied", match=lambda p: p[0] == 0)
    world.sender(transport, [info], role="b", seed=3, version=7)  # explicit version: its Hello meets the busy receiver
    (b_kind, *b_rest), _ = world.wait("b", "result", timeout=T + MARGIN + 30)
    world.let_go()
    (a_kind, *a_rest), _ = world.wait("a", "result")
    assert (a_kind, a_rest) == ("ok", [1]), (a_kind, a_rest)
    (kind, *rest), _ = world.wait("rx", "result")
    assert (kind, rest[0], rest[1], rest[2]) == ("ok", 1, False, procs.digests(procs.fault_state(1))), (kind, rest)
    if b_kind != "ok":  # refused: a clear error, and nothing of it reached the target
        # (nccl: the receiver is inside A's broadcasts, so B's group set-up times out and says why)
        assert b_kind == "TransportError" and "busy" in b_rest[0], (b_kind, b_rest)
        assert transport != "nccl" or "did not arrive" in b_rest[0], b_rest
    else:  # queued: it landed after the first, whole
        (kind, *rest), _ = world.wait("rx", "result")
        assert (kind, rest[0], rest[1], rest[2]) == ("ok", 7, False, procs.digests(procs.fault_state(3))), (kind, rest)


RESTARTS = [("zmq", "tcp"), ("zmq", "ipc"), ("cuda_ipc", "ipc"), ("nccl", "tcp")]


@pytest.mark.parametrize(("transport", "scheme"), RESTARTS, ids=["-".join(r) for r in RESTARTS])
def test_receiver_restarted_on_the_same_address_is_reached_by_the_same_refitter(world: World, tmp_path: Path, transport: str, scheme: str) -> None:
    address = f"tcp://127.0.0.1:{procs.free_port()}" if scheme == "tcp" else f"ipc://{tmp_path}/rx.sock"
    info = world.receiver(transport, address=address, timeout=20, pushes=3)
    with procs.fault_refitter(transport, [info], timeout=T + 2) as r:
        assert r.push(procs.fault_state(1)).version == 1
        assert world.wait("rx", "result")[0][:2] == ("ok", 1)
        world.signal("rx", signal.SIGKILL)  # between pushes
        world.procs["rx"].join(timeout=10)
        info2 = world.receiver(transport, role="rx2", address=address, timeout=20, pushes=3)
        assert info2["address"] == info["address"]
        if transport == "zmq":  # the DEALER reconnects by itself: the next push just lands
            rep = r.push(procs.fault_state(2))
        else:  # the sender's shared buffer set / group dates from the old process: refused once, clearly
            with pytest.raises(ResolveError, match="restarted") as refused:
                r.push(procs.fault_state(2))
            assert "nothing was loaded" in str(refused.value)
            rep = r.push(procs.fault_state(2))  # the refusal dropped them: this push sets up anew
        # numbering goes on (a refused push's number is spent); the new receiver (at 0) accepts it
        assert rep.version == (2 if transport == "zmq" else 3)
    if transport != "zmq":
        (kind, *rest), _ = world.wait("rx2", "result")
        assert kind == "TransportError" and "restarted" in rest[0], (kind, rest)  # its set-up failed: refused
        assert rest[1:3] == [0, False] and rest[3] == ZEROS, rest  # untouched
    (kind, *rest), _ = world.wait("rx2", "result")
    assert (kind, rest[0], rest[1], rest[2]) == ("ok", rep.version, False, procs.digests(procs.fault_state(2))), (kind, rest)
