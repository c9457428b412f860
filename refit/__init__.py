"""refit: move a trainer's weights and their quantization scales into running inference engines.

``Refitter(transport=...).push(state, scales)`` on the trainer side; a receiver (a
:class:`~refit.receiver.RefitReceiver`, or the vLLM worker extension) on the engine side.
Transports (``local``, ``zmq``, ``cuda_ipc``, ``nccl``) are imported on first use: importing
refit needs only torch and msgpack.
"""

from refit.api import Refitter
from refit.errors import IntegrityError, PlanError, RefitError, ResolveError, TornStateError, TransportError, WireError
from refit.meta import Manifest, Role, TensorMeta
from refit.pack import Lazy
from refit.report import RefitReport

__version__ = "0.1.0"

__all__ = [
    "IntegrityError",
    "Lazy",
    "Manifest",
    "PlanError",
    "RefitError",
    "RefitReport",
    "Refitter",
    "ResolveError",
    "Role",
    "TensorMeta",
    "TornStateError",
    "TransportError",
    "WireError",
]
