"""``nccl``, receiver half: joins the dedicated group while answering the Hello, waits for the
go word, receives every bucket into ``num_buffers`` persistent buffers and applies bucket k-1
while bucket k arrives (see :mod:`refit.transports.nccl` for the protocol)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from typing_extensions import override

from refit.auth import CurveAuth
from refit.errors import IntegrityError, ResolveError, TransportError, WireError
from refit.load import Loader
from refit.report import RefitReport
from refit.transports.base import ReceiverTransport
from refit.transports.collective import Backend, Communicator, Handle, Rendezvous, client_store
from refit.transports.control import DEFAULT_ADDRESS, ControlServer
from refit.transports.nccl import check_host, go_buffer, join_group
from refit.wire import Hello


class _BadOffer(TransportError):
    """A Hello this receiver cannot act on (no or a garbled rendezvous, a group it is not in):
    refused, and the group it is in, if any, stays (any peer may send such a Hello)."""


class _NoGo(TransportError):
    """The sender called the push off after the handshake (another receiver refused); the
    group is intact and stays."""



class NcclReceiver(ReceiverTransport):
    """Receiver half: a control socket, and a seat in the sender's group once it offers one.

    Args:
        address: control address, ``tcp://127.0.0.1:*`` by default (loopback, free port).
        name: this receiver's name in reports and errors.
        device: where receive buffers live: CUDA for NCCL (default when available), CPU or CUDA
            for gloo.
        host: address this receiver's gloo sockets listen on (default: loopback when the
            sender's is, else the default interface); an address or resolvable name, checked here.
        auth: CURVE keys (:class:`refit.auth.CurveAuth`): only senders holding the expected key
            are heard. Default: unauthenticated (see docs/reliability.md).
    """

    def __init__(
        self,
        *,
        address: str = DEFAULT_ADDRESS,
        name: str = "receiver",
        device: str | torch.device | None = None,
        host: str | None = None,
        auth: CurveAuth | None = None,
    ) -> None:
        self.server = ControlServer(address, name=name, auth=auth)
        self.name, self.host = name, check_host(host, "host")
        self.device = torch.device(device) if device is not None else None
        self._comm: Communicator | None = None
        self._group_id = ""
        self._rank = 0
        self._in_group = False  # joined (or confirmed) the group for the push being offered
        self._bufs: list[torch.Tensor] = []
        self._go: torch.Tensor | None = None
        self._prelude = 0  # bytes of bucket 0 broadcast before the go word in the push offered

    @override
    def info(self) -> dict[str, Any]:
        return {"address": self.server.address}

    def _device_for(self, backend: Backend) -> torch.device:
        if self.device is not None:
            return self.device
        return torch.device("cuda") if backend is Backend.NCCL else torch.device("cpu")

    def _join(self, hello: Hello) -> None:
        """``on_hello``: join the group named in the rendezvous unless already in it."""
        self._in_group = False
        if not hello.extra:
            raise _BadOffer(f"{self.name}: the Hello carries no rendezvous; is the sender using transport 'nccl'?")
        try:
            rdv = Rendezvous.decode(hello.extra)
        except WireError as exc:
            raise _BadOffer(f"{self.name}: {exc}") from None
        self._prelude = rdv.prelude
        if self._comm is not None and rdv.group == self._group_id and rdv.rank == self._rank:
            self._in_group = True
            return
        if not rdv.fresh:  # the sender thinks we are in its group: tell it to build a new one
            raise _BadOffer(f"{self.name} is not a member of group {rdv.group} (it failed or restarted); the next push builds a new group")
        self._drop_group()  # a new group is offered: leave the old one
        device = self._device_for(rdv.backend)
        store = client_store(rdv.host, rdv.port, rdv.timeout)
        self._comm = join_group(rdv, store, rdv.rank, device, self.host, self.name)
        self._group_id, self._rank, self._in_group = rdv.group, rdv.rank, True
        self._go = go_buffer(device)

    def _drop_group(self) -> None:
        comm, self._comm = self._comm, None
        self._group_id, self._in_group = "", False
        if comm is not None:
            comm.close()

    @override
    def receive(self, loader: Loader, timeout: float | None, *, push_timeout: float | None = None) -> RefitReport | None:
        in_push = timeout if push_timeout is None else push_timeout
        try:  # begin() skips stray messages itself; None means no push began in time
            hello = self.server.begin(loader, timeout, on_hello=self._join, push_timeout=in_push)
        except ResolveError:
            self._after_refusal()
            raise
        except _BadOffer:
            raise
        except BaseException:
            self._drop_group()
            raise
        if hello is None:
            return None
        try:
            with self.server.guard(loader, hello):
                self._stream(loader, hello, in_push)
            return self.server.end(loader, hello, in_push, expect_finish=False)
        except _NoGo:
            raise
        except BaseException:
            self._drop_group()
            raise

    def _after_refusal(self) -> None:
        """This receiver refused: take part in the prelude and the sender's no-go broadcast,
        then carry on in the same group."""
        if not self._in_group or self._comm is None or self._go is None:
            self._drop_group()
            return
        try:
            if self._prelude:
                fits = bool(self._bufs) and self._bufs[0].numel() >= self._prelude and self._bufs[0].device == self._go.device
                scratch = self._bufs[0] if fits else torch.empty(self._prelude, dtype=torch.uint8, device=self._go.device)
                self._comm.broadcast(scratch[: self._prelude], "bucket 0 (refused push)").wait()
            self._comm.broadcast(self._go, "go word (refused push)").wait()
        except TransportError:
            self._drop_group()

    def _stream(self, loader: Loader, hello: Hello, timeout: float | None) -> None:
        """The go word and every bucket; each wait bounded by ``timeout`` (this receiver's
        own bound) as well as by the group's timeout (the sender's)."""
        comm, go = self._comm, self._go
        manifest = hello.manifest or loader.knows(hello.digest)
        if comm is None or go is None or manifest is None:
            raise TransportError(f"{self.name}: no group or manifest after the handshake (phase buckets)")
        sizes, n = manifest.bucket_sizes, manifest.num_buckets
        if self._prelude != (sizes[0] if n else 0):
            raise TransportError(f"{self.name}: the sender's prelude is {self._prelude} bytes, bucket 0 has {sizes[0] if n else 0}; out of step")
        bufs = self._buffers(manifest.bucket_bytes, max(1, hello.num_buffers), go.device)
        nb = len(bufs)
        pending: dict[int, Handle] = {}

        def post(i: int) -> None:
            if sizes[i]:
                pending[i] = comm.broadcast(bufs[i % nb][: sizes[i]], f"bucket {i} of {n}")

        if self._prelude:
            post(0)  # bucket 0 arrives while the go word is decided; applied only after a go
        t0 = time.perf_counter()
        comm.broadcast(go, "go word").wait(timeout)
        push_id, ok = (int(x) for x in go.view(torch.int64).tolist())
        loader.note("go", time.perf_counter() - t0)
        if not ok:
            raise _NoGo(f"{self.name}: the sender abandoned the push before anything was applied (another receiver refused)")
        if push_id != hello.push_id:
            raise TransportError(f"{self.name}: go word for push {push_id}, expected {hello.push_id}; sender and receiver are out of step")
        for i in range(min(nb, n)):
            if i not in pending:
                post(i)
        for i in range(n):
            handle = pending.pop(i, None)
            if handle is not None:
                t0 = time.perf_counter()
                try:
                    handle.wait(timeout)
                except TransportError as exc:
                    raise TransportError(f"{self.name}: {exc} [phase buckets, bucket {i} of {n}; sender is rank 0]") from None
                loader.note("wait", time.perf_counter() - t0)
            # with checksums on, the sender's checksum of bucket i comes as its header on the control channel
            checksum = self.server.bucket_header(loader, hello, timeout, i).checksum if hello.checksum else None
            try:
                loader.apply(i, bufs[i % nb][: sizes[i]], persistent=True, checksum=checksum)
            except IntegrityError:
                # take part in the rest of the stream (nothing applied) so the sender's broadcasts
                # end and it reads this receiver's abort at once, not at its timeout
                with contextlib.suppress(TransportError):
                    if i + nb < n:
                        post(i + nb)  # bucket i's buffer is free: nothing of it was applied
                    for j in range(i + 1, n):
                        drained = pending.pop(j, None)
                        if drained is not None:
                            drained.wait(timeout)
                        if j + nb < n:
                            post(j + nb)
                raise
            if i + nb < n:
                post(i + nb)  # on CUDA, ordered after this apply's copies by an event

    def _buffers(self, bucket_bytes: int, num_buffers: int, device: torch.device) -> list[torch.Tensor]:
        """Persistent receive buffers (reallocated only when the layout's bucket size changes)."""
        if len(self._bufs) != num_buffers or self._bufs[0].numel() != bucket_bytes or self._bufs[0].device != device:
            self._bufs = []  # free the old ones first: staging stays <= num_buffers * bucket_bytes
            self._bufs = [torch.empty(bucket_bytes, dtype=torch.uint8, device=device) for _ in range(num_buffers)]
        return self._bufs

    @override
    def close(self) -> None:
        self._drop_group()
        self.server.close()
        self._bufs = []

