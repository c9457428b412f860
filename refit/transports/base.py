"""The transport contract: paired sender and receiver halves, one lifecycle.

A push is ``handshake -> buckets -> finish``. The trainer-side driver (:func:`stream`) owns the
loop that is the same for every transport: wait until a staging buffer may be reused, pack the
next bucket into it, hand it to the transport. The first bucket is packed into the sender's own
staging buffer *before* the handshake, so the device copies overlap the receivers' answer;
nothing reaches a receiver before it accepted the manifest. A transport only says how a
bucket's bytes and the control messages reach the receivers. Receivers run a :class:`~refit.load.Loader`, which
decides what is loaded; the transport only feeds it.

Transports are found by name and imported when first used, so ``import refit`` needs only torch.
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

import torch

from refit.collect import ScaleBlocks
from refit.errors import RefitError
from refit.load import Loader
from refit.meta import Manifest, TensorMeta
from refit.pack import Lazy, pack
from refit.report import RefitReport
from refit.scales import run_view

# name -> "module:Sender,Receiver"; imported lazily.
TRANSPORTS: dict[str, str] = {
    "local": "refit.transports.local",
    "zmq": "refit.transports.zmq",
    "cuda_ipc": "refit.transports.cuda_ipc",
    "nccl": "refit.transports.nccl",
}

Progress = Callable[[int, int], None]


class Sender(ABC):
    """Trainer half of a transport. One push at a time; reusable across pushes."""

    #: device of the staging buffers (pack copies land here)
    device: torch.device = torch.device("cpu")
    #: seconds of the transport's own stages in the last push, added to its report. Never
    #: written here: a transport that measures some assigns its own dict (reset by handshake).
    stages: dict[str, float] = {}  # noqa: RUF012

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
        """Bucket ``index`` is packed in buffer ``slot`` (first ``nbytes`` bytes); send it."""

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
    """Engine half of a transport: runs whole pushes into a :class:`Loader`."""

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

    def open(self, transport: str, options: Mapping[str, Any]) -> list[dict[str, Any]]: ...

    def begin_receive(self, timeout: float) -> Future[list[RefitReport]]: ...

    def close(self) -> None: ...


def load_transport(name: str) -> object:
    """Import the module of transport ``name``."""
    try:
        module = TRANSPORTS[name]
    except KeyError:
        raise RefitError(f"unknown transport {name!r}; choose one of {sorted(TRANSPORTS)}") from None
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = {"zmq": "zmq", "cuda_ipc": "zmq", "nccl": "nccl"}.get(name, "")
        hint = f" (pip install 'refit-stream[{extra}]')" if extra else ""
        raise RefitError(f"transport {name!r} needs a package that is not installed: {exc}{hint}") from exc


def stream(
    sender: Sender,
    manifest: Manifest,
    sources: Mapping[str, torch.Tensor | Lazy],
    *,
    num_buffers: int,
    handshake: Callable[[], object] | None = None,
    progress: Progress | None = None,
    blocks: ScaleBlocks | None = None,
) -> dict[str, float]:
    """Pack and send every bucket of ``manifest`` with at most ``num_buffers`` in flight.

    ``handshake`` (the sender's, bound to this push) is called once the first bucket is packed
    and before it is sent, so the first copies overlap it; a refusal raises from here with
    nothing sent. Returns seconds spent handshaking, packing and waiting for buffer reuse.
    Chunked :class:`Lazy` sources are materialized once (on the buffers' device) and dropped
    after their last chunk. Runs of 0-d tensors are packed with one strided copy (from
    ``blocks`` when it holds them stacked).
    """
    sender.stage(manifest)
    bufs = sender.buffers(manifest.bucket_bytes, num_buffers)
    pinned = bool(bufs) and bufs[0].is_pinned()  # host staging for a GPU source: non-blocking copies
    pack_s = wait_s = handshake_s = 0.0
    materialized: dict[str, torch.Tensor] = {}
    if handshake is not None and not manifest.num_buckets:
        t0 = time.perf_counter()
        handshake()
        handshake_s = time.perf_counter() - t0
    for index, metas in enumerate(manifest.by_bucket):
        slot = index % len(bufs)
        t0 = time.perf_counter()
        sender.wait_reusable(slot)
        t1 = time.perf_counter()
        singles: list[TensorMeta] = []
        srcs: list[torch.Tensor | Lazy] = []
        for i, j, is_run in manifest.segments[index]:
            run = metas[i:j]
            stacked = blocks.source(run) if is_run and blocks is not None else None
            if stacked is None and is_run:
                values = [sources[m.name] for m in run]
                if not any(isinstance(v, Lazy) for v in values) and len({v.device for v in values}) == 1:  # type: ignore[union-attr]
                    stacked = torch.stack(values)  # type: ignore[arg-type]
            if stacked is not None:
                run_view(bufs[slot], run).copy_(stacked, non_blocking=pinned)
                continue
            for m in run:
                src = sources[m.name]
                if isinstance(src, Lazy) and m.is_chunked:
                    if m.name not in materialized:
                        materialized[m.name] = src.materialize(bufs[slot].device)
                    src = materialized[m.name] if m.chunk < m.chunks - 1 else materialized.pop(m.name)
                singles.append(m)
                srcs.append(src)
        pack(bufs[slot], singles, srcs, non_blocking=pinned)
        t2 = time.perf_counter()
        if index == 0 and handshake is not None:
            handshake()
            handshake_s = time.perf_counter() - t2
        sender.send(index, slot, manifest.bucket_sizes[index])
        wait_s += t1 - t0
        pack_s += t2 - t1
        if progress is not None:
            progress(index + 1, manifest.num_buckets)
    return {"handshake": handshake_s, "pack": pack_s, "wait": wait_s}
