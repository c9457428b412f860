"""vLLM adapter: a worker extension that receives pushes, and an engine handle that drives it.

Engine side: start vLLM with ``worker_extension_cls="refit.adapters.vllm.RefitWorkerExtension"``.
Every worker then answers ``collective_rpc("refit_open" | "refit_receive" | ...)``: it builds a
:class:`~refit.adapters.vllm_resolve.VllmResolver` over its own model shard (its TP slice, its
PP stage), a strict loader, and the receiving half of the chosen transport.

Trainer side, in the same process as an offline ``vllm.LLM``::

    engine = VllmEngine(llm)
    with Refitter("zmq", engine=engine) as refitter:
        refitter.push(model.state_dict(), scales)

Why this shape: ``collective_rpc`` is vLLM's supported way to run code in every worker, but it
moves control messages, not bulk data (tensor arguments arrive as lists), so the bytes go over
the transport and the RPC only carries addresses and reports. Every extension method catches
its exceptions and returns them as plain values: an exception raised inside a multi-worker RPC
was seen to put later replies out of step. The handle turns them back into refit errors
naming the worker. Rejected: loading through ``LLM.reload_weights``-style per-tensor RPCs (one
round trip per tensor, no strict resolution before loading).

For an ``AsyncLLM`` on its event loop, :class:`AsyncVllmEngine` does the same through the
engine's ``collective_rpc`` coroutine.

Nothing is paused: a push runs inside one RPC, so a worker does not step the model while it
loads, but requests in flight see new weights from their next step on. Pause around a push
with the engine's own API (see docs/vllm.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from refit.errors import RefitError, ResolveError, TransportError, problem_list
from refit.meta import Manifest
from refit.pack import host_bytes
from refit.report import RefitReport
from refit.transports.base import ReceiverTransport, Sender, load_transport

EXTENSION = "refit.adapters.vllm.RefitWorkerExtension"


def _error(exc: BaseException, worker: str) -> dict[str, Any]:
    kind = type(exc).__name__ if isinstance(exc, RefitError) else "TransportError"
    problems = [str(p) for p in getattr(exc, "problems", [])]
    return {"error": {"kind": kind, "message": f"{type(exc).__name__}: {exc}", "problems": problems, "worker": worker}}


_Reply = Callable[..., dict[str, Any]]


def _replies(method: _Reply) -> _Reply:
    """A worker RPC method whose exceptions come back as ``{"error": ...}`` (see module doc)."""

    @functools.wraps(method)
    def wrapper(self: RefitWorkerExtension, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return method(self, *args, **kwargs)
        except BaseException as exc:
            error = _error(exc, self._refit_name())
            self._refit_last_error = error["error"]["message"]
            return error

    return wrapper


class RefitWorkerExtension:
    """Mixed into vLLM's worker class by ``worker_extension_cls``.

    Every method returns plain values: ``{"error": {...}}`` on failure (never raises), so
    replies of multi-worker RPCs stay in step.
    """

    _refit_last_error = ""  # the message of the last refit call that failed on this worker

    # -- set up

    def _refit_name(self) -> str:
        return f"vllm-worker-{getattr(self, 'rank', 0)}"

    def _refit_loader(self) -> Any:
        loader = getattr(self, "_refit_loader_obj", None)
        if loader is None:
            from refit.adapters.vllm_resolve import VllmLoader, VllmResolver

            model = self.model_runner.get_model()  # type: ignore[attr-defined]
            resolver = VllmResolver(model, self.vllm_config)  # type: ignore[attr-defined]
            loader = VllmLoader(resolver, name=self._refit_name())
            self._refit_loader_obj = loader
        return loader

    @_replies
    def refit_open(self, transport: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Join ``transport`` as a receiver; returns ``{"info": receiver.info()}``."""
        self.refit_close()
        module = load_transport(transport)
        rx: ReceiverTransport = module.Receiver(name=self._refit_name(), **dict(options or {}))  # type: ignore[attr-defined]
        self._refit_rx = rx
        # zmq on CPU hands the loader a view of each received frame: a fresh message per
        # bucket, kept alive by its views, so vLLM may hold them without a copy (vllm_load).
        # Every other receiver reuses its staging buffers.
        self._refit_stay = transport == "zmq" and str(dict(options or {}).get("device", "cpu")) == "cpu"
        self._refit_loader()
        return {"info": rx.info()}

    @_replies
    def refit_receive(self, timeout: float | None) -> dict[str, Any]:
        """Serve one push; returns ``{"report": RefitReport.to_wire() or None}``."""
        rx = getattr(self, "_refit_rx", None)
        if rx is None:
            raise TransportError(f"{self._refit_name()}: no transport joined; call refit_open first")
        loader = self._refit_loader()
        loader.buckets_stay = getattr(self, "_refit_stay", False)
        report = rx.receive(loader, timeout)
        return {"report": None if report is None else report.to_wire()}

    @_replies
    def refit_prepare(self, manifest: dict[str, Any], version: int) -> dict[str, Any]:
        """First half of a push carried inside RPCs: resolve the whole manifest, load nothing.

        Args:
            manifest: ``refit.wire.manifest_to_wire`` form.
            version: the version to commit.
        """
        from refit.wire import manifest_from_wire

        loader = self._refit_loader()
        try:
            problems = loader.prepare(manifest_from_wire(manifest), version)
        except RefitError:
            raise
        except Exception as exc:  # a fault while resolving: nothing was loaded, so it is a refusal
            loader.abort(f"prepare failed: {exc}")
            raise ResolveError(f"{loader.name} refused the push; nothing was loaded: resolving it raised {type(exc).__name__}: {exc}") from exc
        if problems:
            raise ResolveError(f"{loader.name} refused the push; nothing was loaded:\n" + problem_list(problems), problems)
        return {}

    @_replies
    def refit_apply(self, buckets: list[bytes]) -> dict[str, Any]:
        """Second half: apply every bucket (bytes, in order) of the prepared push and commit."""
        loader = self._refit_loader()
        loader.buckets_stay = True  # one bytearray per bucket, never written again
        try:
            for i, data in enumerate(buckets):
                loader.apply(i, torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8))
            return {"report": loader.finish().to_wire()}
        except BaseException as exc:
            if loader.active:
                loader.abort(f"apply failed: {exc}")
            raise

    @_replies
    def refit_targets(self, entries: list[tuple[str, list[int], str]]) -> dict[str, Any]:
        """For each ``(name, shape, dtype name)``: what a push of it would meet on this worker
        (see :meth:`VllmResolver.describe`); nothing is loaded."""
        from refit.meta import dtype_from_name

        resolver = self._refit_loader().resolver
        return {"targets": {name: resolver.describe(name, tuple(shape), dtype_from_name(dtype)) for name, shape, dtype in entries}}

    @_replies
    def refit_abort(self, reason: str) -> dict[str, Any]:
        """Drop a prepared push (nothing of it was applied)."""
        self._refit_loader().abort(reason)
        return {}

    @_replies
    def refit_close(self) -> dict[str, Any]:
        rx = getattr(self, "_refit_rx", None)
        self._refit_rx = None  # type: ignore[assignment]
        if rx is not None:
            rx.close()
        return {}

    # -- inspection (tests, debugging): plain values only

    @_replies
    def refit_read(self, names: list[str]) -> dict[str, Any]:
        """Raw bytes, dtype and shape of model tensors / attributes by qualified name
        (``{"absent": why}`` for a name this worker does not hold)."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        out: dict[str, Any] = {}
        for name in names:
            mod_name, _, attr = name.rpartition(".")
            try:
                value = getattr(model.get_submodule(mod_name), attr)
            except AttributeError as exc:  # e.g. a layer another PP stage owns
                out[name] = {"absent": str(exc)}
                continue
            if isinstance(value, torch.Tensor):
                t = value.detach().cpu().contiguous()
                out[name] = {
                    "dtype": str(t.dtype).removeprefix("torch."),
                    "shape": list(t.shape),
                    "data": bytes(host_bytes(t)),
                }
            else:
                out[name] = {"value": value}
        return {"tensors": out}

    @_replies
    def refit_status(self) -> dict[str, Any]:
        """This worker's committed version, whether it holds a half-applied push, and the last
        error one of its refit calls raised (``""``: none)."""
        loader = self._refit_loader()
        return {"version": loader.version, "torn": loader.torn, "last_error": self._refit_last_error}

    @_replies
    def refit_digest(self) -> dict[str, Any]:
        """sha256 of every parameter and buffer (name, dtype, shape, bytes) of this worker."""
        from refit.demo import digest

        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        items = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
        return {"digest": digest(items), "tensors": len(items)}

    @_replies
    def refit_fix_pp(self) -> dict[str, Any]:
        """CPU workaround: with ``enforce_eager`` a non-first PP stage never allocates its
        intermediate tensors (see docs/vllm.md). Harmless on other ranks."""
        mr = self.model_runner  # type: ignore[attr-defined]
        if getattr(mr, "intermediate_tensors", None) is None and hasattr(mr.model, "make_empty_intermediate_tensors"):
            from vllm.distributed.parallel_state import get_pp_group

            if not get_pp_group().is_first_rank:
                mr.intermediate_tensors = mr.model.make_empty_intermediate_tensors(
                    batch_size=mr.max_num_tokens, dtype=mr.model_config.dtype, device=mr.device
                )
        return {}


def raise_errors(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Raise the refit error of the workers' failed replies, naming every failed worker.

    Raises:
        ResolveError: some worker refused (listing every worker's problems).
        TransportError: any other failure.
    """
    errors = [r["error"] for r in replies if isinstance(r, dict) and "error" in r]
    if not errors:
        return replies
    text = "\n".join(f"  [{e['worker']}] {e['message']}" for e in errors)
    if all(e["kind"] == "ResolveError" for e in errors):
        problems = [f"[{e['worker']}] {p}" for e in errors for p in e["problems"]]
        raise ResolveError(f"{len(errors)} vLLM worker(s) refused the push; nothing was loaded:\n{text}", problems)
    raise TransportError(f"{len(errors)} vLLM worker(s) failed:\n{text}")


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
        would meet there, loading nothing:

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

    def handshake(self, manifest: Manifest, version: int) -> None:
        from refit.wire import manifest_to_wire

        self._buckets = []
        try:  # through engine.rpc, which the async engine overrides
            self.engine.rpc("refit_prepare", manifest_to_wire(manifest), version)
        except RefitError:
            with contextlib.suppress(RefitError):
                self.engine.rpc("refit_abort", "another worker refused")
            raise

    def committed_versions(self) -> list[int] | None:
        return [w["version"] for w in self.engine.status()]

    def buffers(self, bucket_bytes: int, num_buffers: int) -> list[torch.Tensor]:
        if len(self._bufs) != num_buffers or self._bufs[0].numel() != bucket_bytes:
            self._bufs = [torch.zeros(bucket_bytes, dtype=torch.uint8) for _ in range(num_buffers)]
        return self._bufs

    def wait_reusable(self, slot: int) -> None:
        return None  # send() copies the bytes out at once

    def send(self, index: int, slot: int, nbytes: int) -> None:
        self._buckets.append(bytes(host_bytes(self._bufs[slot][:nbytes])))

    def finish(self) -> list[RefitReport]:
        from refit.wire import report_from_wire

        buckets, self._buckets = self._buckets, []
        return [report_from_wire(r["report"]) for r in self.engine.rpc("refit_apply", buckets)]

    def abort(self, reason: str) -> None:
        self._buckets = []
        with contextlib.suppress(RefitError):
            self.engine.rpc("refit_abort", reason)
