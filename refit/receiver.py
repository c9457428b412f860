"""``RefitReceiver``: the engine-side entry point for plain torch targets.

It binds a :class:`~refit.load.Loader` (what may be loaded, strictly) to the receiving half of
a transport (how bytes arrive). The vLLM adapter builds the same pair with its own resolver.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch

from refit.errors import RefitError, TransportError
from refit.load import Loader
from refit.options import check_options, check_timeout
from refit.report import RefitReport
from refit.resolve import Resolver, TensorsResolver
from refit.transports import load_transport
from refit.transports.base import ReceiverTransport


class RefitReceiver:
    """Receives pushes into ``target``.

    Args:
        target: a ``torch.nn.Module``, a ``dict[str, Tensor]``, or a :class:`Resolver`.
        transport: ``"zmq"``, ``"cuda_ipc"`` or ``"nccl"``.
        require_complete: refuse pushes that do not cover every target tensor.
        name: how this receiver names itself in reports and errors.
        push_timeout: seconds any wait inside a push may take before the push is abandoned
            (the target is then torn if a bucket was applied); :meth:`serve` uses it, while
            ``receive(timeout)`` bounds both the start and the waits by ``timeout``.
        **options: passed to the transport's receiver (e.g. ``address=`` for zmq).

    Example:
        >>> rx = RefitReceiver(model, "zmq", address="tcp://127.0.0.1:0")  # doctest: +SKIP
        >>> rx.info()  # give this to the trainer's Refitter   # doctest: +SKIP
        >>> report = rx.receive(timeout=60)  # doctest: +SKIP
    """

    def __init__(
        self,
        target: torch.nn.Module | Mapping[str, torch.Tensor] | Resolver,
        transport: str = "zmq",
        *,
        require_complete: bool = False,
        name: str = "receiver",
        push_timeout: float = 120.0,
        **options: Any,
    ) -> None:
        self.push_timeout = check_timeout(push_timeout, "push_timeout")
        resolver = target if hasattr(target, "resolve") else TensorsResolver(target)
        self.loader = Loader(resolver, require_complete=require_complete, name=name)  # type: ignore[arg-type]
        receiver = load_transport(transport).receiver_class()
        check_options(receiver, {"name": name, **options}, f"the {transport!r} receiver")
        self.transport: ReceiverTransport = receiver(name=name, **options)
        self._stop = threading.Event()
        self._closed = False
        self.last_error: RefitError | None = None

    @property
    def version(self) -> int:
        """Last committed version (0 before the first push)."""
        return self.loader.version

    def reset_version(self, version: int = 0) -> None:
        """Accept, from now on, any push whose version is greater than ``version`` (default 0:
        any). A receiver otherwise refuses a version not greater than its committed one, so an
        old or second trainer cannot silently overwrite newer weights; call this between pushes
        to roll back to another numbering on purpose.

        Raises:
            RefitError: ``version`` is invalid, or a push is in progress.
        """
        self.loader.reset_version(version)

    @property
    def torn(self) -> bool:
        """True while the target holds a partially applied push."""
        return self.loader.torn

    def check_serving(self) -> None:
        """Raise :class:`~refit.TornStateError` if the target must not serve now."""
        self.loader.check_serving()

    def info(self) -> dict[str, Any]:
        """What a sender needs to reach this receiver (plain values, e.g. the bound address)."""
        return self.transport.info()

    def receive(self, timeout: float | None = 60.0) -> RefitReport:
        """Serve one push (see :meth:`ReceiverTransport.receive`).

        Raises:
            TransportError: no push began within ``timeout``, or the stream broke.
            ResolveError: the push was refused; the target is untouched.
        """
        timeout = check_timeout(timeout, "timeout", allow_none=True)
        self._check_open()
        report = self.transport.receive(self.loader, timeout, push_timeout=self.push_timeout if timeout is None else timeout)
        if report is None:
            raise TransportError(f"{self.loader.name}: no push began within {timeout} s")
        return report

    def serve(self, max_pushes: int | None = None, poll: float = 0.5) -> list[RefitReport]:
        """Serve pushes until :meth:`stop` is called or ``max_pushes`` were committed.

        A refused, broken or garbled push does not stop serving; the last such error is kept
        in :attr:`last_error`. :meth:`stop` ends the ``serve`` in progress; a later ``serve``
        serves again (after :meth:`close`, it raises).

        Raises:
            RefitError: the receiver is closed, or ``poll`` or ``max_pushes`` is invalid.
        """
        check_timeout(poll, "poll")
        if max_pushes is not None and (isinstance(max_pushes, bool) or not isinstance(max_pushes, int) or max_pushes < 0):
            raise RefitError(f"max_pushes must be None or an int >= 0, got {max_pushes!r}")
        self._check_open()
        self._stop.clear()
        reports: list[RefitReport] = []
        while not self._stop.is_set() and (max_pushes is None or len(reports) < max_pushes):
            try:
                report = self.transport.receive(self.loader, poll, push_timeout=self.push_timeout)
            except RefitError as exc:
                self.last_error = exc
                continue
            except Exception as exc:  # a bug must not stop an engine's receiver; keep it for the caller
                self.last_error = RefitError(f"{self.loader.name}: unexpected {type(exc).__name__}: {exc}")
                continue
            if report is not None:
                reports.append(report)
        return reports

    def stop(self) -> None:
        """Make the :meth:`serve` in progress return (callable from another thread): it returns after the push or wait
        in progress, within ``poll`` seconds when idle.
        """
        self._stop.set()

    def _check_open(self) -> None:
        if self._closed:
            raise RefitError(f"{self.loader.name} is closed; create a new RefitReceiver")

    def close(self) -> None:
        """Stop serving and release the transport (idempotent); the receiver cannot be used again."""
        self._stop.set()
        if not self._closed:
            self._closed = True
            self.transport.close()

    def __enter__(self) -> RefitReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
