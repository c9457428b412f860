"""vLLM adapter, worker side: the extension every vLLM worker mixes in.

Start vLLM with ``worker_extension_cls="refit.adapters.vllm.RefitWorkerExtension"``. Every
worker then answers ``collective_rpc("refit_open" | "refit_receive" | ...)``: it builds a
:class:`~refit.adapters.vllm_resolve.VllmResolver` over its own model shard (its TP slice, its
PP stage), a strict loader, and the receiving half of the chosen transport. Every method
catches its exceptions and returns them as plain values (``{"error": {...}}``): an exception
raised inside a multi-worker RPC was seen to put later replies out of step. The trainer side
(:mod:`refit.adapters.vllm_engine`) turns them back into refit errors of the same kind.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from refit.errors import RefitError, ResolveError, TransportError, error_reply, problem_list
from refit.pack import host_bytes
from refit.transports import load_transport
from refit.transports.base import ReceiverTransport


def _error(exc: BaseException, worker: str) -> dict[str, Any]:
    reply: dict[str, Any] = error_reply(exc)
    reply["error"]["worker"] = worker
    return reply


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


def vllm_loader(model: Any, vllm_config: Any, name: str) -> Any:
    """The strict :class:`~refit.load.Loader` of one vLLM worker's model shard."""
    from refit.adapters.vllm_resolve import VllmResolver
    from refit.load import Loader

    return Loader(VllmResolver(model, vllm_config), name=name)


def worker_receiver_options(transport: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options a worker opens its receiver with: the caller's, and for ``zmq`` the I/O thread
    off the worker's pinned CPUs unless the caller chose (``io_cpus="auto"``: vLLM's CPU backend
    pins each worker's thread, and a thread it starts inherits the pin; see
    :mod:`refit.transports.io_threads`)."""
    out = dict(options or {})
    if transport == "zmq":
        out.setdefault("io_cpus", "auto")
    return out


def buckets_stay(transport: str, options: Mapping[str, Any] | None) -> bool:
    """Whether received buckets stay valid after they are applied, so vLLM may keep views of them
    without a copy (``vllm_load``): zmq on CPU hands the loader a view of each received frame, a
    fresh message per bucket kept alive by its views; every other receiver reuses its staging
    buffers."""
    return transport == "zmq" and str(dict(options or {}).get("device", "cpu")) == "cpu"


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
            loader = vllm_loader(self.model_runner.get_model(), self.vllm_config, self._refit_name())  # type: ignore[attr-defined]
            self._refit_loader_obj = loader
        return loader

    @_replies
    def refit_open(self, transport: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Join ``transport`` as a receiver; returns ``{"info": receiver.info()}``."""
        self.refit_close()
        rx: ReceiverTransport = load_transport(transport).receiver_class()(name=self._refit_name(), **worker_receiver_options(transport, options))
        self._refit_rx = rx
        self._refit_stay = buckets_stay(transport, options)
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
        """Close this worker's receiver, if one is open (idempotent)."""
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
        """This worker's committed version, whether it holds a half-applied push, the last error
        one of its refit calls raised (``""``: none), the CPUs its thread may run on (vLLM's CPU
        backend pins it) and those of its receiver's ZMQ I/O thread (None: the same)."""
        loader = self._refit_loader()
        server = getattr(getattr(self, "_refit_rx", None), "server", None)
        io = getattr(server, "io_cpus", None)
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        io_cpus = None if io is None else sorted(io)
        return {"version": loader.version, "torn": loader.torn, "last_error": self._refit_last_error, "cpus": cpus, "io_cpus": io_cpus}

    @_replies
    def refit_digest(self) -> dict[str, Any]:
        """sha256 of every parameter and buffer (name, dtype, shape, bytes) of this worker."""
        from refit.digest import digest

        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        items = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
        return {"digest": digest(items), "tensors": len(items)}

    @_replies
    def refit_fingerprint(self) -> dict[str, Any]:
        """Per-tensor sha256 (hex) for ``Refitter.verify``, by pushed name: of what this worker
        received, recorded while applying pushes sent with ``record_digests=True`` (its stored
        tensors are fused or repacked, so they are not what was pushed; see refit/verify.py)."""
        loader = self._refit_loader()
        source, digests = loader.fingerprint()
        return {"peer": loader.name, "version": loader.version, "source": source, "digests": {k: v.hex() for k, v in digests.items()}}

    @_replies
    def refit_fix_pp(self) -> dict[str, Any]:
        """CPU workaround: with ``enforce_eager`` a non-first PP stage never allocates its
        intermediate tensors (see docs/vllm.md). Harmless on other ranks."""
        mr = self.model_runner  # type: ignore[attr-defined]
        if getattr(mr, "intermediate_tensors", None) is None and hasattr(mr.model, "make_empty_intermediate_tensors"):
            from refit.adapters.vllm_private import get_pp_group

            if not get_pp_group().is_first_rank:
                mr.intermediate_tensors = mr.model.make_empty_intermediate_tensors(
                    batch_size=mr.max_num_tokens, dtype=mr.model_config.dtype, device=mr.device
                )
        return {}
