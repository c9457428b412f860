"""``cuda_ipc``: persistent GPU buckets shared once by CUDA IPC; control over ZMQ.

What it does: the sender allocates ``num_buffers`` buckets once (raw ``cudaMalloc``, see
:mod:`refit.transports.shared_buffers`) and sends their IPC handles in ``Hello.extra`` only to
receivers that have not opened this set yet; each receiver opens them once and keeps them open
across pushes. A push is then the ``zmq`` transport's protocol with empty data frames: the
sender packs bucket ``i`` into slot ``i % num_buffers`` and announces it; the receiver copies
out of the slot straight into its targets and acks. Handshake, verdicts, acks, finish and abort
are :mod:`refit.transports.control`'s, unchanged.

Ordering (``Sync.EVENT``, the default between processes): the sender records an interprocess
event after packing a slot, the receiver's stream waits on it before copying out; the receiver
records its own interprocess event (handles in its ``info()``) after copying out, then acks; the
sender's stream waits on that event before packing the slot again. No CPU waits on a GPU, so the
receiver's copies of bucket ``i`` and the sender's packing of bucket ``i + 1`` are queued on the
GPU together and it never idles between buckets. ``Sync.STREAM`` (stream synchronize before
announce and before ack) is the fallback when the sender lacks the receiver's events, e.g. in
one process. The ack alone keeps a slot from being overwritten early in either mode.

Matching: the receiver refuses a sender on another GPU (by UUID) in the handshake, so a
misconfigured placement fails with a clear verdict instead of a CUDA error mid-stream.

Without CUDA, the same transport shares ``/dev/shm`` buckets (``Kind.SHM``): the same protocol,
offer, caching and lifetimes, so CI exercises all of it.

Rejected: one IPC handle per tensor (opening ~700 handles per push costs far more than the
copies); a fresh ``torch.cat`` bucket and handle per bucket (an allocation, an export and an
open per bucket, plus torch's allocator-dependent IPC); pickled torch reductions (remote code
execution on the receiver); having the sender copy into the receiver's targets directly (it
bypasses the receiver's strict loader and its name resolution).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from typing_extensions import override

from refit.auth import CurveAuth
from refit.errors import RefitError, TransportError, WireError
from refit.load import Loader
from refit.meta import Manifest
from refit.report import RefitReport
from refit.transports.base import ReceiverTransport, Sender
from refit.transports.control import ControlServer, Frames
from refit.transports.cuda_runtime import cuda_index, gpu_uuid, host_id
from refit.transports.peers import PeerGroup, Peers, peer_infos
from refit.transports.shared_buffers import IPC_HANDLE_BYTES, Kind, MappedBuffers, Offer, SharedBuffers, Sync, decode_offer
from refit.wire import Bucket, Fingerprints, Hello

_GRANULE = 2 << 20  # bucket capacity is rounded up to this (the CUDA allocation granularity)
MAX_CACHED_SETS = 4  # buffer sets a receiver keeps open (one per recent sender)


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TransportError(f"device {device!r}: CUDA is not available here; use device='cpu' (shared memory)")
        return torch.device("cuda", cuda_index(dev))
    if dev.type != "cpu":
        raise TransportError(f"cuda_ipc supports device 'cuda[:N]' or 'cpu' (shared memory), got {device!r}")
    return dev


def _place(device: torch.device) -> str:
    return gpu_uuid(device) if device.type == "cuda" else host_id()


def default_address() -> str:
    """A fresh owner-only ``ipc://`` path in the temp directory."""
    return f"ipc://{tempfile.gettempdir()}/refit-{os.getpid()}-{secrets.token_hex(4)}.sock"


class CudaIpcSender(Sender):
    """Sender half: persistent shared buckets on ``device``, pushed to every receiver in ``peers``.

    Args:
        peers: each receiver's ``info()`` dict (preferred: it carries the GPU UUID and the
            receiver's events) or bare control address.
        timeout: seconds any wait for a receiver may take.
        device: ``"auto"`` (the current CUDA device; shared memory without CUDA or when every
            receiver's info reports no GPU), ``"cuda:N"`` or ``"cpu"``.
        sync: ``"auto"`` (``event`` when every peer's info carries events and lives in another
            process, else ``stream``), ``"event"`` or ``"stream"``; see the module docstring.
        num_buffers: buckets shared by the first push; later pushes use what the driver asked
            for (``Refitter(num_buffers=...)``) in the previous one.
        auth: CURVE keys (:class:`refit.auth.CurveAuth`) when the receivers require them.

    Example:
        >>> with Refitter(CudaIpcSender([rx_info]), bucket_bytes=1 << 30) as r:  # doctest: +SKIP
        ...     r.push(model.state_dict(), scales)
    """

    supports_checksum = True

    def __init__(
        self,
        peers: Peers = (),
        *,
        timeout: float = 120.0,
        device: str | torch.device = "auto",
        sync: str = "auto",
        num_buffers: int = 2,
        auth: CurveAuth | None = None,
    ) -> None:
        infos = peer_infos(peers, "cuda_ipc")
        addresses = [i["address"] for i in infos]
        if str(device) == "auto" and infos and all(i.get("uuid") == "" for i in infos):
            device = "cpu"  # every receiver reported no GPU: share host memory
        self.device = _device(device)
        self.kind = Kind.CUDA if self.device.type == "cuda" else Kind.SHM
        self.place = _place(self.device)
        wrong = [f"{i['address']}: on {i['uuid']}" for i in infos if self.kind is Kind.CUDA and i.get("uuid") not in (None, "", self.place)]
        if wrong:
            raise TransportError(f"cuda_ipc needs every receiver on this GPU ({self.place}); " + "; ".join(wrong) + ". Use transport 'nccl'.")
        self.sync = self._choose_sync(sync, infos)
        self.group = PeerGroup(addresses, timeout=timeout, auth=auth)
        self.sender_id = secrets.randbits(62)
        self._want = num_buffers
        self._set: SharedBuffers | None = None
        self._offered: int | None = None  # the set_id every receiver has open
        self._done: list[list[torch.cuda.Event]] = []  # per peer: its "consumed" events
        if self.sync is Sync.EVENT:
            self._done = [[torch.cuda.Event.from_ipc_handle(self.device, bytes.fromhex(h)) for h in i["events"]] for i in infos]

    def _choose_sync(self, sync: str, infos: Sequence[Mapping[str, Any]]) -> Sync:
        try:
            choice = Sync(sync) if sync != "auto" else None
        except ValueError:
            raise TransportError(f"sync must be 'auto', 'event' or 'stream', got {sync!r}") from None
        usable = (
            self.kind is Kind.CUDA
            and bool(infos)
            and all(
                i.get("pid") != os.getpid() and isinstance(i.get("events"), list) and i["events"] and all(_is_handle(h) for h in i["events"])
                for i in infos
            )
        )
        if choice is Sync.EVENT and not usable:
            raise TransportError("sync='event' needs CUDA and, for every receiver, its info() (with events) from another process")
        if choice is not None:
            return choice
        return Sync.EVENT if usable else Sync.STREAM

    # -- buffers

    def _ensure_set(self, manifest: Manifest) -> SharedBuffers:
        need = max(manifest.bucket_sizes, default=0)
        capacity = min(max(-(-need // _GRANULE) * _GRANULE, _GRANULE), manifest.bucket_bytes)
        s = self._set
        if s is None or s.count != self._want or s.capacity < need or s.capacity > manifest.bucket_bytes:
            if s is not None:
                s.close()
                self._set = None
            s = self._set = SharedBuffers(self.kind, self.device, capacity, self._want)
        return s

    def _offer(self, i: int) -> bytes:
        s = self._set
        if s is None:  # handshake allocates first
            raise TransportError("cuda_ipc: no buffer set")
        known = self._offered == s.set_id
        return Offer(
            kind=self.kind,
            sender=self.sender_id,
            set_id=s.set_id,
            pid=os.getpid(),
            place=self.place,
            capacity=s.capacity,
            count=s.count,
            sync=self.sync,
            buffers=None if known else tuple(s.handles),
            events=None if known or self.kind is Kind.SHM else tuple(s.event_handles()),
        ).encode()

    @override
    def stage(self, manifest: Manifest) -> None:
        self._ensure_set(manifest)

    @override
    def handshake(self, manifest: Manifest, version: int) -> None:
        s = self._ensure_set(manifest)  # the set stage() made, unchanged (bucket 0 is in it)
        try:
            self.group.handshake(manifest, version, s.count, extra=self._offer, checksum=self.checksum or "", record=self.record)
        except RefitError:
            self._offered = None  # resend handles next time (cheap, idempotent)
            raise
        self._offered = s.set_id

    @override
    def configure(self, bucket_bytes: int, num_buffers: int) -> None:
        self._want = num_buffers

    def buffers(self, bucket_bytes: int, num_buffers: int) -> list[torch.Tensor]:
        """The shared buckets of this push (made by ``stage`` with ``configure``'s count, shared
        at handshake; changing the count here would swap the set under a packed bucket)."""
        if self._set is None:
            raise TransportError("cuda_ipc: buffers() before stage()")
        return self._set.tensors

    @override
    def wait_reusable(self, slot: int) -> None:
        if self.group.wait_slot(slot) and self.sync is Sync.EVENT:
            # The ack of the slot's last bucket was sent after the receiver recorded its event, so
            # the stream waits at least for that bucket's copies (a later record only waits longer).
            stream = torch.cuda.current_stream(self.device)
            for events in self._done:
                stream.wait_event(events[slot % len(events)])

    @override
    def send(self, index: int, slot: int, nbytes: int, checksum: bytes | None = None) -> None:
        s = self._set
        if s is None:
            raise TransportError("cuda_ipc: send() before handshake()")
        if self.sync is Sync.EVENT:
            s.events[slot].record(torch.cuda.current_stream(self.device))
        elif self.kind is Kind.CUDA:
            torch.cuda.current_stream(self.device).synchronize()
        self.group.send_bucket(index, nbytes, slot, checksum=checksum)

    @override
    def finish(self) -> list[RefitReport]:
        return self.group.finish()

    @override
    def committed_versions(self) -> list[int] | None:
        return self.group.committed_versions()

    @override
    def fingerprints(self) -> list[Fingerprints] | None:
        return self.group.fingerprints()

    @override
    def abort(self, reason: str) -> None:
        self.group.abort(reason)

    @property
    def staging_bytes(self) -> int:
        """Bytes of shared buckets this sender holds now."""
        return 0 if self._set is None else self._set.capacity * self._set.count

    @override
    def close(self) -> None:
        self.group.close()
        self._done = []
        if self._set is not None:
            self._set.close()
            self._set = None


def _is_handle(h: object) -> bool:
    return isinstance(h, str) and len(h) == 2 * IPC_HANDLE_BYTES and all(c in "0123456789abcdef" for c in h)


class CudaIpcReceiver(ReceiverTransport):
    """Receiver half: binds an owner-only ``ipc://`` socket and copies out of shared buckets.

    Args:
        address: control address; default a fresh ``ipc://`` path in the temp directory.
        name: this receiver's name in reports and errors.
        device: ``"auto"`` (current CUDA device, else CPU), ``"cuda:N"`` or ``"cpu"``. Must be the
            GPU the sender packs on.
        events: interprocess events recorded after each bucket's copies (for ``Sync.EVENT``).
        auth: CURVE keys (:class:`refit.auth.CurveAuth`): only senders holding the expected key
            are heard. Default: unauthenticated (see docs/reliability.md).
    """

    def __init__(
        self,
        *,
        address: str | None = None,
        name: str = "receiver",
        device: str | torch.device = "auto",
        events: int = 4,
        auth: CurveAuth | None = None,
    ) -> None:
        self.device = _device(device)
        self.place = _place(self.device)
        self.host = host_id()  # what a shared-memory offer must match
        self.name = name
        self._events: list[torch.cuda.Event] = []
        self._handles: list[str] = []
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                self._events = [torch.cuda.Event(interprocess=True) for _ in range(max(1, events))]
                self._handles = [bytes(e.ipc_handle()).hex() for e in self._events]
        self.server = ControlServer(address or default_address(), name=name, auth=auth)
        self._sets: dict[int, MappedBuffers] = {}  # sender id -> its open set
        self._current: tuple[MappedBuffers, Offer] | None = None

    @override
    def info(self) -> dict[str, Any]:
        return {
            "address": self.server.address,
            "pid": os.getpid(),
            "uuid": self.place if self.device.type == "cuda" else "",
            "events": list(self._handles),
        }

    @property
    def open_handles(self) -> int:
        """CUDA IPC memory handles held open now (stays ``num_buffers`` across pushes)."""
        return sum(m.open_handles for m in self._sets.values())

    def _on_hello(self, hello: Hello) -> None:
        offer = decode_offer(hello.extra)
        if offer.kind is Kind.CUDA and self.device.type != "cuda":
            raise TransportError(f"{self.name} has no CUDA device but the sender offers GPU buckets; pass device='cuda:N'")
        mine = self.place if offer.kind is Kind.CUDA else self.host
        if offer.place != mine:
            where = "GPU" if offer.kind is Kind.CUDA else "host"
            raise TransportError(
                f"{self.name}: sender buckets are on {where} {offer.place}, this receiver is on {mine}; "
                f"cuda_ipc needs both on the same {where} (use transport 'nccl' or 'zmq' otherwise)"
            )
        if hello.num_buffers != offer.count:
            raise WireError(f"field 'extra.count': {offer.count} buffers offered, Hello says {hello.num_buffers}")
        mapped = self._sets.get(offer.sender)
        if mapped is None or mapped.set_id != offer.set_id:
            if mapped is not None:  # the sender re-allocated: its old set is gone
                self._sets.pop(offer.sender).close()
            if offer.buffers is None:
                raise TransportError(f"{self.name}: buffer set {offer.set_id:x} is not open here (receiver restarted?); push again")
            while len(self._sets) >= MAX_CACHED_SETS:
                self._sets.pop(next(iter(self._sets))).close()
            mapped = MappedBuffers.open(offer, self.device)
            self._sets[offer.sender] = mapped
        if offer.sync is Sync.EVENT and not mapped.events:
            raise TransportError(f"{self.name}: the sender asked for event sync but this set has no events")
        self._current = (mapped, offer)

    def _bucket(self, msg: Bucket, frames: Frames) -> tuple[torch.Tensor, bool]:
        if self._current is None:
            raise WireError(f"{self.name}: bucket {msg.index} before a handshake")
        mapped, offer = self._current
        if frames:
            raise WireError(f"{self.name}: bucket {msg.index} carries {len(frames)} data frames; cuda_ipc buckets carry none")
        if msg.slot >= mapped.count or msg.nbytes > mapped.capacity:
            raise WireError(f"{self.name}: bucket {msg.index} in slot {msg.slot} ({msg.nbytes} bytes) is outside {mapped.count} x {mapped.capacity}")
        if offer.sync is Sync.EVENT:
            torch.cuda.current_stream(self.device).wait_event(mapped.events[msg.slot])
        return mapped.tensors[msg.slot][: msg.nbytes], True  # opened once per buffer set, reused across pushes

    def _after_apply(self, msg: Bucket) -> None:
        """Before the ack releases the sender's buffer: the copies out of it are only queued on
        the GPU, so record this slot's event (or synchronize)."""
        if self._current is None:
            return
        offer = self._current[1]
        if offer.sync is Sync.EVENT:
            self._events[msg.slot % len(self._events)].record(torch.cuda.current_stream(self.device))
        elif offer.kind is Kind.CUDA:
            torch.cuda.current_stream(self.device).synchronize()
        elif torch.cuda.is_initialized():  # host buckets into GPU targets: copies must have read them
            torch.cuda.synchronize()

    @override
    def receive(self, loader: Loader, timeout: float | None, *, push_timeout: float | None = None) -> RefitReport | None:
        return self.server.receive(loader, timeout, self._bucket, on_hello=self._on_hello, after_apply=self._after_apply, push_timeout=push_timeout)

    @override
    def close(self) -> None:
        self._current = None
        for mapped in self._sets.values():
            with contextlib.suppress(Exception):
                mapped.close()
        self._sets.clear()
        self.server.close()
        self._events = []
