"""Staging buckets shared by two processes: CUDA IPC memory on GPUs, POSIX shared memory on CPU.

What: the ``cuda_ipc`` sender owns a :class:`SharedBuffers` set (``count`` buckets of
``capacity`` bytes, allocated once and reused across pushes); it describes the set in an
:class:`Offer` that travels in ``Hello.extra``; each receiver opens the set once as
:class:`MappedBuffers` and keeps it open across pushes. Both sides see the buckets as 1-D
``uint8`` torch tensors, so packing and loading are the same code as every other transport.

Why this way:
* GPU buckets come from ``cudaMalloc`` (CuPy's runtime bindings), not from torch's caching
  allocator: with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` torch's own IPC path
  (``storage._share_cuda_``) fails, and a bucket carved from a cached block would export the
  whole segment. A raw allocation exports exactly itself. Torch sees it through
  ``__cuda_array_interface__`` (version 2: no stream semantics; we order work with events).
* Every CUDA runtime call goes through :func:`~refit.transports.cuda_runtime.cuda_call`, the
  one place that turns a status into a :class:`TransportError` with a fix-it hint.
* CPU buckets are files in ``/dev/shm`` mapped with ``torch.from_file(shared=True)``: torch owns
  each mapping and unmaps it only when the last tensor view dies, so ``close()`` can unlink the
  segment at once without ever leaving a dangling view. The sender registers each segment with
  multiprocessing's resource tracker, so a crashed trainer does not leak segments either.

Rejected: ``multiprocessing.shared_memory.SharedMemory`` views through ``torch.frombuffer``
(``close()`` unmaps memory that tensors still point to, and before Python 3.13 every attaching
process registers the segment and unlinks it at exit); pickled torch IPC reductions (pickle on
the wire, one handle per tensor, allocator-dependent); one allocation per push (handles opened
per push cost milliseconds each and fragment device memory).
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import secrets
import tempfile
import weakref
from dataclasses import dataclass
from multiprocessing import resource_tracker
from typing import Any

import msgpack
import torch

from refit.errors import TransportError, WireError
from refit.transports.cuda_runtime import cuda_call, cuda_index, device_tensor, runtime
from refit.wire import MAX_U64, check_int, check_str

MAX_BUFFERS = 64  # Hello.num_buffers and Bucket.slot allow at most this many
IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t) == sizeof(cudaIpcEventHandle_t)
_SHM_NAME = re.compile(r"^refit_[0-9a-f]{1,16}_[0-9a-f]{1,16}_[0-9]{1,2}$")
_SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class Kind(enum.StrEnum):
    """Where the shared buckets live."""

    CUDA = "cuda"  # device memory shared by CUDA IPC handles
    SHM = "shm"  # host memory shared as /dev/shm files (hosts without CUDA, CI)


class Sync(enum.StrEnum):
    """How the two processes order their GPU work around a bucket.

    ``event``: the sender records an IPC event after packing, the receiver's stream waits on it;
    the receiver records its own IPC event after unpacking and acks, the sender's stream waits
    on that before packing the slot again. Neither CPU blocks on the GPU.
    ``stream``: the sender synchronizes its stream before announcing a bucket and the receiver
    synchronizes before acking (for senders without the receiver's events, e.g. one process).
    """

    EVENT = "event"
    STREAM = "stream"


# ---------------------------------------------------------------- the offer (Hello.extra)


@dataclass(frozen=True)
class Offer:
    """A sender's buffer set as a receiver needs to know it, for one push.

    ``buffers`` (CUDA IPC handles, or shm segment names) and ``events`` (IPC handles of the
    sender's per-slot "packed" events) are None when this receiver already opened set
    ``set_id``. ``place`` is the GPU UUID (``cuda``) or host id (``shm``) the buckets live on.
    """

    kind: Kind
    sender: int
    set_id: int
    pid: int
    place: str
    capacity: int
    count: int
    sync: Sync
    buffers: tuple[bytes | str, ...] | None
    events: tuple[bytes, ...] | None

    def encode(self) -> bytes:
        """This offer as msgpack bytes, the handshake's ``extra`` payload (read back by :func:`decode_offer`)."""
        return msgpack.packb(
            {
                "v": 1,
                "kind": self.kind.value,
                "sender": self.sender,
                "set": self.set_id,
                "pid": self.pid,
                "place": self.place,
                "capacity": self.capacity,
                "count": self.count,
                "sync": self.sync.value,
                "buffers": None if self.buffers is None else list(self.buffers),
                "events": None if self.events is None else list(self.events),
            },
            use_bin_type=True,
        )


def _int(d: dict[str, Any], key: str, lo: int = 0, hi: int = MAX_U64) -> int:
    return check_int(d.get(key), f"extra.{key}", lo, hi)


def _str(d: dict[str, Any], key: str) -> str:
    return check_str(d.get(key), f"extra.{key}", 256)


def decode_offer(data: bytes) -> Offer:
    """Validate and decode ``Hello.extra`` of a ``cuda_ipc`` push.

    Raises:
        WireError: naming the bad field (also when a zmq or nccl sender reached this receiver).
    """
    try:
        d = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for malformed input
        raise WireError(f"field 'extra': not a cuda_ipc offer ({type(exc).__name__}); is the sender using transport 'cuda_ipc'?") from None
    if type(d) is not dict or d.get("v") != 1:
        raise WireError("field 'extra': not a cuda_ipc offer (version 1); is the sender using transport 'cuda_ipc'?")
    try:
        kind, sync = Kind(str(d.get("kind"))), Sync(str(d.get("sync")))
    except ValueError:
        raise WireError(f"field 'extra.kind' / 'extra.sync': expected one of {list(Kind)} / {list(Sync)}") from None
    count = _int(d, "count", 1, MAX_BUFFERS)
    buffers: tuple[bytes | str, ...] | None = None
    events: tuple[bytes, ...] | None = None
    raw = d.get("buffers")
    if raw is not None:
        if type(raw) is not list or len(raw) != count:
            raise WireError(f"field 'extra.buffers': expected a list of {count} items")
        if kind is Kind.CUDA:
            if any(type(h) is not bytes or len(h) != IPC_HANDLE_BYTES for h in raw):
                raise WireError(f"field 'extra.buffers': expected {IPC_HANDLE_BYTES}-byte CUDA IPC handles")
            buffers = tuple(raw)
        else:
            if any(type(n) is not str or not _SHM_NAME.match(n) for n in raw):
                raise WireError("field 'extra.buffers': expected refit shared-memory segment names")
            buffers = tuple(raw)
        ev = d.get("events")
        if ev is not None:
            if type(ev) is not list or len(ev) != count or any(type(h) is not bytes or len(h) != IPC_HANDLE_BYTES for h in ev):
                raise WireError(f"field 'extra.events': expected {count} {IPC_HANDLE_BYTES}-byte IPC event handles")
            events = tuple(ev)
    return Offer(
        kind=kind,
        sender=_int(d, "sender"),
        set_id=_int(d, "set"),
        pid=_int(d, "pid", 0, 1 << 32),
        place=_str(d, "place"),
        capacity=_int(d, "capacity", 1, 1 << 44),
        count=count,
        sync=sync,
        buffers=buffers,
        events=events,
    )


# ---------------------------------------------------------------- sender side

# Sets alive in this process, by id: a receiver in the same process borrows the tensors
# (a process cannot open its own CUDA IPC handles).
_LOCAL: weakref.WeakValueDictionary[int, SharedBuffers] = weakref.WeakValueDictionary()


class SharedBuffers:
    """The sender's persistent staging buckets, shareable with other processes.

    Args:
        kind: ``Kind.CUDA`` (``device`` must be a CUDA device) or ``Kind.SHM``.
        device: where the buckets live.
        capacity: bytes per bucket.
        count: number of buckets (1..64).

    ``tensors[i]`` is bucket ``i`` as a 1-D uint8 tensor; ``handles`` what a receiver needs to
    open them; ``events[i]`` (CUDA) the interprocess event recorded after bucket ``i`` is packed.
    Tensors are invalid after :meth:`close` (CUDA: freed; shm: unlinked, unmapped with the last
    view).
    """

    def __init__(self, kind: Kind, device: torch.device, capacity: int, count: int) -> None:
        if not 1 <= count <= MAX_BUFFERS or capacity < 1:
            raise TransportError(f"cuda_ipc needs 1..{MAX_BUFFERS} buffers of at least 1 byte, got {count} x {capacity}")
        self.kind, self.device, self.capacity, self.count = kind, device, capacity, count
        self.set_id = secrets.randbits(62)
        self.tensors: list[torch.Tensor] = []
        self.handles: list[bytes | str] = []
        self.events: list[torch.cuda.Event] = []
        self._ptrs: list[int] = []
        self._paths: list[str] = []
        try:
            self._allocate_cuda() if kind is Kind.CUDA else self._allocate_shm()
        except BaseException:
            self.close()
            raise
        _LOCAL[self.set_id] = self

    def _allocate_cuda(self) -> None:
        rt = runtime()
        import cupy

        handles: list[bytes | str] = []
        with cupy.cuda.Device(cuda_index(self.device)), torch.cuda.device(self.device):
            for _ in range(self.count):
                ptr = cuda_call("cudaMalloc", rt.malloc, self.capacity)
                self._ptrs.append(ptr)
                handles.append(bytes(cuda_call("cudaIpcGetMemHandle", rt.ipcGetMemHandle, ptr)))
                self.tensors.append(device_tensor(ptr, self.capacity, self.device))
                ev = torch.cuda.Event(interprocess=True)
                ev.ipc_handle()  # creates the event now, on this device
                self.events.append(ev)
        self.handles = handles

    def _allocate_shm(self) -> None:
        names: list[bytes | str] = []
        tag = f"refit_{os.getpid():x}_{secrets.token_hex(6)}"
        for i in range(self.count):
            name = f"{tag}_{i}"
            path = os.path.join(_SHM_DIR, name)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)  # owner-only, never an existing file
            self._paths.append(path)
            try:
                os.ftruncate(fd, self.capacity)
            finally:
                os.close(fd)
            if _SHM_DIR == "/dev/shm":  # a crashed sender's segments are unlinked by the tracker
                resource_tracker.register("/" + name, "shared_memory")
            self.tensors.append(torch.from_file(path, shared=True, size=self.capacity, dtype=torch.uint8))
            names.append(name)
        self.handles = names

    def event_handles(self) -> list[bytes]:
        """The IPC handles of the per-slot "packed" events, for a receiver to open."""
        return [bytes(e.ipc_handle()) for e in self.events]

    def close(self) -> None:
        """Free the buckets (CUDA) or unlink the segments (shm). Idempotent."""
        _LOCAL.pop(self.set_id, None)
        self.tensors, self.events = [], []
        if self._ptrs:
            rt = runtime()
            import cupy

            torch.cuda.synchronize(self.device)  # no pack kernel of ours may still write them
            with cupy.cuda.Device(cuda_index(self.device)):
                for ptr in self._ptrs:
                    cuda_call("cudaFree", rt.free, ptr)
            self._ptrs = []
        for path in self._paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            if _SHM_DIR == "/dev/shm":
                with contextlib.suppress(Exception):
                    resource_tracker.unregister("/" + os.path.basename(path), "shared_memory")
        self._paths = []

    def __enter__(self) -> SharedBuffers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- receiver side


class MappedBuffers:
    """A receiver's view of a sender's :class:`SharedBuffers`, opened once per set.

    Use :meth:`open`. ``tensors[i]`` is the sender's bucket ``i``; ``events[i]`` (CUDA) the
    sender's "packed" event of that slot. Tensors are invalid after :meth:`close`.
    """

    def __init__(self, offer: Offer, device: torch.device) -> None:
        self.set_id, self.sender, self.kind = offer.set_id, offer.sender, offer.kind
        self.capacity, self.count = offer.capacity, offer.count
        self.device = device
        self.tensors: list[torch.Tensor] = []
        self.events: list[torch.cuda.Event] = []
        self._opened: list[int] = []  # device pointers to ipcCloseMemHandle on close

    @property
    def open_handles(self) -> int:
        """CUDA IPC memory handles this view holds open (0 for shm or a borrowed local set)."""
        return len(self._opened)

    @classmethod
    def open(cls, offer: Offer, device: torch.device) -> MappedBuffers:
        """Open every bucket of ``offer`` (which must carry its handles).

        Raises:
            TransportError: a handle or segment could not be opened (the message says why).
        """
        self = cls(offer, device)
        local = _LOCAL.get(offer.set_id) if offer.pid == os.getpid() else None
        if local is not None:  # same process: borrow (CUDA cannot reopen its own handles)
            self.tensors, self.events = list(local.tensors), list(local.events)
            return self
        if offer.buffers is None:
            raise TransportError(f"buffer set {offer.set_id:x} is not open here and the sender did not send its handles")
        try:
            self._open_cuda(offer) if offer.kind is Kind.CUDA else self._open_shm(offer)
        except BaseException:
            self.close()
            raise
        return self

    def _open_cuda(self, offer: Offer) -> None:
        rt = runtime()
        import cupy

        if self.device.type != "cuda":
            raise TransportError("the sender offers GPU buckets but this receiver has no CUDA device; pass device='cuda:N'")
        with cupy.cuda.Device(cuda_index(self.device)), torch.cuda.device(self.device):
            for handle in offer.buffers or ():
                ptr = cuda_call("cudaIpcOpenMemHandle", rt.ipcOpenMemHandle, handle, rt.cudaIpcMemLazyEnablePeerAccess)
                self._opened.append(ptr)
                self.tensors.append(device_tensor(ptr, offer.capacity, self.device))
            # Opened whatever the sync mode: cheap, and the set stays usable if the mode changes.
            self.events = [torch.cuda.Event.from_ipc_handle(self.device, h) for h in offer.events or ()]

    def _open_shm(self, offer: Offer) -> None:
        for name in [n for n in offer.buffers or () if isinstance(n, str)]:
            path = os.path.join(_SHM_DIR, name)
            try:
                size = os.stat(path).st_size  # never let from_file create a missing segment
            except OSError as exc:
                raise TransportError(f"shared-memory segment {name} cannot be opened ({exc}); is the sender on this host?") from None
            if size < offer.capacity:
                raise TransportError(f"shared-memory segment {name} has {size} bytes, the offer says {offer.capacity}")
            self.tensors.append(torch.from_file(path, shared=True, size=offer.capacity, dtype=torch.uint8))

    def close(self) -> None:
        """Close the CUDA IPC handles (or drop the shm mappings). Idempotent."""
        self.tensors, self.events = [], []
        if self._opened:
            rt = runtime()
            import cupy

            torch.cuda.synchronize(self.device)  # no copy of ours may still read them
            with cupy.cuda.Device(cuda_index(self.device)):
                for ptr in self._opened:
                    cuda_call("cudaIpcCloseMemHandle", rt.ipcCloseMemHandle, ptr)
            self._opened = []
