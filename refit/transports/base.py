"""The transport contract: paired sender and receiver halves, one lifecycle.

A push is ``handshake -> buckets -> finish``. The loop that is the same for every transport
(wait until a staging buffer may be reused, pack the next bucket, hand it over) is
:func:`refit.send.stream`; a transport only says how a bucket's bytes and the control messages
reach the receivers. Receivers run a :class:`~refit.load.Loader`, which decides what is
loaded; the transport only feeds it. Transports are found by name in :mod:`refit.transports`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

import torch

from refit.integrity import Checksum
from refit.load import Loader
from refit.meta import Manifest
from refit.report import RefitReport
from refit.wire import Fingerprints

Progress = Callable[[int, int], None]


class Sender(ABC):
    """Trainer half of a transport. One push at a time; reusable across pushes."""

    #: device of the staging buffers (pack copies land here)
    device: torch.device = torch.device("cpu")
    #: seconds of the transport's own stages in the last push, added to its report. Never
    #: written here: a transport that measures some assigns its own dict (reset by handshake).
    stages: dict[str, float] = {}  # noqa: RUF012
    #: True for transports that carry per-bucket checksums and the ``record`` flag to their
    #: receivers (``send`` takes ``checksum=``); a Refitter refuses ``checksum=`` otherwise.
    supports_checksum: bool = False
    #: the checksum algorithm of every push (None: off) and whether receivers record what they
    #: receive; set by the Refitter before the first push, announced in each handshake.
    checksum: Checksum | None = None
    record: bool = False
    #: True for transports that can send host memory from where it lies (``zmq``): the send loop
    #: then leaves large contiguous CPU tensors out of the staging buffer (saving the pack copy)
    #: and hands each bucket to :meth:`send_pieces` instead of :meth:`send`.
    sends_in_place: bool = False

    def configure(self, bucket_bytes: int, num_buffers: int) -> None:
        """The push options, told once before the first handshake (transports that share their
        staging buffers at handshake allocate them to this size)."""

    def stage(self, manifest: Manifest) -> None:
        """A push of ``manifest`` begins: make ``buffers`` ready to be packed (before the
        handshake)."""

    @classmethod
    def for_receivers(cls, infos: Sequence[Mapping[str, Any]], *, timeout: float = 120.0, **options: Any) -> Sender:
        """A sender to receivers described by their ``info()`` dicts (what an engine handle's
        ``open`` returns); ``options`` as for the constructor.

        Raises:
            TransportError: an info without an ``address``.
        """
        return cls(list(infos), timeout=timeout, **options)  # type: ignore[call-arg]

    def committed_versions(self) -> list[int] | None:
        """Each receiver's committed version, asked between pushes (a Refitter that numbers
        its pushes asks once, then continues after the highest); None if this transport cannot
        tell (numbering then starts at 1).

        Raises:
            TransportError: a receiver did not answer in time or is busy with another push.
        """
        return None

    @abstractmethod
    def handshake(self, manifest: Manifest, version: int) -> None:
        """Offer the manifest to every receiver; return when all accepted.

        Raises:
            ResolveError: a receiver refused; lists every receiver's problems. Nothing was sent.
            TransportError: a receiver did not answer in time.
        """

    @abstractmethod
    def buffers(self, bucket_bytes: int, num_buffers: int) -> list[torch.Tensor]:
        """The persistent 1-D uint8 staging buffers (allocated once, reused across pushes)."""

    @abstractmethod
    def wait_reusable(self, slot: int) -> None:
        """Block until buffer ``slot`` may be overwritten (its last bucket was consumed)."""

    @abstractmethod
    def send(self, index: int, slot: int, nbytes: int) -> None:
        """Bucket ``index`` is packed in buffer ``slot`` (first ``nbytes`` bytes); send it.

        A sender with ``supports_checksum`` also takes ``checksum=`` (the bucket's checksum,
        given when :attr:`checksum` is set) and delivers it with the bucket.
        """

    def send_pieces(self, index: int, slot: int, pieces: Sequence[memoryview], checksum: bytes | None = None) -> None:
        """Bucket ``index`` is ``pieces`` in order: slices of buffer ``slot`` and the bytes of
        source tensors in place; send them without copying (only called when
        :attr:`sends_in_place`). The source tensors stay unchanged until the push ends."""
        raise NotImplementedError(f"{type(self).__name__} does not send in place")

    def fingerprints(self) -> list[Fingerprints] | None:
        """Each receiver's per-tensor sha256 (``refit verify``), asked between pushes; None if
        this transport cannot ask.

        Raises:
            TransportError: a receiver did not answer in time or is busy with a push.
        """
        return None

    @abstractmethod
    def finish(self) -> list[RefitReport]:
        """Every bucket was sent: wait for each receiver to verify and commit; their reports."""

    @abstractmethod
    def abort(self, reason: str) -> None:
        """Tell the receivers the push in progress is abandoned (best effort, never raises)."""

    def close(self) -> None:
        """Release sockets, buffers and handles."""

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReceiverTransport(ABC):
    """Engine half of a transport: runs whole pushes into a :class:`Loader`.

    Constructed as ``Receiver(name=..., **options)``; each transport takes its own options.
    """

    def __init__(self, *, name: str = "receiver", **options: Any) -> None:
        self.name = name

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """What a sender needs to reach this receiver (plain values: addresses, ids)."""

    @abstractmethod
    def receive(self, loader: Loader, timeout: float | None, *, push_timeout: float | None = None) -> RefitReport | None:
        """Serve one push: handshake, buckets, finish.

        Waits up to ``timeout`` seconds for a push to begin (``None``: forever) and returns
        ``None`` if none did; once a push began, every wait is bounded by ``push_timeout``
        (default: ``timeout``).

        Raises:
            ResolveError: the push was refused (the target is untouched).
            TransportError: the sender went silent or the stream broke (the loader is torn if a
                bucket had been applied).
        """

    def close(self) -> None:
        """Release sockets, buffers and handles."""


class EngineHandle(Protocol):
    """What ``Refitter(engine=...)`` drives: the receivers of one or more engines.

    ``open`` makes every worker join the transport and returns each worker's ``info()``; each
    push calls ``begin_receive`` before the handshake, and the future yields the workers'
    reports once the push completes. The vLLM adapter provides one.
    """

    def open(self, transport: str, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Make every worker start a ``transport`` receiver with ``options``; each one's ``info()``."""
        ...

    def begin_receive(self, timeout: float) -> Future[list[RefitReport]]:
        """Make every worker serve one push (waiting up to ``timeout`` s for it); the future yields their reports."""
        ...

    def close(self) -> None:
        """Stop the workers' receivers and release what ``open`` made."""
        ...
