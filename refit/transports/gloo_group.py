"""The gloo backend of the ``nccl`` transport: ``ProcessGroupGloo`` on the sender's private
store (CPU-only hosts and CI), with operations bounded by the group's timeout and, on a
receiver, by its own (shorter) one."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from typing_extensions import override

from refit.errors import TransportError
from refit.transports.collective import Backend, Communicator, Handle, Rendezvous, barrier, timedelta_s


class _GlooHandle(Handle):
    def __init__(self, work: Any, comm: GlooCommunicator, what: str) -> None:
        self.work, self.comm, self.what = work, comm, what

    def wait(self, timeout: float | None = None) -> None:
        limit = self.comm.timeout if timeout is None else min(timeout, self.comm.timeout)
        if limit < self.comm.timeout:  # gloo's own wait obeys only the group's timeout: poll
            deadline, delay = time.monotonic() + limit, 1e-4
            while not self.work.is_completed():
                if time.monotonic() > deadline:
                    self.comm.stuck = True
                    self.comm.close()
                    raise TransportError(f"{self.comm.name}: broadcast of {self.what} did not complete within {limit} s")
                time.sleep(delay)
                delay = min(delay * 2, 0.002)
        try:
            self.work.wait()
        except Exception as exc:  # gloo raises RuntimeError / DistError with the peer's address
            raise TransportError(f"{self.comm.name}: broadcast of {self.what} failed or timed out ({limit} s): {exc}") from None


class GlooCommunicator(Communicator):
    """``ProcessGroupGloo`` on a private store; operations time out after ``rdv.timeout``."""

    backend = Backend.GLOO

    def __init__(self, rdv: Rendezvous, store: torch.distributed.Store, rank: int, *, host: str | None = None) -> None:
        from torch.distributed import ProcessGroupGloo

        self.rank, self.world, self.timeout = rank, rdv.world, rdv.timeout
        self.name = f"gloo group {rdv.group} (rank {rank} of {rdv.world})"
        self.stuck = False  # an operation outlived a caller's wait (see close)
        if host is None:
            host = rdv.host if rdv.host in ("127.0.0.1", "localhost", "::1") else None
        # _Options (what torch's own distributed_c10d uses) is the only way to pick the device,
        # i.e. the address gloo listens on; the public overload takes the host's default one.
        opts = ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        opts._timeout = timedelta_s(rdv.timeout)
        opts._devices = [ProcessGroupGloo.create_device(hostname=host) if host else ProcessGroupGloo.create_default_device()]
        barrier(store, "init", rdv.world, rank, rdv.timeout, self.name)  # gloo's own wait cannot stop early
        try:
            self.pg: Any = ProcessGroupGloo(store, rank, rdv.world, opts)
        except Exception as exc:
            raise TransportError(f"{self.name}: set-up failed (a rank did not join within {rdv.timeout} s?): {exc}") from None
        self._opts = torch.distributed.BroadcastOptions()
        self._opts.rootRank = 0

    @override
    def broadcast(self, buf: torch.Tensor, what: str) -> Handle:
        if self.pg is None:
            raise TransportError(f"{self.name} is closed (phase {what})")
        self._check_buffer(buf, what)
        try:
            return _GlooHandle(self.pg.broadcast([buf], self._opts), self, what)
        except Exception as exc:
            raise TransportError(f"{self.name}: could not start broadcast of {what}: {exc}") from None

    @override
    def close(self) -> None:
        pg, self.pg = self.pg, None
        if pg is None:
            return
        if self.stuck:
            # An operation is still blocked in gloo's thread (we stopped waiting for it before
            # the group's timeout). abort() and the group's destructor would wait for it, holding
            # the GIL (seen: 30 s frozen), so the group is parked until the process ends.
            _STUCK.append(pg)
            return
        # abort first: closes the sockets, so peers blocked on us fail now, not at their timeout
        with contextlib.suppress(Exception):
            pg.abort()


_STUCK: list[Any] = []  # gloo groups left with an operation blocked in their thread (see close)
