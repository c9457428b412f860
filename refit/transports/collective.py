"""Private broadcast communicators for the ``nccl`` transport: NCCL through CuPy, or gloo.

What it does: builds a communicator of ``world`` ranks (rank 0: the sender, ranks 1..N: the
receivers) from a :class:`Rendezvous` record, and broadcasts 1-D ``uint8`` buffers from rank 0
with a :class:`Handle` per call whose ``wait()`` is bounded and raises :class:`TransportError`
naming the group, the phase and the bucket.

Why this way:

* The communicator is *dedicated*: never the trainer's or the engine's default process group.
  A refit group joins one trainer rank with engine workers that belong to other jobs' groups;
  reusing a default group would tie refit to their ranks, their lifetime and their timeouts.
  The gloo backend is ``ProcessGroupGloo(store, rank, world, options)`` built directly on a
  private ``TCPStore`` (no ``init_process_group``/``new_group``, so a process that already has a
  default group keeps it untouched).
* NCCL goes through CuPy (``cupy.cuda.nccl``; cupy-cuda12x or -13x) rather than
  ``torch.distributed`` NCCL, which would need a torch default group or private c10d API. Every
  NCCL status goes through :func:`nccl_check`. Work runs on a dedicated CUDA stream ordered
  after the caller's current torch stream by events (never the legacy default stream).
* Collectives have no timeout of their own. Gloo gets one through its options. For NCCL a
  watchdog thread watches every outstanding broadcast and calls ``comm.abort()`` when one passes
  its deadline (or NCCL reports an asynchronous error); the kernels then return and the waiter
  raises. ``ncclCommInitRank`` has no timeout either, so every rank first meets at a store
  barrier that has one: the init only starts once all ranks are known to be alive.
* NCCL's destroy and abort wait until every rank of the node released the communicator, so they
  run in a daemon thread (:func:`_release`): a rank that closes first never hangs on one that
  keeps the group.

Rejected: pickled rendezvous data (remote code execution); ``torch.distributed.new_group``
(collective over the *default* group, which the trainer and the engine do not share); a
per-push communicator (NCCL init costs seconds; the group lives across pushes and is rebuilt
only after a failure).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import secrets
import socket
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgpack
import torch

from refit.errors import TransportError, WireError
from refit.transports.shared_buffers import cuda_index

RENDEZVOUS_VERSION = 2
# cupy's broadcast takes an ``int`` count: larger buckets go in pieces below 2**31.
_NCCL_MAX_COUNT = 1 << 30


class Backend(StrEnum):
    """Which library moves the bytes."""

    NCCL = "nccl"
    GLOO = "gloo"


def cupy_nccl() -> Any | None:
    """``cupy.cuda.nccl`` if CuPy with NCCL is importable, else None."""
    try:
        import cupy  # noqa: F401  (any of cupy-cuda12x / cupy-cuda13x)
        from cupy.cuda import nccl
    except Exception:  # ImportError, or a CUDA library that fails to load
        return None
    return nccl if getattr(nccl, "available", False) else None


def choose_backend(backend: str, device: torch.device) -> Backend:
    """Resolve ``"auto"``: NCCL when buffers live on CUDA and CuPy is importable, else gloo.

    Raises:
        TransportError: an unknown name, or ``"nccl"`` without CUDA buffers or CuPy.
    """
    auto = Backend.NCCL if device.type == "cuda" and cupy_nccl() is not None else Backend.GLOO
    try:
        chosen = auto if backend == "auto" else Backend(backend)
    except ValueError:
        raise TransportError(f"unknown backend {backend!r}; choose 'auto', 'nccl' or 'gloo'") from None
    if chosen is Backend.NCCL:
        if device.type != "cuda":
            raise TransportError(f"backend 'nccl' needs CUDA staging buffers, got device {device}; pass device='cuda' or backend='gloo'")
        if cupy_nccl() is None:
            raise TransportError("backend 'nccl' needs CuPy with NCCL: pip install cupy-cuda12x (or cupy-cuda13x); or pass backend='gloo'")
    return chosen


@dataclass(frozen=True, kw_only=True)
class Rendezvous:
    """What one receiver needs to join the sender's group (travels in ``Hello.extra``).

    Attributes:
        backend: the communicator's library.
        group: id of the group; a receiver already in it joins nothing.
        rank: this receiver's rank (1..world-1; the sender is 0).
        world: 1 sender + N receivers.
        host, port: the sender's TCPStore (barrier and gloo address exchange).
        unique_id: NCCL unique id (128 bytes; empty for gloo).
        timeout: seconds any collective of this group may take.
        fresh: the sender builds this group now (else receivers must already be in it).
        prelude: bytes of bucket 0 the sender broadcasts *before* the go word, while the
            verdicts are still on their way (0: none); every rank takes part in it.
    """

    backend: Backend
    group: str
    rank: int
    world: int
    host: str
    port: int
    unique_id: bytes = b""
    timeout: float = 120.0
    fresh: bool = True
    prelude: int = 0

    def encode(self) -> bytes:
        """msgpack bytes (never pickle)."""
        return msgpack.packb(
            {
                "v": RENDEZVOUS_VERSION,
                "backend": str(self.backend),
                "group": self.group,
                "rank": self.rank,
                "world": self.world,
                "host": self.host,
                "port": self.port,
                "unique_id": self.unique_id,
                "timeout": self.timeout,
                "fresh": self.fresh,
                "prelude": self.prelude,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Rendezvous:
        """Validate and decode; raises :class:`WireError` naming the bad field."""
        try:
            d = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:
            raise WireError(f"rendezvous: not msgpack ({exc}); sender and receiver must run the same refit version") from None
        if not isinstance(d, dict):
            raise WireError("rendezvous: expected a map")

        def field(name: str, kind: type | tuple[type, ...]) -> Any:
            value = d.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise WireError(f"rendezvous field {name!r}: expected {kind}, got {type(value).__name__}")
            return value

        if field("v", int) != RENDEZVOUS_VERSION:
            raise WireError(f"rendezvous field 'v': version {d['v']} not supported (this refit speaks {RENDEZVOUS_VERSION})")
        try:
            backend = Backend(field("backend", str))
        except ValueError:
            raise WireError(f"rendezvous field 'backend': unknown {d['backend']!r}") from None
        world, rank, port = field("world", int), field("rank", int), field("port", int)
        if not 2 <= world <= 1 << 16:
            raise WireError(f"rendezvous field 'world': {world} out of range [2, 65536]")
        if not 1 <= rank < world:
            raise WireError(f"rendezvous field 'rank': {rank} out of range [1, {world})")
        if not 0 < port < 65536:
            raise WireError(f"rendezvous field 'port': {port} out of range")
        group, host = field("group", str), field("host", str)
        if not 0 < len(group) <= 64 or not 0 < len(host) <= 255:
            raise WireError("rendezvous field 'group' or 'host': empty or too long")
        unique_id = field("unique_id", bytes)
        if backend is Backend.NCCL and len(unique_id) != 128:
            raise WireError(f"rendezvous field 'unique_id': NCCL ids are 128 bytes, got {len(unique_id)}")
        timeout = float(field("timeout", (int, float)))
        if not (math.isfinite(timeout) and timeout > 0):
            raise WireError(f"rendezvous field 'timeout': {timeout} must be a positive number of seconds")
        fresh = d.get("fresh")
        if not isinstance(fresh, bool):
            raise WireError(f"rendezvous field 'fresh': expected a bool, got {type(fresh).__name__}")
        prelude = field("prelude", int)
        if not 0 <= prelude < 1 << 62:
            raise WireError(f"rendezvous field 'prelude': {prelude} out of range")
        fields = {"backend": backend, "group": group, "rank": rank, "world": world, "host": host, "port": port}
        return cls(**fields, unique_id=unique_id, timeout=timeout, fresh=fresh, prelude=prelude)


def new_group_id() -> str:
    return secrets.token_hex(8)


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


class StoreServer:
    """The sender's TCPStore, bound to ``host`` on a free port (loopback by default).

    The listening socket is bound here and handed to the store, so the store listens only on
    ``host`` (c10d would otherwise listen on every interface).
    """

    def __init__(self, host: str, timeout: float) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind((host, 0))
            sock.listen(128)
            self.port = int(sock.getsockname()[1])
            self.store: torch.distributed.Store | None = torch.distributed.TCPStore(
                host, self.port, None, True, timeout=_td(timeout), wait_for_workers=False, master_listen_fd=sock.fileno()
            )
        except BaseException:
            sock.close()
            raise
        sock.detach()  # the store owns the listening fd now and closes it itself

    def close(self) -> None:
        self.store = None


def client_store(host: str, port: int, timeout: float) -> torch.distributed.Store:
    """A client connection to the sender's store."""
    try:
        return torch.distributed.TCPStore(host, port, None, False, timeout=_td(timeout))
    except Exception as exc:
        raise TransportError(f"cannot reach the sender's rendezvous store at {host}:{port} within {timeout} s: {exc}") from exc


class Handle(ABC):
    """One broadcast in flight."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> None:
        """Block until done, at most ``timeout`` seconds (None, or more than the group's own
        timeout: the group's timeout). A caller passes its own, shorter bound: a receiver's
        ``receive(timeout=...)`` holds even when the sender's group allows longer.

        Raises:
            TransportError: the broadcast failed or timed out; the group is unusable.
        """


class Communicator(ABC):
    """A dedicated broadcast group. ``close()`` releases it (idempotent)."""

    backend: Backend
    rank: int
    world: int
    name: str  # for error messages: "gloo group 3fa2... (rank 1 of 4)"

    @abstractmethod
    def broadcast(self, buf: torch.Tensor, what: str) -> Handle:
        """Broadcast ``buf`` (contiguous 1-D ``uint8``) from rank 0 into every rank's ``buf``.

        Returns at once; the buffer must not be touched until ``wait()`` returned.
        ``what`` names the operation in errors (e.g. ``"bucket 3 of 10"``).
        """

    @abstractmethod
    def close(self) -> None: ...

    def _check_buffer(self, buf: torch.Tensor, what: str) -> None:
        """Every backend moves *bytes*: a typed buffer would be broadcast as ``numel`` bytes by
        NCCL (its count is in elements of the datatype named, uint8 here) but as ``numel``
        elements by gloo, so the two backends would disagree silently. Refuse it instead.

        Raises:
            TransportError: ``buf`` is not a contiguous 1-D ``uint8`` tensor.
        """
        if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
            raise TransportError(
                f"{self.name}: broadcast of {what} needs a contiguous 1-D uint8 buffer, got {buf.dtype} of shape {tuple(buf.shape)}; "
                "pass t.view(torch.uint8) of a contiguous tensor"
            )

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_OUTCOME, _GO = "outcome", "go"  # store key set once per group: "go", or why its set-up failed


class GroupSetupFailed(TransportError):
    """A group's set-up was called off: a rank did not arrive in time, or one marked it failed."""


def _group_store(store: torch.distributed.Store, group: str) -> torch.distributed.Store:
    return torch.distributed.PrefixStore(f"refit/{group}", store)


def _decide(keys: torch.distributed.Store, outcome: str) -> str:
    """Set the group's outcome unless one is set (atomic: every rank sees the same); return it."""
    return keys.compare_set(_OUTCOME, "", outcome).decode(errors="replace")


def mark_failed(store: torch.distributed.Store, group: str, message: str) -> None:
    """Tell the ranks of ``group`` waiting at set-up that this rank will not join (best effort:
    where the store cannot be reached, they wait out their timeout). The first mark wins; once
    every rank arrived, a mark changes nothing."""
    with contextlib.suppress(Exception):
        _decide(_group_store(store, group), message[:1000])


def connect(rdv: Rendezvous, store: torch.distributed.Store, rank: int, device: torch.device, *, host: str | None = None) -> Communicator:
    """Join the group described by ``rdv`` as ``rank`` (blocks until every rank joined).

    Args:
        rdv: the rendezvous record (the sender passes its own, rank ignored).
        store: the sender's store (or a client of it).
        rank: 0 for the sender.
        device: where this rank's buffers live (NCCL: the CUDA device to use).
        host: address this rank's gloo sockets listen on (default: ``rdv.host`` when it is a
            loopback address, else the host's default interface).

    Raises:
        GroupSetupFailed: a rank did not arrive within ``rdv.timeout``, or one marked the group
            failed (:func:`mark_failed`).
        TransportError: set-up failed here.
    """
    prefixed = _group_store(store, rdv.group)
    if rdv.backend is Backend.GLOO:
        return GlooCommunicator(rdv, prefixed, rank, host=host)
    return NcclCommunicator(rdv, prefixed, rank, device)


# ---------------------------------------------------------------- gloo


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
        opts._timeout = _td(rdv.timeout)
        opts._devices = [ProcessGroupGloo.create_device(hostname=host) if host else ProcessGroupGloo.create_default_device()]
        _barrier(store, "init", rdv.world, rank, rdv.timeout, self.name)  # gloo's own wait cannot stop early
        try:
            self.pg: Any = ProcessGroupGloo(store, rank, rdv.world, opts)
        except Exception as exc:
            raise TransportError(f"{self.name}: set-up failed (a rank did not join within {rdv.timeout} s?): {exc}") from None
        self._opts = torch.distributed.BroadcastOptions()
        self._opts.rootRank = 0

    def broadcast(self, buf: torch.Tensor, what: str) -> Handle:
        if self.pg is None:
            raise TransportError(f"{self.name} is closed (phase {what})")
        self._check_buffer(buf, what)
        try:
            return _GlooHandle(self.pg.broadcast([buf], self._opts), self, what)
        except Exception as exc:
            raise TransportError(f"{self.name}: could not start broadcast of {what}: {exc}") from None

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


# ---------------------------------------------------------------- NCCL (CuPy)


def nccl_check(what: str, fn: Any, *args: Any) -> Any:
    """Run one CuPy NCCL call; every NCCL status of this transport goes through here.

    Raises:
        TransportError: naming ``what`` and NCCL's error string.
    """
    nccl = cupy_nccl()
    try:
        return fn(*args)
    except Exception as exc:
        if nccl is not None and isinstance(exc, nccl.NcclError):
            raise TransportError(f"NCCL {what} failed: {exc}. Set NCCL_DEBUG=INFO for details.") from None
        raise TransportError(f"NCCL {what} failed: {type(exc).__name__}: {exc}") from None


class _NcclHandle(Handle):
    def __init__(self, done: torch.cuda.Event, comm: NcclCommunicator, what: str) -> None:
        self.done, self.comm, self.what = done, comm, what

    def wait(self, timeout: float | None = None) -> None:
        # synchronize() releases the GIL; if the peer never arrives the watchdog aborts the
        # communicator at the deadline (brought forward to ``timeout`` here), NCCL's kernels
        # return and this wakes up.
        if timeout is not None:
            self.comm.deadline(self.done, timeout)
        self.done.synchronize()
        self.comm.raise_if_failed(self.what)


def _new_comm(nccl: Any, world: int, unique_id: bytes, rank: int) -> Any:
    try:  # CuPy 14 takes the unique id as bytes
        return nccl.NcclCommunicator(world, unique_id, rank)
    except TypeError:  # older CuPy: a tuple of signed chars
        return nccl.NcclCommunicator(world, tuple(b - 256 if b > 127 else b for b in unique_id), rank)


class NcclCommunicator(Communicator):
    """A CuPy ``NcclCommunicator`` with its own stream and a timeout watchdog."""

    backend = Backend.NCCL

    def __init__(self, rdv: Rendezvous, store: torch.distributed.Store, rank: int, device: torch.device) -> None:
        nccl = cupy_nccl()
        if nccl is None:
            raise TransportError("backend 'nccl' needs CuPy with NCCL on every rank: pip install cupy-cuda12x (or cupy-cuda13x)")
        if device.type != "cuda":
            raise TransportError(f"backend 'nccl' needs a CUDA device, got {device}")
        self.nccl = nccl
        self.rank, self.world, self.timeout = rank, rdv.world, rdv.timeout
        self.name = f"NCCL group {rdv.group} (rank {rank} of {rdv.world})"
        self.device = torch.device("cuda", cuda_index(device))
        _barrier(store, "init", rdv.world, rank, rdv.timeout, self.name)
        import cupy

        with cupy.cuda.Device(self.device.index):
            self.comm: Any = nccl_check(f"communicator init ({self.name})", _new_comm, nccl, rdv.world, rdv.unique_id, rank)
        self.stream = torch.cuda.Stream(self.device)
        self._lock = threading.Lock()
        self._armed: list[tuple[torch.cuda.Event, float, str, float]] = []  # (done, deadline, what, seconds allowed)
        self.failure: str | None = None
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name=f"refit-nccl-watchdog-{rdv.group}", daemon=True)
        self._watchdog.start()

    def broadcast(self, buf: torch.Tensor, what: str) -> Handle:
        self.raise_if_failed(what)
        self._check_buffer(buf, what)
        if buf.device != self.device:
            raise TransportError(f"{self.name}: buffer of {what} is on {buf.device}, the communicator on {self.device}")
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))  # packing / the last apply is done
        self.stream.wait_event(ready)
        ptr, n = buf.data_ptr(), buf.numel()
        for start in range(0, n, _NCCL_MAX_COUNT):
            count = min(_NCCL_MAX_COUNT, n - start)
            nccl_check(
                f"broadcast of {what} ({self.name})",
                self.comm.broadcast,
                ptr + start,
                ptr + start,
                count,
                self.nccl.NCCL_UINT8,
                0,
                self.stream.cuda_stream,
            )
        done = torch.cuda.Event()
        done.record(self.stream)
        # The caller's stream is not made to wait for ``done``: that would order every later
        # pack or apply after this broadcast, and the sender could no longer pack bucket k+1
        # while bucket k is on the wire. The buffer is the caller's again once wait() returned.
        with self._lock:
            self._armed.append((done, time.monotonic() + self.timeout, what, self.timeout))
        return _NcclHandle(done, self, what)

    def deadline(self, done: torch.cuda.Event, seconds: float) -> None:
        """Bring the watchdog's deadline for the broadcast that records ``done`` forward to
        ``seconds`` from now; a later one changes nothing."""
        at = time.monotonic() + seconds
        with self._lock:
            self._armed = [(e, at, w, seconds) if e is done and at < d else (e, d, w, t) for e, d, w, t in self._armed]

    def raise_if_failed(self, what: str) -> None:
        if self.failure is not None:
            raise TransportError(f"{self.name}: {self.failure} (waiting for {what}); the communicator was aborted")

    def _watch(self) -> None:
        torch.cuda.set_device(self.device)
        while not self._stop.wait(0.005):
            with self._lock:
                self._armed = [a for a in self._armed if not a[0].query()]
                late = next((a for a in self._armed if time.monotonic() > a[1]), None)
            problem = f"broadcast of {late[2]} did not complete within {late[3]} s" if late else None
            if problem is None and self.comm is not None:
                try:
                    nccl_check("asynchronous error check", self.comm.check_async_error)
                except TransportError as exc:
                    problem = str(exc)
            if problem is not None:
                self.failure = problem
                self._abort()
                return

    def _abort(self) -> None:
        comm, self.comm = self.comm, None
        if comm is not None:
            # abort stops this rank's kernels first (so waiters wake up), then waits for the
            # other ranks of the node like destroy does: not on the watchdog's thread
            _release(comm, None, self.name)

    def close(self) -> None:
        """Release the communicator without waiting for the other ranks (see :func:`_release`)."""
        self._stop.set()
        if self._watchdog.is_alive() and threading.current_thread() is not self._watchdog:
            self._watchdog.join(timeout=5)
        comm, self.comm = self.comm, None
        if comm is not None:
            _release(comm, self.stream if self.failure is None else None, self.name)


def _release(comm: Any, stream: torch.cuda.Stream | None, name: str) -> None:
    """Destroy ``comm`` (after ``stream``'s work; abort it when ``stream`` is None) in a daemon
    thread.

    NCCL's destroy and abort synchronize the ranks of a node before freeing what they share,
    so they return only once every rank of the group released it. A rank that keeps the group
    (a receiver between pushes, until the next push offers a new group) would otherwise hang
    whoever closes first; here the teardown simply completes when the last rank lets go. The
    thread holds the only reference, so the communicator is never destroyed by the garbage
    collector on the caller's thread (CuPy destroys on deallocation).
    """

    def run() -> None:
        try:
            if stream is not None:
                stream.synchronize()  # nothing of ours in flight
                comm.destroy()
                return
        except Exception:
            pass
        with contextlib.suppress(Exception):
            comm.abort()

    threading.Thread(target=run, name=f"refit-nccl-release ({name})", daemon=True).start()


def _barrier(store: torch.distributed.Store, key: str, world: int, rank: int, timeout: float, name: str) -> None:
    """Every rank arrives, or :class:`GroupSetupFailed` on every rank: once a rank marked the
    group failed, or after ``timeout``. The outcome is decided once, in the store, so a rank
    that arrives after the others gave up fails too instead of waiting alone."""
    store.set(f"{key}/{rank}", "1")
    store.add(key, 1)
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        if store.add(key, 0) >= world:
            outcome = _decide(store, _GO)
        elif store.check([_OUTCOME]):
            outcome = store.get(_OUTCOME).decode(errors="replace")
        elif time.monotonic() > deadline:
            missing = [r for r in range(world) if not store.check([f"{key}/{r}"])]
            outcome = _decide(store, f"rank(s) {missing} of {world} did not arrive within {timeout} s")
        else:
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
            continue
        if outcome == _GO:
            return
        raise GroupSetupFailed(f"{name}: {outcome} (phase set-up)")
