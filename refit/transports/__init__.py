"""Transports by name: the typed seam between the push (``refit.send``) and the bytes.

Each transport is a :class:`~refit.transports.base.Sender` class and, where the engine side is
a separate process, a :class:`~refit.transports.base.ReceiverTransport` class. They are found
here by name and their modules imported on first use, so ``import refit`` needs only torch; a
wrong name, a missing half or a missing optional package is a :class:`~refit.errors.RefitError`
that says what is available.

Adding a transport: write ``refit/transports/<name>.py`` with its sender (and receiver) class
and add one :class:`Spec` line below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from refit.errors import RefitError

if TYPE_CHECKING:
    from refit.transports.base import ReceiverTransport, Sender


@dataclass(frozen=True)
class Spec:
    """Where a transport lives: its module, class names and the pip extra it needs."""

    module: str
    sender: str
    receiver: str | None
    extra: str = ""
    receiver_module: str = ""  # where the receiver half lives, if not in ``module``


REGISTRY: dict[str, Spec] = {
    "local": Spec("refit.transports.local", "LocalSender", None),
    "zmq": Spec("refit.transports.zmq", "ZmqSender", "ZmqReceiver", "zmq"),
    "cuda_ipc": Spec("refit.transports.cuda_ipc", "CudaIpcSender", "CudaIpcReceiver", "zmq"),
    "nccl": Spec("refit.transports.nccl", "NcclSender", "NcclReceiver", "nccl", "refit.transports.nccl_receiver"),
}


@dataclass(frozen=True)
class Transport:
    """A transport's two halves, imported."""

    name: str
    sender: type[Sender]
    receiver: type[ReceiverTransport] | None

    def receiver_class(self) -> type[ReceiverTransport]:
        """The receiver half; raises :class:`RefitError` for a transport without one."""
        if self.receiver is None:
            others = ", ".join(n for n, s in REGISTRY.items() if s.receiver is not None)
            why = "it copies in the sender's process, into target="
            raise RefitError(f"transport {self.name!r} has no receiver half ({why}); receivers use: {others}")
        return self.receiver


def load_transport(name: object) -> Transport:
    """The transport named ``name``, its module imported now.

    Raises:
        RefitError: an unknown name (listing the available ones), or a missing optional
            package (naming the pip extra that installs it).
    """
    spec = REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        raise RefitError(f"unknown transport {name!r:.80}; available: {', '.join(REGISTRY)}")
    try:
        module = importlib.import_module(spec.module)
        rx_module = importlib.import_module(spec.receiver_module) if spec.receiver_module else module
    except ImportError as exc:
        hint = f" (pip install 'refit-stream[{spec.extra}]')" if spec.extra else ""
        raise RefitError(f"transport {name!r} needs a package that is not installed: {exc}{hint}") from exc
    receiver = getattr(rx_module, spec.receiver) if spec.receiver else None
    return Transport(name, getattr(module, spec.sender), receiver)  # type: ignore[arg-type]


def transport_names() -> list[str]:
    """Every registered transport name."""
    return list(REGISTRY)
