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
The receiver half is in :mod:`refit.transports.nccl_receiver`.

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

import socket
import time

import torch
from typing_extensions import override

from refit.auth import CurveAuth
from refit.errors import ResolveError, TransportError
from refit.meta import Manifest
from refit.report import RefitReport
from refit.transports.base import Sender
from refit.transports.collective import (
    Backend,
    Communicator,
    GroupSetupFailed,
    Handle,
    Rendezvous,
    StoreServer,
    choose_backend,
    cupy_nccl,
    mark_failed,
    new_group_id,
)
from refit.transports.control import SETUP_FAILED
from refit.transports.join import connect
from refit.transports.peers import PeerGroup, Peers, peer_infos
from refit.wire import Fingerprints

GO_WORDS = 2  # int64 [push_id, go]


def join_group(rdv: Rendezvous, store: torch.distributed.Store, rank: int, device: torch.device, host: str | None, who: str) -> Communicator:
    """:func:`connect`; a failure here (not the barrier's verdict, already in the store) is
    written to the store, so the ranks waiting for this one stop at once."""
    try:
        return connect(rdv, store, rank, device, host=host)
    except GroupSetupFailed:
        raise
    except BaseException as exc:
        mark_failed(store, rdv.group, f"{who} (rank {rank}) could not join: {exc}")
        raise


def default_device() -> torch.device:
    """The staging device when none is given: CUDA if available, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def check_host(host: str | None, what: str) -> str | None:
    """``host`` (None passes) if peers can dial it: an IP address or a name that resolves, not
    the unspecified ``0.0.0.0`` / ``::`` (the sender's ``host`` is what receivers dial).

    Raises:
        TransportError: naming the option and the fix.
    """
    if host is None:
        return None
    fix = "pass an address of this host the other ranks can reach (default 127.0.0.1; under Ray, the node IP)"
    if not isinstance(host, str) or not host or host in ("0.0.0.0", "::"):
        raise TransportError(f"nccl: {what}={host!r:.80} is not an address peers can dial; {fix}")
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError) as exc:
        raise TransportError(f"nccl: {what}={host!r:.80} does not resolve ({exc}); {fix}") from None
    return host


def go_buffer(device: torch.device) -> torch.Tensor:
    """The go word, as the raw bytes every broadcast moves (read it with ``.view(torch.int64)``)."""
    return torch.zeros(GO_WORDS, dtype=torch.int64, device=device).view(torch.uint8)


class NcclSender(Sender):
    """Sender half (rank 0 of the group).

    Args:
        peers: the receivers: each its address or what its ``info()`` returned.
        timeout: seconds any wait (a verdict, a rendezvous, one broadcast) may take.
        backend: ``"auto"``, ``"nccl"`` or ``"gloo"``.
        device: staging buffers' device; default CUDA when available.
        host: address of this host that receivers can reach (the rendezvous store and gloo
            sockets listen on it); default loopback. Receivers dial it, so it must be an address
            (or resolvable name) of one interface, never ``0.0.0.0`` (TransportError).
        auth: CURVE keys (:class:`refit.auth.CurveAuth`) when the receivers require them (the control channel only: the
            rendezvous store and the broadcast are not covered).

    Example:
        >>> r = Refitter("nccl", peers=[rx.info()["address"] for rx in receivers])  # doctest: +SKIP
    """

    supports_checksum = True

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
        self.device = torch.device(device) if device is not None else default_device()
        self.backend = choose_backend(backend, self.device)
        if self.backend is Backend.GLOO and self.device.type == "cuda" and device is None:
            self.device = torch.device("cpu")  # auto-chosen gloo: stage on the host, gloo's home
        self.timeout, self.host = timeout, str(check_host(host, "host"))
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
        self._go = go_buffer(self.device)
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

    @override
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
            self.group.handshake(
                manifest,
                version,
                self._num_buffers,
                extra=lambda i: rdvs[i],
                after_hello=self._join_and_send_prelude,
                checksum=self.checksum or "",
                record=self.record,
            )
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
            try:
                self._comm = join_group(self._rendezvous(0), self._store.store, 0, self.device, self.host, "the sender")
            except GroupSetupFailed as exc:
                if "did not arrive" not in str(exc):
                    raise
                raise GroupSetupFailed(  # say why a receiver may not have come
                    f"{exc}; a receiver busy with another push (it reads a new Hello only between that push's buckets), "
                    f"stopped or dead does not join: check receivers {self._peer_names()}"
                ) from None
        if self._prelude and self._comm is not None:
            self.send(0, 0, self._prelude)
            self._prelude_sent = True

    def _go_word(self, push_id: int, what: str) -> Handle:
        if self._comm is None:
            raise TransportError(f"nccl transport ({self.backend}): no group (phase {what})")
        self._go.view(torch.int64).copy_(torch.tensor([push_id, 1 if push_id else 0], dtype=torch.int64))
        return self._comm.broadcast(self._go, what)

    # -- stream

    @override
    def buffers(self, bucket_bytes: int, num_buffers: int) -> list[torch.Tensor]:
        self._num_buffers = num_buffers
        if len(self._bufs) != num_buffers or self._bufs[0].numel() != bucket_bytes:
            self._bufs = [torch.empty(bucket_bytes, dtype=torch.uint8, device=self.device) for _ in range(num_buffers)]
        return self._bufs

    @override
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

    @override
    def send(self, index: int, slot: int, nbytes: int, checksum: bytes | None = None) -> None:
        if self._comm is None:
            raise TransportError(f"nccl transport: no group to broadcast bucket {index} (was the push aborted?)")
        if checksum is not None:  # over the control channel: read by each receiver before it applies the bucket
            self.group.send_bucket(index, nbytes, slot, checksum=checksum)  # (nccl never waits on a slot's acks)
        if nbytes == 0:
            return  # both sides skip empty buckets (sizes come from the manifest)
        if index == 0 and self._prelude_sent:
            return  # the prelude: already on its way since the handshake
        handle = self._comm.broadcast(self._bufs[slot][:nbytes], f"bucket {index} of {self._num_buckets}")
        self._inflight[slot] = (index, handle)

    @override
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

    @override
    def committed_versions(self) -> list[int] | None:
        return self.group.committed_versions()

    @override
    def fingerprints(self) -> list[Fingerprints] | None:
        return self.group.fingerprints()

    @override
    def abort(self, reason: str) -> None:
        self.group.abort(reason)
        # closing the group makes receivers blocked on a broadcast fail now (gloo) rather than
        # at their timeout; the next push builds a new group
        self._drop_group()

    @override
    def close(self) -> None:
        self._drop_group()
        self.group.close()
        if self._store is not None:
            self._store.close()
            self._store = None
        self._bufs = []
