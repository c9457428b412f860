"""vLLM's native weight-transfer API, trainer side: ``backend="refit"`` over a :class:`~refit.Refitter`.

:class:`RefitTrainerWeightTransferEngine` is what vLLM's ``WeightTransferTrainerFactory`` builds
for a :class:`RefitTrainerInitInfo`. It drives the inference side through any
``VLLMWeightSyncClient`` (vLLM's HTTP and Ray clients, or :class:`LLMClient` /
:class:`AsyncLLMClient` for an engine in this process) and pushes with a ``Refitter``: every
``send_weights`` is one refit push inside one update session::

    start_weight_update -> update_weights (the workers serve the push) -> finish_weight_update(weight_version=str(version))

``start_weight_update`` is called only once the push was planned and its first bucket packed,
so a push that fails before reaching the workers leaves no session open; a refused push ends
the session on the workers (vLLM closes it when ``update_weights`` raises) with nothing loaded
and ``weight_version`` unchanged; ``weight_version`` is the refit version the workers committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    VLLMWeightSyncClient,
    WeightSource,
    WeightTransferInitRequest,
    WeightTransferUpdateRequest,
)

from refit.adapters.vllm_transfer import NAME, RefitInitInfo
from refit.api import Refitter
from refit.collect import StateLike
from refit.errors import RefitError
from refit.options import check_options, check_timeout
from refit.plan import DEFAULT_ALIGNMENT, DEFAULT_BUCKET_BYTES
from refit.report import RefitReport
from refit.transports import load_transport


@dataclass(kw_only=True)
class RefitTrainerInitInfo(TrainerInitInfo):
    """The trainer's choice of transport and push options (``Refitter``'s, by the same names).

    Attributes:
        transport: ``"zmq"``, ``"cuda_ipc"`` or ``"nccl"`` (gloo without a GPU).
        workers: engine workers in all (tensor x pipeline x data parallel); ignored with
            ``addresses``.
        addresses: the control address of each worker, by global rank. Default: ``workers``
            fresh ``ipc://`` sockets in a private temporary directory (engine on this host);
            engines on other hosts need ``tcp://HOST:PORT`` addresses of their interfaces.
        options: the transport's sender options (``backend``, ``host``, ``device``, ``sync``, ...).
        receiver_options: the workers' receiver options (``device``, ``host``, ``events``).
        bucket_bytes, alignment, tail_bytes, num_buffers, timeout, first_version: as for
            :class:`~refit.Refitter`.
        rank: this trainer process's rank (vLLM's field); rank 0 sends.

    Raises:
        RefitError: (on construction) a bad field, named.
    """

    backend: ClassVar[str] = NAME

    transport: str = "zmq"
    workers: int = 1
    addresses: list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    receiver_options: dict[str, Any] = field(default_factory=dict)
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    alignment: int = DEFAULT_ALIGNMENT
    tail_bytes: int | None = None
    num_buffers: int = 2
    timeout: float = 120.0
    first_version: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise RefitError(f"RefitTrainerInitInfo.rank must be this trainer process's rank (an int >= 0), got {self.rank!r:.80}")
        halves = load_transport(self.transport)
        halves.receiver_class()  # names the transports the workers can receive with
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise RefitError(f"RefitTrainerInitInfo.workers must be the number of engine workers (an int >= 1), got {self.workers!r:.80}")
        for what in ("options", "receiver_options"):
            if not isinstance(getattr(self, what), Mapping):
                raise RefitError(f"RefitTrainerInitInfo.{what} must be a dict of options, got {type(getattr(self, what)).__name__}")
        taken = sorted(set(self.options) & {"peers", "timeout"})
        if taken:
            raise RefitError(f"RefitTrainerInitInfo.options may not set {', '.join(taken)}: use the fields addresses and timeout")
        check_options(halves.sender, self.options, f"RefitTrainerInitInfo.options (the {self.transport!r} sender)")
        check_options(halves.receiver_class(), self.receiver_options, f"RefitTrainerInitInfo.receiver_options (the {self.transport!r} receiver)")
        check_timeout(self.timeout, "RefitTrainerInitInfo.timeout")
        if self.addresses is not None:  # checked as the workers will check them
            RefitInitInfo(transport=self.transport, addresses=self.addresses, options=dict(self.receiver_options))


class _Sessions:
    """The :class:`~refit.transports.base.EngineHandle` a Refitter drives: ``open`` is
    ``init_weight_transfer_engine``; each push's ``begin_receive`` starts an update session and
    runs ``update_weights`` on a thread while the trainer streams."""

    def __init__(self, client: VLLMWeightSyncClient, addresses: list[str]) -> None:
        self.client, self.addresses = client, addresses
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refit-update")
        self.update: Future[list[RefitReport]] | None = None

    def open(self, transport: str, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        self.client.init_weight_transfer_engine({"transport": transport, "addresses": list(self.addresses), "options": dict(options)})
        return [{"address": a} for a in self.addresses]

    def begin_receive(self, timeout: float) -> Future[list[RefitReport]]:
        self.client.start_weight_update()
        self.update = self._pool.submit(self._update, timeout)
        return self.update

    def _update(self, timeout: float) -> list[RefitReport]:
        self.client.update_weights({"timeout": timeout})
        return []  # the workers' reports come back through the transport

    def close(self) -> None:
        shutdown = getattr(self.client, "shutdown_weight_transfer_engine", None)  # not in the protocol
        try:
            if shutdown is not None:
                shutdown()
        finally:
            self._pool.shutdown(wait=False)


class RefitTrainerWeightTransferEngine(TrainerWeightTransferEngine[RefitTrainerInitInfo]):
    """The trainer half of ``backend="refit"``; build it with
    ``WeightTransferTrainerFactory.trainer_init(RefitTrainerInitInfo(rank=...), client=..., source=...)``.

    Attributes:
        refitter: the :class:`~refit.Refitter` that pushes (sender rank only, else None).
    """

    init_info_cls = RefitTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource | None = None, is_sender: bool = True) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.refitter: Refitter | None = None
        self._sessions: _Sessions | None = None
        self._socket_dir = ""

    @classmethod
    def trainer_init(cls, init_info: RefitTrainerInitInfo, *, client: VLLMWeightSyncClient, source: WeightSource | None = None) -> Self:
        """On the sender, make every worker join the transport (``init_weight_transfer_engine``);
        other ranks only keep ``source`` to join its collectives in ``send_weights``.

        Raises:
            RefitError: a bad init info or option (named), or the workers could not join.
        """
        if not isinstance(init_info, RefitTrainerInitInfo):
            raise RefitError(f"trainer_init takes a RefitTrainerInitInfo, got {type(init_info).__name__}")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender)
        if engine.is_sender:
            addresses = init_info.addresses
            if addresses is None:  # mode 0700: only this user reaches the sockets; removed by shutdown
                engine._socket_dir = tempfile.mkdtemp(prefix="refit-vllm-")
                addresses = [f"ipc://{os.path.join(engine._socket_dir, f'worker-{i}')}" for i in range(init_info.workers)]
            engine._sessions = _Sessions(client, list(addresses))
            try:
                engine.refitter = Refitter(
                    init_info.transport,
                    engine=engine._sessions,
                    receiver_options=init_info.receiver_options,
                    bucket_bytes=init_info.bucket_bytes,
                    alignment=init_info.alignment,
                    tail_bytes=init_info.tail_bytes,
                    num_buffers=init_info.num_buffers,
                    timeout=init_info.timeout,
                    first_version=init_info.first_version,
                    **init_info.options,
                )
            except BaseException:
                with contextlib.suppress(Exception):  # release what the workers bound, if they did
                    engine._sessions.close()
                engine.shutdown()
                raise
        return engine

    # vLLM's base declares send_weights(self) -> None; like its sparse backend, this one takes
    # the round's payload (optional here), and it returns what it did
    def send_weights(  # type: ignore[override]
        self, state: StateLike | None = None, scales: Mapping[str, Any] | None = None, *, version: int | None = None
    ) -> RefitReport | None:
        """One update: ``state`` (default: everything ``source`` yields) and ``scales`` as one
        refit push, then ``finish_weight_update(weight_version=str(version))``.

        Returns:
            The push's :class:`~refit.report.RefitReport` on the sender; None on other ranks
            (they iterate ``source`` to take part in its gathers).

        Raises:
            PlanError: bad input; nothing reached the workers, no session was opened.
            ResolveError: a worker refused; nothing was loaded anywhere, ``weight_version`` unchanged.
            TransportError: the stream broke; workers that applied a bucket are torn and
                ``weight_version`` is unchanged until a complete push lands.
        """
        if state is None:
            if self.source is None:
                raise RefitError("send_weights needs state= when the engine was built without a WeightSource")
            with torch.no_grad():
                state = dict(iter(self.source))  # full tensors (a sharded source gathers here)
        if not self.is_sender:
            return None
        if self.refitter is None or self._sessions is None:
            raise RefitError("this engine was shut down; build a new one with trainer_init")
        sessions = self._sessions
        sessions.update = None
        try:
            report = self.refitter.push(state, scales, version=version)
        except BaseException:
            # Close the session, with no version, where update_weights returned: several workers
            # record a failure instead of raising (see vllm_transfer). A lone worker's raised, and
            # vLLM ended its session then.
            if sessions.update is not None and sessions.update.done() and sessions.update.exception() is None:
                with contextlib.suppress(Exception):
                    self.client.finish_weight_update()
            raise
        self.client.finish_weight_update(weight_version=str(report.version))
        return report

    def shutdown(self) -> None:
        """Close the sender and release the workers' receivers (``shutdown_weight_transfer_engine``
        where the client has it)."""
        refitter, self.refitter, self._sessions = self.refitter, None, None
        try:
            if refitter is not None:
                refitter.close()
        finally:
            if self._socket_dir:
                shutil.rmtree(self._socket_dir, ignore_errors=True)
                self._socket_dir = ""


class LLMClient:
    """``VLLMWeightSyncClient`` for a ``vllm.LLM`` in this process.

    Args:
        llm: an engine started with ``weight_transfer_config={"backend": "refit"}``.
    """

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        """Have every worker start its refit receiver (vLLM's ``init_weight_transfer_engine``)."""
        self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))

    def start_weight_update(self) -> None:
        """Begin an update session on the engine."""
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Have every worker receive one push (returns once they committed it or raised)."""
        self.llm.update_weights(WeightTransferUpdateRequest(update_info=update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        """End the update session; ``weight_version``, if given, becomes the engine's weight version."""
        self.llm.finish_weight_update(weight_version)

    def shutdown_weight_transfer_engine(self) -> None:
        """Release the trainer connection (every worker's receiver closes); the engine keeps serving."""
        self.llm.shutdown_weight_transfer_engine()


class AsyncLLMClient:
    """``VLLMWeightSyncClient`` for an ``AsyncLLM`` running on ``loop`` (in another thread).

    Call ``trainer_init`` and ``send_weights`` from a thread other than the loop's
    (``await asyncio.to_thread(engine.send_weights, state)``): each method blocks until the
    engine's coroutine has run on ``loop``.

    Args:
        engine: a ``vllm.v1.engine.async_llm.AsyncLLM`` started with ``weight_transfer_config={"backend": "refit"}``.
        loop: the event loop it runs on.
        timeout: seconds one call may take (``update_weights`` waits for a whole push).

    Raises:
        RefitError: a call made from ``loop``'s own thread (it would block the loop it waits for).
    """

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop, *, timeout: float = 900.0) -> None:
        self.engine, self.loop = engine, loop
        self.timeout = check_timeout(timeout, "AsyncLLMClient timeout")

    def _run(self, coro: Any) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            coro.close()
            raise RefitError("AsyncLLMClient: call from another thread than the engine's event loop (e.g. await asyncio.to_thread(...))")
        asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.timeout)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        """Have every worker start its refit receiver (vLLM's ``init_weight_transfer_engine``)."""
        self._run(self.engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info)))

    def start_weight_update(self) -> None:
        """Begin an update session on the engine."""
        self._run(self.engine.start_weight_update())

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Have every worker receive one push (returns once they committed it or raised)."""
        self._run(self.engine.update_weights(WeightTransferUpdateRequest(update_info=update_info)))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        """End the update session; ``weight_version``, if given, becomes the engine's weight version."""
        self._run(self.engine.finish_weight_update(weight_version))

    def shutdown_weight_transfer_engine(self) -> None:
        """Release the trainer connection (every worker's receiver closes); the engine keeps serving."""
        self._run(self.engine.shutdown_weight_transfer_engine())
