"""vLLM adapter, trainer side: the engine handle that drives the workers' extension
(:mod:`refit.adapters.vllm_worker`) in the same process as an offline ``vllm.LLM`` (or on an
``AsyncLLM``'s event loop).

    engine = VllmEngine(llm)
    with Refitter("zmq", engine=engine) as refitter:
        refitter.push(model.state_dict(), scales)

Why this shape: ``collective_rpc`` is vLLM's supported way to run code in every worker, but it
moves control messages, not bulk data (tensor arguments arrive as lists), so the bytes go over
the transport and the RPC only carries addresses and reports. Rejected: loading through
``LLM.reload_weights``-style per-tensor RPCs (one round trip per tensor, no strict resolution
before loading).

Nothing is paused: a push runs inside one RPC, so a worker does not step the model while it
loads, but requests in flight see new weights from their next step on. Pause around a push
with the engine's own API (see docs/vllm.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from typing_extensions import override

from refit.errors import PlanError, RefitError, ResolveError, TornStateError, TransportError, WireError
from refit.meta import Manifest
from refit.pack import host_bytes
from refit.report import RefitReport
from refit.transports.base import Sender


def raise_errors(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Raise the refit error of the workers' failed replies, naming every failed worker.

    Raises:
        ResolveError: every failed worker refused (listing every worker's problems).
        WireError, PlanError, TornStateError: every failed worker raised that kind (the kind
            survives the RPC).
        TransportError: any other failure, or workers that failed in different ways.
    """
    errors = [r["error"] for r in replies if isinstance(r, dict) and "error" in r]
    if not errors:
        return replies
    text = "\n".join(f"  [{e['worker']}] {e['message']}" for e in errors)
    kinds = {e["kind"] for e in errors}
    if kinds == {"ResolveError"}:
        problems = [f"[{e['worker']}] {p}" for e in errors for p in e["problems"]]
        raise ResolveError(f"{len(errors)} vLLM worker(s) refused the push; nothing was loaded:\n{text}", problems)
    kind = _KINDS.get(kinds.pop(), TransportError) if len(kinds) == 1 else TransportError
    raise kind(f"{len(errors)} vLLM worker(s) failed:\n{text}")


_KINDS: dict[str, type[RefitError]] = {k.__name__: k for k in (WireError, PlanError, TornStateError, TransportError)}


class VllmEngine:
    """:class:`~refit.transports.base.EngineHandle` for an in-process ``vllm.LLM``.

    Args:
        llm: a ``vllm.LLM`` started with ``worker_extension_cls=EXTENSION``.
        rpc_timeout: seconds an RPC other than ``refit_receive`` may take (None: no limit).

    Example:
        >>> llm = LLM(model=path, worker_extension_cls=EXTENSION)  # doctest: +SKIP
        >>> with Refitter("zmq", engine=VllmEngine(llm)) as r:  # doctest: +SKIP
        ...     r.push(state, scales)
    """

    def __init__(self, llm: Any, *, rpc_timeout: float | None = 600.0) -> None:
        self.llm = llm
        self.rpc_timeout = rpc_timeout
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refit-vllm")
        self._lock = threading.Lock()

    def rpc(self, method: str, *args: Any, timeout: float | None = None) -> list[dict[str, Any]]:
        """``collective_rpc`` one extension method; raise the workers' errors as refit errors."""
        with self._lock:
            replies = self._collective(method, args, timeout or self.rpc_timeout)
        return raise_errors(list(replies))

    def _collective(self, method: str, args: tuple[Any, ...], limit: float | None) -> Any:
        return self.llm.collective_rpc(method, timeout=limit, args=args)

    def open(self, transport: str, options: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Make every worker join ``transport``; returns each worker's ``info()``."""
        return [r["info"] for r in self.rpc("refit_open", transport, dict(options))]

    def begin_receive(self, timeout: float) -> Future[list[RefitReport]]:
        """Start ``refit_receive`` on every worker in a background thread."""
        return self._pool.submit(self._receive, timeout)

    def _receive(self, timeout: float) -> list[RefitReport]:
        from refit.wire import report_from_wire

        replies = self.rpc("refit_receive", timeout, timeout=timeout + 60)
        return [report_from_wire(r["report"]) for r in replies if r.get("report") is not None]

    def apply(
        self,
        state: Mapping[str, torch.Tensor],
        scales: Mapping[str, torch.Tensor] | None = None,
        *,
        version: int | None = None,
        bucket_bytes: int = 64 << 20,
    ) -> list[RefitReport]:
        """Push a small state inside RPCs (no transport; for tests and tiny models).

        ``version`` defaults to one above the highest version the workers committed.

        Returns:
            Each worker's report.

        Raises:
            ResolveError: some worker refused (nothing was loaded on any worker).
            TransportError: a worker failed while applying.
        """
        from refit.api import Refitter

        refitter = Refitter(RpcSender(self), bucket_bytes=bucket_bytes)
        return refitter.push(state, scales, version=version).receivers

    def targets(self, state: Mapping[str, Any]) -> list[dict[str, dict[str, Any]]]:
        """Ask before pushing: per worker, for each name of ``state`` (name -> tensor, or
        anything with ``shape`` and ``dtype`` such as :class:`refit.Lazy`), what a push of it
        would meet there, loading nothing.

        * ``kind``: ``"weight"``, ``"scale"``, ``"amax"``, ``"remote"`` (another pipeline
          stage loads it) or ``"unknown"``;
        * ``dtype``: the target's dtype name (``None`` for remote and unknown): cast once to it;
        * ``shape``: the shape to send (the expected one where the given shape is refused);
        * ``key``: what it fills in the vLLM model; ``problem``: why a push would be refused
          (``""``: it would be accepted).

        Example::

            want = engine.targets(state)[0]
            state = {k: v.to(getattr(torch, want[k]["dtype"])) for k, v in state.items() if want[k]["dtype"]}
        """
        from refit.meta import dtype_name

        entries = []
        for name, value in state.items():
            if not isinstance(name, str) or not hasattr(value, "shape") or not hasattr(value, "dtype"):
                raise RefitError(f"targets(): {name!r} must map to a tensor (or anything with shape and dtype), got {type(value).__name__}")
            entries.append((name, [int(d) for d in value.shape], dtype_name(value.dtype)))
        return [r["targets"] for r in self.rpc("refit_targets", entries)]

    def status(self) -> list[dict[str, Any]]:
        """Each worker's committed ``version``, ``torn`` flag (it holds a half-applied push: every
        layer whole, some old and some new, until the next complete push) and ``last_error``
        (the last refit error on that worker, ``""`` if none)."""
        return [{"version": int(r["version"]), "torn": bool(r["torn"]), "last_error": str(r.get("last_error", ""))} for r in self.rpc("refit_status")]

    def close(self) -> None:
        """Close the workers' receivers. The handle stays usable: a later ``Refitter(engine=...)``
        makes the workers join its transport again."""
        self.rpc("refit_close")


class AsyncVllmEngine(VllmEngine):
    """:class:`~refit.transports.base.EngineHandle` for an in-process ``AsyncLLM``.

    The RPCs run as coroutines on the engine's event loop, so construct the ``Refitter`` (it
    makes the workers join the transport), push and close from another thread
    (``await asyncio.to_thread(Refitter, "zmq", engine=handle)``,
    ``await asyncio.to_thread(refitter.push, state, scales)``): blocking on them in the
    loop's own thread would block the loop the RPCs need.

    Args:
        engine: a ``vllm.v1.engine.async_llm.AsyncLLM`` started with
            ``worker_extension_cls=EXTENSION``.
        loop: the event loop the engine runs on.
        rpc_timeout: seconds an RPC other than ``refit_receive`` may take.

    Raises:
        RefitError: (from ``rpc``) when called from the engine's own loop thread.
    """

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop, *, rpc_timeout: float | None = 600.0) -> None:
        super().__init__(engine, rpc_timeout=rpc_timeout)
        self.loop = loop

    def _collective(self, method: str, args: tuple[Any, ...], limit: float | None) -> Any:
        if _running_loop() is self.loop:
            raise RefitError(
                "AsyncVllmEngine: call Refitter(...), push and close from another thread, not from the engine's event loop "
                "(e.g. refitter = await asyncio.to_thread(Refitter, 'zmq', engine=handle); see docs/vllm.md)"
            )
        future = asyncio.run_coroutine_threadsafe(self.llm.collective_rpc(method, timeout=limit, args=args), self.loop)
        return future.result(None if limit is None else limit + 30)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class RpcSender(Sender):
    """A :class:`~refit.transports.base.Sender` whose buckets travel inside ``collective_rpc``.

    Two phases like every transport's handshake: all workers resolve the manifest first
    (``refit_prepare``), and one refusal stops all before any worker loads a byte; then every
    bucket goes in one ``refit_apply``. Every bucket is held in memory until then, so this is
    for small states only (tests, tiny models).
    """

    def __init__(self, engine: VllmEngine) -> None:
        self.engine = engine
        self._bufs: list[torch.Tensor] = []
        self._buckets: list[bytes] = []

    @override
    def handshake(self, manifest: Manifest, version: int) -> None:
        from refit.wire import manifest_to_wire

        self._buckets = []
        try:  # through engine.rpc, which the async engine overrides
            self.engine.rpc("refit_prepare", manifest_to_wire(manifest), version)
        except RefitError:
            with contextlib.suppress(RefitError):
                self.engine.rpc("refit_abort", "another worker refused")
            raise

    @override
    def committed_versions(self) -> list[int] | None:
        return [w["version"] for w in self.engine.status()]

    @override
    def buffers(self, bucket_bytes: int, num_buffers: int) -> list[torch.Tensor]:
        if len(self._bufs) != num_buffers or self._bufs[0].numel() != bucket_bytes:
            self._bufs = [torch.zeros(bucket_bytes, dtype=torch.uint8) for _ in range(num_buffers)]
        return self._bufs

    @override
    def wait_reusable(self, slot: int) -> None:
        return None  # send() copies the bytes out at once

    @override
    def send(self, index: int, slot: int, nbytes: int) -> None:
        self._buckets.append(bytes(host_bytes(self._bufs[slot][:nbytes])))

    @override
    def finish(self) -> list[RefitReport]:
        from refit.wire import report_from_wire

        buckets, self._buckets = self._buckets, []
        return [report_from_wire(r["report"]) for r in self.engine.rpc("refit_apply", buckets)]

    @override
    def abort(self, reason: str) -> None:
        self._buckets = []
        with contextlib.suppress(RefitError):
            self.engine.rpc("refit_abort", reason)
