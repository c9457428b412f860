"""Ray adapter, actor side: the mix-ins a trainer actor and an engine actor inherit, so the
driver-side :class:`refit.adapters.ray.RayRefit` can make them join one transport and push.

    @ray.remote
    class Trainer(RefitTrainerActor):
        def refit_state(self):
            return self.model.state_dict(), self.scales

    @ray.remote
    class Engine(RefitReceiverActor):        # or RefitVllmActor (holds self.llm)
        def __init__(self):
            self.model = build_model()       # what refit_target() returns by default

Every ``refit_*`` method returns plain values and never raises: a failure comes back as
``{"error": {"kind", "message", "problems"}}`` (refit errors keep their kind across the actor
boundary; Ray's own pickled exceptions would lose a ``ResolveError``'s problems). Rejected:
running the push from the driver (the weights live in the trainer actor; shipping them
through Ray's object store would copy every byte twice).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from refit.adapters.ray_place import Place
from refit.errors import RefitError, TransportError, error_reply

_Reply = Callable[..., dict[str, Any]]


def here() -> Place:
    """The :class:`Place` of the calling process (inside a Ray actor or worker)."""
    import ray

    from refit.transports.cuda_runtime import gpu_uuid, host_id

    gpus: tuple[str, ...] = ()
    if torch.cuda.is_available():  # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs
        gpus = tuple(gpu_uuid(torch.device("cuda", i)) for i in range(torch.cuda.device_count()))
    return Place(node_id=ray.get_runtime_context().get_node_id(), node_ip=ray.util.get_node_ip_address(), host=host_id(), gpus=gpus)


def replies(method: _Reply) -> _Reply:
    """An actor method whose exceptions come back as ``{"error": ...}`` (see module doc)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return method(self, *args, **kwargs)
        except BaseException as exc:
            return error_reply(exc)

    return wrapper


class RefitTrainerActor:
    """Mix-in of the trainer's Ray actor: holds the :class:`~refit.Refitter` and pushes what
    :meth:`refit_state` returns."""

    _refit_sender: Any = None

    def refit_state(self) -> tuple[Mapping[str, Any], Mapping[str, torch.Tensor] | None]:
        """``(state, scales)`` to push (as for ``Refitter.push``). Override it; the default
        pushes ``self.model.state_dict()`` when the actor has a ``model`` module.

        Raises:
            RefitError: the actor neither overrides this nor holds a ``torch.nn.Module`` in ``model``.
        """
        model = getattr(self, "model", None)
        if isinstance(model, torch.nn.Module):
            return model.state_dict(), None
        raise RefitError(f"{type(self).__name__}: define refit_state() returning (state, scales), or keep a torch.nn.Module in self.model")

    @replies
    def refit_place(self) -> dict[str, Any]:
        """Where this actor runs: ``{"places": [Place.to_wire()]}``."""
        return {"places": [here().to_wire()]}

    @replies
    def refit_connect(self, transport: str, infos: list[dict[str, Any]], options: dict[str, Any]) -> dict[str, Any]:
        """Open a ``Refitter(transport, peers=infos, **options)`` (closing any earlier one)."""
        from refit.api import Refitter

        self.refit_disconnect()
        self._refit_sender = Refitter(transport, peers=infos, **options)
        return {}

    @replies
    def refit_push(self, version: int | None) -> dict[str, Any]:
        """Push :meth:`refit_state`; ``{"report": RefitReport.to_wire()}``."""
        if self._refit_sender is None:
            raise TransportError(f"{type(self).__name__}: not connected to any engine; RayRefit(...) connects it")
        state, scales = self.refit_state()
        return {"report": self._refit_sender.push(state, scales, version=version).to_wire()}

    @replies
    def refit_disconnect(self) -> dict[str, Any]:
        """Close the Refitter (its sockets and groups)."""
        sender, self._refit_sender = self._refit_sender, None
        if sender is not None:
            sender.close()
        return {}


class RefitReceiverActor:
    """Mix-in of an engine actor that holds a plain torch target: a strict
    :class:`~refit.load.Loader` over :meth:`refit_target` (built once, so the committed
    version and the torn flag outlive reconnections) fed by the receiving half of the
    transport :class:`~refit.adapters.ray.RayRefit` names."""

    _refit_rx: Any = None
    _refit_loader: Any = None
    _refit_last_error = ""  # the last failed push's error on this actor ("" if none)

    def refit_target(self) -> Any:
        """What pushes load into: a ``torch.nn.Module``, a dict of tensors or a ``Resolver``.
        Override it; the default is ``self.model``. Asked once, at the first join.

        Raises:
            RefitError: no override and no ``model`` attribute.
        """
        model = getattr(self, "model", None)
        if model is None:
            raise RefitError(f"{type(self).__name__}: define refit_target() returning the module or dict of tensors to load, or set self.model")
        return model

    @replies
    def refit_place(self) -> dict[str, Any]:
        """Where this actor's receiver runs: ``{"places": [Place.to_wire()]}``."""
        return {"places": [here().to_wire()]}

    @replies
    def refit_open(self, transport: str, options: dict[str, Any], name: str) -> dict[str, Any]:
        """Join ``transport`` as receiver ``name``; ``{"infos": [receiver.info()]}``."""
        from refit.load import Loader
        from refit.options import check_options
        from refit.resolve import TensorsResolver
        from refit.transports import load_transport

        self.refit_close()
        if self._refit_loader is None:
            target = self.refit_target()
            self._refit_loader = Loader(target if hasattr(target, "resolve") else TensorsResolver(target), name=name)
        receiver = load_transport(transport).receiver_class()
        check_options(receiver, {"name": name, **options}, f"the {transport!r} receiver")
        self._refit_rx = receiver(name=name, **options)
        return {"infos": [self._refit_rx.info()]}

    @replies
    def refit_receive(self, timeout: float) -> dict[str, Any]:
        """Serve one push (waiting up to ``timeout`` s for it to begin and for each step);
        ``{"reports": [RefitReport.to_wire()]}``."""
        if self._refit_rx is None:
            raise TransportError(f"{type(self).__name__}: no transport joined; RayRefit(...) joins it")
        try:
            report = self._refit_rx.receive(self._refit_loader, timeout, push_timeout=timeout)
            if report is None:
                raise TransportError(f"{self._refit_loader.name}: no push began within {timeout} s")
        except BaseException as exc:
            self._refit_last_error = f"{type(exc).__name__}: {exc}"
            raise
        return {"reports": [report.to_wire()]}

    @replies
    def refit_status(self) -> dict[str, Any]:
        """``{"status": [{"version", "torn", "last_error"}]}`` of this actor's loader."""
        loader = self._refit_loader
        if loader is None:
            return {"status": []}
        return {"status": [{"version": loader.version, "torn": loader.torn, "last_error": self._refit_last_error}]}

    def refit_check_serving(self) -> None:
        """Raise :class:`~refit.errors.TornStateError` while the target holds a half-applied
        push (call it before serving from the target)."""
        if self._refit_loader is not None:
            self._refit_loader.check_serving()

    @replies
    def refit_close(self) -> dict[str, Any]:
        """Close the receiver (its socket and group); the target keeps what it holds, the
        loader its version and torn flag."""
        rx, self._refit_rx = self._refit_rx, None
        if rx is not None:
            rx.close()
        return {}


class RefitVllmActor:
    """Mix-in of an engine actor that holds a ``vllm.LLM`` in ``self.llm``, started with
    ``worker_extension_cls=refit.adapters.vllm.EXTENSION`` (any executor: ``mp``, ``ray``,
    in-process). Every vLLM worker joins the transport; their reports come back per worker.

    The workers bind on this actor's node: with ``distributed_executor_backend="ray"``, keep
    the engine's workers on the actor's node (vLLM's placement group does for one-node TP).
    """

    _refit_engine: Any = None

    def _refit_handle(self) -> Any:
        if self._refit_engine is None:
            from refit.adapters.vllm_engine import VllmEngine

            llm = getattr(self, "llm", None)
            if llm is None:
                raise RefitError(f"{type(self).__name__}: set self.llm to a vllm.LLM started with worker_extension_cls=refit.adapters.vllm.EXTENSION")
            self._refit_engine = VllmEngine(llm)
        return self._refit_engine

    @replies
    def refit_place(self) -> dict[str, Any]:
        """``{"places": [Place.to_wire()]}``: this actor's place (its workers share its node)."""
        return {"places": [here().to_wire()]}

    @replies
    def refit_open(self, transport: str, options: dict[str, Any], name: str) -> dict[str, Any]:
        """Make every worker join ``transport``; ``{"infos": [each worker's info()]}``. The
        workers keep their own names (``vllm-worker-<rank>``); the driver's errors add the
        engine actor's ``name`` after each worker's address."""
        return {"infos": self._refit_handle().open(transport, dict(options))}

    @replies
    def refit_receive(self, timeout: float) -> dict[str, Any]:
        """Serve one push on every worker; ``{"reports": [each worker's report]}``."""
        reports = self._refit_handle().begin_receive(timeout).result(timeout + 90)
        return {"reports": [r.to_wire() for r in reports]}

    @replies
    def refit_status(self) -> dict[str, Any]:
        """``{"status": [each worker's {"version", "torn", "last_error"}]}``."""
        return {"status": self._refit_handle().status()}

    @replies
    def refit_close(self) -> dict[str, Any]:
        """Close every worker's receiver; the engine keeps serving what it holds."""
        if self._refit_engine is not None:
            self._refit_engine.close()
        return {}
