"""Private broadcast groups for the ``nccl`` transport: what both backends share.

The records (:class:`Rendezvous`), the sender's store, the set-up barrier and the
:class:`Communicator` / :class:`Handle` contract live here; the backends are
``gloo_group.py`` and ``nccl_group.py``, and ``join.connect`` picks one.

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
  run in a daemon thread (``nccl_group._release``): a rank that closes first never hangs on one that
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
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgpack
import torch

from refit.errors import TransportError, WireError
from refit.wire import check_bool, check_bytes, check_int, check_str

RENDEZVOUS_VERSION = 2


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
        try:
            return cls._fields(d)
        except WireError as exc:
            raise WireError(f"rendezvous {exc}") from None

    @classmethod
    def _fields(cls, d: dict[str, Any]) -> Rendezvous:
        """The fields of a decoded map, each checked in the wire module's one style."""
        if check_int(d.get("v"), "v") != RENDEZVOUS_VERSION:
            raise WireError(f"field 'v': version {d['v']} not supported (this refit speaks {RENDEZVOUS_VERSION})")
        try:
            backend = Backend(check_str(d.get("backend"), "backend", 16))
        except ValueError:
            raise WireError(f"field 'backend': unknown {d['backend']!r}") from None
        world = check_int(d.get("world"), "world", 2, 1 << 16)
        rank = check_int(d.get("rank"), "rank", 1, world - 1)
        port = check_int(d.get("port"), "port", 1, 65535)
        group, host = check_str(d.get("group"), "group", 64), check_str(d.get("host"), "host", 255)
        if not group or not host:
            raise WireError("field 'group' or 'host': empty")
        unique_id = check_bytes(d.get("unique_id"), "unique_id", 128)
        if backend is Backend.NCCL and len(unique_id) != 128:
            raise WireError(f"field 'unique_id': NCCL ids are 128 bytes, got {len(unique_id)}")
        timeout = d.get("timeout")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (math.isfinite(timeout) and timeout > 0):
            raise WireError(f"field 'timeout': {timeout!r:.40} must be a positive number of seconds")
        fresh = check_bool(d.get("fresh"), "fresh")
        prelude = check_int(d.get("prelude"), "prelude", 0, (1 << 62) - 1)
        return cls(
            backend=backend, group=group, rank=rank, world=world, host=host, port=port,
            unique_id=unique_id, timeout=float(timeout), fresh=fresh, prelude=prelude,
        )


def new_group_id() -> str:
    """A fresh random id for a broadcast group (names its store keys and appears in errors)."""
    return secrets.token_hex(8)


def timedelta_s(seconds: float) -> datetime.timedelta:
    """``seconds`` as the timedelta c10d stores and process groups take."""
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
                host, self.port, None, True, timeout=timedelta_s(timeout), wait_for_workers=False, master_listen_fd=sock.fileno()
            )
        except BaseException:
            sock.close()
            raise
        sock.detach()  # the store owns the listening fd now and closes it itself

    def close(self) -> None:
        """Drop this side's reference to the store (the store shuts down once no group uses it)."""
        self.store = None


def client_store(host: str, port: int, timeout: float) -> torch.distributed.Store:
    """A client connection to the sender's store."""
    try:
        return torch.distributed.TCPStore(host, port, None, False, timeout=timedelta_s(timeout))
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
    def close(self) -> None:
        """Release the group (idempotent); a broadcast in flight on it fails."""

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


def group_store(store: torch.distributed.Store, group: str) -> torch.distributed.Store:
    """The view of ``store`` that keeps ``group``'s keys apart from every other group's."""
    return torch.distributed.PrefixStore(f"refit/{group}", store)


def _decide(keys: torch.distributed.Store, outcome: str) -> str:
    """Set the group's outcome unless one is set (atomic: every rank sees the same); return it."""
    return keys.compare_set(_OUTCOME, "", outcome).decode(errors="replace")


def mark_failed(store: torch.distributed.Store, group: str, message: str) -> None:
    """Tell the ranks of ``group`` waiting at set-up that this rank will not join (best effort:
    where the store cannot be reached, they wait out their timeout). The first mark wins; once
    every rank arrived, a mark changes nothing."""
    with contextlib.suppress(Exception):
        _decide(group_store(store, group), message[:1000])


def barrier(store: torch.distributed.Store, key: str, world: int, rank: int, timeout: float, name: str) -> None:
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
