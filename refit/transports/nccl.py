"""``nccl``: one packed broadcast stream from a trainer rank to many engine workers.

What it does: the manifest and every receiver's verdict travel first over the ZMQ control
channel (:class:`~refit.transports.control.PeerGroup` / ``ControlServer``, the same protocol as
``zmq``). The first push also carries, in each receiver's ``Hello.extra``, a msgpack
:class:`~refit.transports.collective.Rendezvous` (group id, rank, world, the sender's store and,
for NCCL, the unique id); receivers join the dedicated group while answering the Hello, the
sender joins once every Hello is out. Then rank 0 broadcasts a 16-byte *go word*
``[push_id, go]``: ``go = 0`` when any receiver refused, so one refusal means no bucket byte is
broadcast and the waiting receivers learn it at once (a NCCL receiver could otherwise only learn
it from its timeout). On ``go = 1`` every bucket is broadcast into ``num_buffers`` persistent
buffers per side: the sender packs bucket k+1 while bucket k is on the wire, a receiver applies
bucket k-1 while bucket k arrives. Bucket sizes come from the manifest only. No per-bucket acks:
the collective orders the buckets; ``finish`` collects the reports over the control channel.

Backends (``backend=``): ``"nccl"`` (CuPy NCCL, CUDA buffers), ``"gloo"`` (a private
``ProcessGroupGloo``; CPU-only hosts and CI run the whole transport this way) or ``"auto"``:
NCCL when the buffers are on CUDA and CuPy is importable, else gloo. The group lives across
pushes; any failed push (refusal with a set-up failure, timeout, broken stream) discards it on
both sides and the next push builds a new one, so a restarted receiver can join again.

Every wait is bounded by ``timeout`` (gloo's own option; NCCL's watchdog aborts the
communicator) and fails with :class:`TransportError` naming the peer or group, phase and bucket.

Rejected: one broadcast per tensor (launch/latency bound with thousands of small tensors and 0-d
scales); acks per bucket (a control round trip per bucket for nothing the collective does not
already guarantee); rendezvous through pickled objects or the default process group.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from refit.auth import CurveAuth
from refit.errors import ResolveError, TransportError, WireError
from refit.load import Loader
from refit.meta import Manifest
from refit.report import RefitReport
from refit.transports.base import ReceiverTransport, Sender
from refit.transports.collective import (
    Backend,
    Communicator,
    GroupSetupFailed,
    Handle,
    Rendezvous,
    StoreServer,
    choose_backend,
    client_store,
    cupy_nccl,
    mark_failed,
    new_group_id,
)
from refit.transports.control import DEFAULT_ADDRESS, SETUP_FAILED, ControlServer
from refit.transports.join import connect
from refit.transports.peers import PeerGroup, Peers, peer_infos
from refit.wire import Hello

_GO_WORDS = 2  # int64 [push_id, go]


def _join_group(rdv: Rendezvous, store: torch.distributed.Store, rank: int, device: torch.device, host: str | None, who: str) -> Communicator:
    """:func:`connect`; a failure here (not the barrier's verdict, already in the store) is
    written to the store, so the ranks waiting for this one stop at once."""
    try:
        return connect(rdv, store, rank, device, host=host)
    except GroupSetupFailed:
        raise
    except BaseException as exc:
        mark_failed(store, rdv.group, f"{who} (rank {rank}) could not join: {exc}")
        raise


class _BadOffer(TransportError):
    """A Hello this receiver cannot act on (no or a garbled rendezvous, a group it is not in):
    refused, and the group it is in, if any, stays (any peer may send such a Hello)."""


class _NoGo(TransportError):
    """The sender called the push off after the handshake (another receiver refused); the
    group is intact and stays."""


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _go_buffer(device: torch.device) -> torch.Tensor:
    """The go word, as the raw bytes every broadcast moves (read it with ``.view(torch.int64)``)."""
    return torch.zeros(_GO_WORDS, dtype=torch.int64, device=device).view(torch.uint8)


class NcclSender(Sender):
    """Sender half (rank 0 of the group).

    Args:
        peers: the receivers: each its address or what its ``info()`` returned.
        timeout: seconds any wait (a verdict, a rendezvous, one broadcast) may take.
        backend: ``"auto"``, ``"nccl"`` or ``"gloo"``.
        device: staging buffers' device; default CUDA when available.
        host: address of this host that receivers can reach (the rendezvous store and gloo
            sockets listen on it); default loopback.
        auth: CURVE keys (:class:`refit.auth.CurveAuth`) when the receivers require them (the control channel only: the
            rendezvous store and the broadcast are not covered).

    Example:
        >>> r = Refitter("nccl", peers=[rx.info()["address"] for rx in receivers])  # doctest: +SKIP
    """

    def __init__(
        self,
        peers: Peers = (),
        *,
        timeout: float = 120.0,
        backend: str = "auto",
        device: str | torch.device | None = None,
        host: str = "127.0.0.1",
        auth: CurveAuth | None = None,
    ) -> None:
        addresses = [i["address"] for i in peer_infos(peers, "nccl")]
        self.device = torch.device(device) if device is not None else _default_device()
        self.backend = choose_backend(backend, self.device)
        if self.backend is Backend.GLOO and self.device.type == "cuda" and device is None:
            self.device = torch.device("cpu")  # auto-chosen gloo: stage on the host, gloo's home
        self.timeout, self.host = timeout, host
        self.group = PeerGroup(addresses, timeout=timeout, auth=auth)
        self._store: StoreServer | None = None
        self._comm: Communicator | None = None
        self._group_id = ""
        self._unique_id = b""
        self._joining = False
        self._bufs: list[torch.Tensor] = []
        self._inflight: dict[int, tuple[int, Handle]] = {}  # slot -> (bucket, handle)
        self._num_buffers = 2
        self._num_buckets = 0
        self._go = _go_buffer(self.device)
        self._go_handle: Handle | None = None
        self._prelude, self._prelude_sent = 0, False
        self.stages: dict[str, float] = {}

    # -- group lifetime

    def _rendezvous(self, rank: int) -> Rendezvous:
        if self._store is None:
            self._store = StoreServer(self.host, self.timeout)
        return Rendezvous(
            backend=self.backend,
            group=self._group_id,
            rank=rank,
            world=len(self.group.peers) + 1,
            host=self.host,
            port=self._store.port,
            unique_id=self._unique_id,
            timeout=self.timeout,
            fresh=self._joining,
            prelude=self._prelude,
        )

    def _drop_group(self) -> None:
        comm, self._comm = self._comm, None
        self._inflight.clear()
        self._go_handle = None
        if comm is not None:
            comm.close()

    def handshake(self, manifest: Manifest, version: int) -> None:
        self.stages = {}
        self._inflight.clear()
        self._num_buckets = manifest.num_buckets
        # bucket 0 (packed by now) goes out while the verdicts are on their way; receivers apply
        # it only after the go word, and on a no-go everyone has taken part in it all the same
        self._prelude = manifest.bucket_sizes[0] if manifest.num_buckets else 0
        self._prelude_sent = False
        self._joining = self._comm is None
        if self._joining:
            self._group_id = new_group_id()
            nccl = cupy_nccl() if self.backend is Backend.NCCL else None
            self._unique_id = bytes(b & 0xFF for b in nccl.get_unique_id()) if nccl is not None else b""
        rdvs = [self._rendezvous(i + 1).encode() for i in range(len(self.group.peers))]
        try:
            self.group.handshake(manifest, version, self._num_buffers, extra=lambda i: rdvs[i], after_hello=self._join_and_send_prelude)
        except ResolveError as exc:
            # Receivers that answered their Hello are in the group and wait for the go word: a
            # no-go releases them at once. One whose set-up failed is not in the group, so the
            # group is dropped instead (the next push builds a new one).
            setup_failed = any(SETUP_FAILED in p for p in exc.problems)
            try:
                if setup_failed or self._comm is None:
                    raise TransportError("group incomplete")
                self._go_word(0, "go word (push refused)").wait()
            except TransportError:
                self._drop_group()
            raise
        except BaseException:
            self._drop_group()
            raise
        t0 = time.perf_counter()
        self._go_handle = self._go_word(self.group.push_id, "go word")
        self.stages["go"] = time.perf_counter() - t0

    def _join_and_send_prelude(self) -> None:
        """After every Hello is out: join a new group as rank 0 (blocks for all), then start
        broadcasting bucket 0 (the prelude) before any verdict is in."""
        if self._joining and self._store is not None and self._store.store is not None:
            self._comm = _join_group(self._rendezvous(0), self._store.store, 0, self.device, self.host, "the sender")
        if self._prelude and self._comm is not None:
            self.send(0, 0, self._prelude)
            self._prelude_sent = True

    def _go_word(self, push_id: int, what: str) -> Handle:
        if self._comm is None:
            raise TransportError(f"nccl transport ({self.backend}): no group (phase {what})")
        self._go.view(torch.int64).copy_(torch.tensor([push_id, 1 if push_id else 0], dtype=torch.int64))
        return self._comm.broadcast(self._go, what)

    # -- stream

    def buffers(self, bucket_bytes: int, num_buffers: int) -> list[torch.Tensor]:
        self._num_buffers = num_buffers
        if len(self._bufs) != num_buffers or self._bufs[0].numel() != bucket_bytes:
            self._bufs = [torch.empty(bucket_bytes, dtype=torch.uint8, device=self.device) for _ in range(num_buffers)]
        return self._bufs

    def wait_reusable(self, slot: int) -> None:
        entry = self._inflight.pop(slot, None)
        if entry is not None:
            self._wait(*entry)

    def _wait(self, index: int, handle: Handle) -> None:
        try:
            handle.wait()
        except TransportError as exc:
            raise TransportError(f"{exc} [phase buckets, bucket {index} of {self._num_buckets}; receivers {self._peer_names()}]") from None

    def _peer_names(self) -> str:
        return ", ".join(f"rank {i + 1}={p.address}" for i, p in enumerate(self.group.peers))

    def send(self, index: int, slot: int, nbytes: int) -> None:
        if self._comm is None:
            raise TransportError(f"nccl transport: no group to broadcast bucket {index} (was the push aborted?)")
        if nbytes == 0:
            return  # both sides skip empty buckets (sizes come from the manifest)
        if index == 0 and self._prelude_sent:
            return  # the prelude: already on its way since the handshake
        handle = self._comm.broadcast(self._bufs[slot][:nbytes], f"bucket {index} of {self._num_buckets}")
        self._inflight[slot] = (index, handle)

    def finish(self) -> list[RefitReport]:
        try:
            t0 = time.perf_counter()
            if self._go_handle is not None:
                self._go_handle.wait()
                self._go_handle = None
            for slot in sorted(self._inflight, key=lambda s: self._inflight[s][0]):
                self._wait(*self._inflight[slot])
            self._inflight.clear()
            t1 = time.perf_counter()
            # no Finish message: a receiver commits once its last bucket arrived (a collective
            # completes for every rank or for none), so only the Done replies are awaited
            reports = self.group.finish(send_finish=False)
            self.stages |= {"drain": t1 - t0, "confirm": time.perf_counter() - t1}
            return reports
        except BaseException:
            self._drop_group()
            raise

    def committed_versions(self) -> list[int] | None:
        return self.group.committed_versions()

    def abort(self, reason: str) -> None:
        self.group.abort(reason)
        # closing the group makes receivers blocked on a broadcast fail now (gloo) rather than
        # at their timeout; the next push builds a new group
        self._drop_group()

    def close(self) -> None:
        self._drop_group()
        self.group.close()
        if self._store is not None:
            self._store.close()
            self._store = None
        self._bufs = []


class NcclReceiver(ReceiverTransport):
    """Receiver half: a control socket, and a seat in the sender's group once it offers one.

    Args:
        address: control address, ``tcp://127.0.0.1:*`` by default (loopback, free port).
        name: this receiver's name in reports and errors.
        device: where receive buffers live: CUDA for NCCL (default when available), CPU or CUDA
            for gloo.
        host: address this receiver's gloo sockets listen on (default: loopback when the
            sender's is, else the default interface).
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
        self.name, self.host = name, host
        self.device = torch.device(device) if device is not None else None
        self._comm: Communicator | None = None
        self._group_id = ""
        self._rank = 0
        self._in_group = False  # joined (or confirmed) the group for the push being offered
        self._bufs: list[torch.Tensor] = []
        self._go: torch.Tensor | None = None
        self._prelude = 0  # bytes of bucket 0 broadcast before the go word in the push offered

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
        self._comm = _join_group(rdv, store, rdv.rank, device, self.host, self.name)
        self._group_id, self._rank, self._in_group = rdv.group, rdv.rank, True
        self._go = _go_buffer(device)

    def _drop_group(self) -> None:
        comm, self._comm = self._comm, None
        self._group_id, self._in_group = "", False
        if comm is not None:
            comm.close()

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
            loader.apply(i, bufs[i % nb][: sizes[i]], persistent=True)
            if i + nb < n:
                post(i + nb)  # on CUDA, ordered after this apply's copies by an event

    def _buffers(self, bucket_bytes: int, num_buffers: int, device: torch.device) -> list[torch.Tensor]:
        """Persistent receive buffers (reallocated only when the layout's bucket size changes)."""
        if len(self._bufs) != num_buffers or self._bufs[0].numel() != bucket_bytes or self._bufs[0].device != device:
            self._bufs = []  # free the old ones first: staging stays <= num_buffers * bucket_bytes
            self._bufs = [torch.empty(bucket_bytes, dtype=torch.uint8, device=device) for _ in range(num_buffers)]
        return self._bufs

    def close(self) -> None:
        self._drop_group()
        self.server.close()
        self._bufs = []

