"""The ``nccl`` transport against a fake communicator with NCCL's byte semantics, in one process.

Regression of the bug that broke every NCCL push between two GPUs: the go word was an int64
tensor of 2 elements, and NCCL broadcasts ``numel`` *bytes* (count of ``NCCL_UINT8``) where gloo
broadcasts ``numel`` typed elements, so the receiver got 2 of 16 bytes, read ``go = 0`` and
abandoned a push nobody had refused. gloo (CI's backend) hid it. The fake communicator below
moves exactly ``numel`` raw bytes from the root's ``data_ptr``, as NCCL does, with no dtype
check, so CI catches any buffer that is not plain bytes.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import pytest
import torch

from refit.api import Refitter
from refit.digest import digest
from refit.errors import TransportError
from refit.receiver import RefitReceiver
from refit.transports import nccl as nccl_transport
from refit.transports.collective import Backend, Communicator, Handle, Rendezvous
from refit.transports.gloo_group import GlooCommunicator
from tests.procs import zeros_like
from tests.test_nccl_gloo import make_state

pytestmark = pytest.mark.integration

_WAIT = 20.0


class _Done(Handle):
    def wait(self, timeout: float | None = None) -> None:
        return None


class _Wire:
    """What rank 0 broadcast so far, in order, for one receiving rank."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.posted = 0
        self.cond = threading.Condition()


class _Recv(Handle):
    """The ``seq``-th broadcast of the group: collectives complete in the order they were
    posted, whatever order they are waited in."""

    def __init__(self, wire: _Wire, seq: int, ptr: int, n: int) -> None:
        self.wire, self.seq, self.ptr, self.n = wire, seq, ptr, n

    def wait(self, timeout: float | None = None) -> None:
        with self.wire.cond:
            if not self.wire.cond.wait_for(lambda: len(self.wire.sent) > self.seq, timeout=min(timeout or _WAIT, _WAIT)):
                raise TransportError("fake NCCL: the root never broadcast")
            data = self.wire.sent[self.seq]
        ctypes.memmove(self.ptr, data, min(len(data), self.n))


class ByteComm(Communicator):
    """NCCL's contract on host memory: rank 0's first ``numel`` bytes land in every rank's
    buffer, whatever the tensor's dtype (as ``ncclBroadcast(ptr, ptr, numel, ncclUint8)``)."""

    backend = Backend.NCCL

    def __init__(self, wires: dict[int, _Wire], rank: int, world: int) -> None:
        self.wires, self.rank, self.world = wires, rank, world
        self.name = f"fake NCCL group (rank {rank} of {world})"

    def broadcast(self, buf: torch.Tensor, what: str) -> Handle:
        ptr, n = buf.data_ptr(), buf.numel()
        if self.rank == 0:
            data = ctypes.string_at(ptr, n)
            for wire in self.wires.values():
                with wire.cond:
                    wire.sent.append(data)
                    wire.cond.notify_all()
            return _Done()
        wire = self.wires[self.rank]
        wire.posted += 1
        return _Recv(wire, wire.posted - 1, ptr, n)

    def close(self) -> None:
        pass


@pytest.fixture
def byte_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    groups: dict[str, dict[int, _Wire]] = {}
    lock = threading.Lock()

    def fake_connect(rdv: Rendezvous, store: Any, rank: int, device: torch.device, *, host: str | None = None) -> Communicator:
        with lock:
            wires = groups.setdefault(rdv.group, {r: _Wire() for r in range(1, rdv.world)})
        return ByteComm(wires, rank, rdv.world)

    monkeypatch.setattr(nccl_transport, "connect", fake_connect)


def test_push_over_byte_semantics_is_bit_exact(byte_groups: None) -> None:
    """Three pushes of every dtype (0-d, empty, chunked) through NCCL byte semantics."""
    state0, scales0 = make_state("mixed", 0)
    target = {k: zeros_like(v) for k, v in {**state0, **scales0}.items()}
    errors: list[BaseException] = []
    with RefitReceiver(target, "nccl", name="rx0", device="cpu") as rx:

        def serve() -> None:
            try:
                for _ in range(3):
                    rx.receive(timeout=_WAIT)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with Refitter("nccl", peers=[rx.info()["address"]], backend="gloo", device="cpu", bucket_bytes=64 << 10, timeout=_WAIT) as r:
            for seed in (1, 2, 3):
                state, scales = make_state("mixed", seed)
                assert r.push(state, scales).version == seed
                assert digest(target) == digest({**state, **scales})
        t.join(timeout=_WAIT)
        assert not errors, errors
        assert rx.version == 3 and not rx.torn


@pytest.mark.unit
def test_communicators_refuse_typed_buffers() -> None:
    """A typed buffer would move numel bytes on NCCL and numel elements on gloo: refused."""
    comm = GlooCommunicator.__new__(GlooCommunicator)
    comm.name, comm.pg = "gloo group g (rank 0 of 2)", object()
    for bad in (torch.zeros(2, dtype=torch.int64), torch.zeros(4, 4, dtype=torch.uint8), torch.zeros(8, dtype=torch.uint8)[::2]):
        with pytest.raises(TransportError, match="go word needs a contiguous 1-D uint8"):
            comm.broadcast(bad, "go word")
