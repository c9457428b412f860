"""vLLM's native weight-transfer API, worker side: refit as the backend named ``refit``.

vLLM 0.32 drives RL weight updates through ``init_weight_transfer_engine`` ->
``start_weight_update`` -> ``update_weights`` (one or more) -> ``finish_weight_update`` on
``LLM`` / ``AsyncLLM`` (and Ray, HTTP), and builds one :class:`WeightTransferEngine` per worker
from ``WeightTransferConfig(backend=...)``. :class:`RefitWeightTransferEngine` is that engine
for ``backend="refit"``: it receives through refit's own machinery, the same as the worker
extension (:mod:`refit.adapters.vllm_worker`): a :class:`~refit.load.Loader` over a
:class:`~refit.adapters.vllm_resolve.VllmResolver` (strict resolution, scales, the layer-wise
reload, torn tracking) fed by a transport's receiver half.

The phases:

* ``init_weight_transfer_engine(init_info)``: :class:`RefitInitInfo`; the worker binds the
  receiver of ``transport`` at ``addresses[i]`` (``i``: its global rank, data-parallel rank
  times world size plus its rank, vLLM's own indexing of per-worker payloads).
* ``start_weight_update()``: opens a session (nothing is loaded).
* ``update_weights(update_info)``: :class:`RefitUpdateInfo`; serves **one complete refit
  push**: every name resolved before a byte loads (a refusal loads nothing), scales checked,
  buckets applied, the refit version committed. A push that breaks after a bucket was applied
  leaves the worker torn.
* ``finish_weight_update()``: raises :class:`~refit.errors.TornStateError` while the worker is
  torn, so vLLM never moves ``weight_version`` past a half-applied update.

Errors are raised where vLLM can take them. vLLM 0.32's multiprocess executor stops reading
replies at the first worker that raised in a collective call, so with several workers per
executor (tensor or pipeline parallel) the other workers' replies stay queued and every later
call of that engine gets the previous call's replies (checked with TP=2). There, only the last
worker raises an init error (all workers see the same info), and a failed push or a torn
finish is logged and recorded in ``failure`` on every worker, never raised: the trainer learns
it from refit's transport (its ``Refitter.push`` raises) and ``weight_version`` moves only if
the caller passes one to a ``finish_weight_update`` after a failed update.

Registered under ``refit`` in both of vLLM's factories by :func:`register` (idempotent): on
``import refit.adapters.vllm``, and in every vLLM process (engine core and spawned workers)
through the ``vllm.general_plugins`` entry point of this package.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from typing_extensions import override
from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo

from refit.adapters.vllm_worker import buckets_stay, vllm_loader, worker_receiver_options
from refit.errors import RefitError, TornStateError, TransportError
from refit.options import check_options, check_timeout
from refit.transports import load_transport
from refit.transports.base import ReceiverTransport

logger = logging.getLogger(__name__)

NAME = "refit"
"""The backend name: ``WeightTransferConfig(backend="refit")``."""

_SET_BY_ENGINE = ("address", "name")  # receiver options the engine sets itself


def _fields(cls: type, data: object, what: str) -> dict[str, Any]:
    """``data`` checked as the keyword fields of dataclass ``cls`` (unknown keys named)."""
    if not isinstance(data, Mapping):
        raise RefitError(f"{what} must be a dict, got {type(data).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(map(str, data)) - set(known))
    if unknown:
        raise RefitError(f"{what} has no field {', '.join(map(repr, unknown))}; its fields: {', '.join(known)}")
    return dict(data)


def _seconds(value: object, what: str, *, allow_none: bool = False) -> float | None:
    checked = check_timeout(value, what, allow_none=allow_none)
    return None if checked is None else float(checked)


@dataclass(kw_only=True)
class RefitInitInfo(WeightTransferInitInfo):
    """What every worker needs to join a refit transport (``init_weight_transfer_engine``).

    Attributes:
        transport: ``"zmq"``, ``"cuda_ipc"`` or ``"nccl"`` (``nccl`` runs on gloo without a GPU).
        addresses: the control address each worker binds, by global rank (one per worker of
            every data-parallel replica): ``ipc:///path`` or ``tcp://host:port``; the trainer
            connects to the same strings.
        options: the receivers' other options (``device``, ``host``, ``events``), plain values,
            as ``Refitter(receiver_options=...)`` takes them.

    Raises:
        RefitError: (on construction) a field of the wrong type or value, naming it.
    """

    transport: str
    addresses: list[str]
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        receiver = load_transport(self.transport).receiver_class()  # names the transports that have receivers
        if not isinstance(self.addresses, list | tuple) or not self.addresses:
            raise RefitError(f"init_info.addresses must be a non-empty list of receiver addresses (one per worker), got {self.addresses!r:.120}")
        bad = [a for a in self.addresses if not isinstance(a, str) or "://" not in a]
        if bad:
            raise RefitError(
                f"init_info.addresses holds {bad[0]!r:.80}; each must be a ZMQ address such as 'ipc:///tmp/refit-0' or 'tcp://10.0.0.5:5555'"
            )
        if len(set(self.addresses)) != len(self.addresses):
            raise RefitError("init_info.addresses repeats an address; every worker needs its own")
        self.addresses = list(self.addresses)
        if not isinstance(self.options, Mapping):
            raise RefitError(f"init_info.options must be a dict of receiver options, got {type(self.options).__name__}")
        taken = sorted(set(self.options) & set(_SET_BY_ENGINE))
        if taken:
            raise RefitError(f"init_info.options may not set {', '.join(taken)}: each worker's address comes from init_info.addresses")
        check_options(receiver, self.options, f"init_info.options (the {self.transport!r} receiver)")
        self.options = dict(self.options)

    @classmethod
    def parse(cls, data: object) -> RefitInitInfo:
        """From the dict ``init_weight_transfer_engine`` carries.

        Raises:
            RefitError: not a dict, an unknown or missing field, or a bad value (named).
        """
        fields = _fields(cls, data, "init_info")
        missing = [n for n in ("transport", "addresses") if n not in fields]
        if missing:
            raise RefitError(f"init_info lacks {', '.join(missing)}: pass e.g. {{'transport': 'zmq', 'addresses': ['ipc:///tmp/refit-0']}}")
        return cls(**fields)


@dataclass(kw_only=True)
class RefitUpdateInfo(WeightTransferUpdateInfo):
    """One ``update_weights`` call: serve one refit push.

    Attributes:
        timeout: seconds to wait for the trainer's push to begin.
        push_timeout: seconds any wait inside the push may take (default: ``timeout``).

    Raises:
        RefitError: (on construction) a field of the wrong type or value, naming it.
    """

    timeout: float = 120.0
    push_timeout: float | None = None

    def __post_init__(self) -> None:
        self.timeout = _seconds(self.timeout, "update_info.timeout")  # type: ignore[assignment]
        self.push_timeout = _seconds(self.push_timeout, "update_info.push_timeout", allow_none=True)

    @classmethod
    def parse(cls, data: object) -> RefitUpdateInfo:
        """From the dict ``update_weights`` carries (this worker's entry of a list).

        Raises:
            RefitError: not a dict, an unknown field, or a bad value (named).
        """
        return cls(**_fields(cls, data, "update_info"))


class RefitWeightTransferEngine(WeightTransferEngine[RefitInitInfo, RefitUpdateInfo]):
    """The worker half of ``backend="refit"`` (built by vLLM's ``WeightTransferEngineFactory``).

    Every ``update_weights`` call is one complete refit push into this worker's model shard.
    Errors are :class:`~refit.errors.RefitError` subclasses; vLLM ends the update session when
    ``update_weights`` raises (the next update starts with ``start_weight_update``). With
    several workers per executor, failures are recorded in :attr:`failure` instead (module doc).
    """

    init_info_cls = RefitInitInfo
    update_info_cls = RefitUpdateInfo

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self._rx: ReceiverTransport | None = None
        self._loader: Any = None  # refit.load.Loader, built on the first init (imports vLLM internals)
        self._stay = False
        self.last_report: Any = None  # the RefitReport of this worker's last committed push
        self.failure = ""  # the last failure recorded instead of raised (several workers; see the module doc)

    @property
    def index(self) -> int:
        """This worker's global rank: its entry of ``addresses`` and of list payloads."""
        pc = self.parallel_config
        return int(getattr(pc, "data_parallel_index", 0)) * int(pc.world_size) + int(pc.rank)

    @property
    def name(self) -> str:
        """This worker's name in reports, errors and logs (``vllm-worker-<index>``)."""
        return f"vllm-worker-{self.index}"

    @property
    def alone(self) -> bool:
        """This worker is its executor's only one: raising in a collective call is safe."""
        return int(self.parallel_config.world_size) == 1

    def _fail(self, exc: BaseException, phase: str, *, last_raises: bool = False) -> None:
        """Raise ``exc`` where vLLM's executor survives it (see the module docstring); else
        log it and keep it in :attr:`failure`."""
        self.failure = f"{phase}: {type(exc).__name__}: {exc}"
        if self.alone or (last_raises and int(self.parallel_config.rank) == int(self.parallel_config.world_size) - 1):
            raise exc
        logger.error("%s: %s (not raised: several workers; the trainer's push reports it)", self.name, self.failure)

    @override
    def parse_init_info(self, init_dict: dict[str, Any]) -> RefitInitInfo:
        try:
            return RefitInitInfo.parse(init_dict)
        except RefitError as exc:
            self._fail(exc, "init_weight_transfer_engine", last_raises=True)
            return None  # type: ignore[return-value]  # init_transfer_engine skips it

    @override
    def parse_update_info(self, update_dict: dict[str, Any]) -> RefitUpdateInfo:
        return RefitUpdateInfo.parse(update_dict)

    @property
    def loader(self) -> Any:
        """This worker's :class:`~refit.load.Loader` (committed ``version``, ``torn``)."""
        if self._loader is None:
            self._loader = vllm_loader(self.model, self.vllm_config, self.name)
        return self._loader

    def init_transfer_engine(self, init_info: RefitInitInfo) -> None:
        """Bind this worker's receiver (a previous one is closed first).

        Raises:
            RefitError: fewer addresses than workers, or the receiver could not bind.
        """
        if init_info is None:  # parse_init_info recorded a failure (several workers)
            return
        try:
            self._init(init_info)
        except Exception as exc:
            self._fail(exc, "init_weight_transfer_engine", last_raises=True)

    def _init(self, init_info: RefitInitInfo) -> None:
        if self.index >= len(init_info.addresses):
            raise RefitError(
                f"{self.name}: init_info.addresses has {len(init_info.addresses)} entries, this worker is index {self.index}; "
                "give one address per worker of every replica (RefitTrainerInitInfo(workers=N))"
            )
        self.shutdown()
        rx_cls = load_transport(init_info.transport).receiver_class()
        self._rx = rx_cls(name=self.name, address=init_info.addresses[self.index], **worker_receiver_options(init_info.transport, init_info.options))
        self._stay = buckets_stay(init_info.transport, init_info.options)
        _ = self.loader

    def _receiver(self) -> ReceiverTransport:
        if self._rx is None:
            raise RefitError(f"{self.name}: no refit transport joined; call init_weight_transfer_engine first")
        return self._rx

    def start_weight_update(self) -> None:
        """Open an update session; nothing is loaded here (each push resolves and loads itself)."""
        try:
            self._receiver()
        except RefitError as exc:
            self._fail(exc, "start_weight_update")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """Serve one complete push (see the module docstring); the loader synchronizes CUDA
        before it commits, so the base class's device-wide synchronize is not needed."""
        try:
            self.receive_weights(self.parse_update_info(update_info))
        except Exception as exc:
            self._fail(exc, "update_weights")

    def receive_weights(self, update_info: RefitUpdateInfo) -> None:
        """Serve one push.

        Raises:
            ResolveError: the push was refused; nothing was loaded.
            TransportError: no push began within ``timeout``, or the stream broke (torn if a
                bucket had been applied).
        """
        rx, loader = self._receiver(), self.loader
        loader.buckets_stay = self._stay
        report = rx.receive(loader, update_info.timeout, push_timeout=update_info.push_timeout)
        if report is None:
            raise TransportError(
                f"{self.name}: no push began within {update_info.timeout:g} s of update_weights; "
                "push from the trainer while update_weights runs, or raise update_info.timeout"
            )
        self.last_report = report

    def finish_weight_update(self) -> None:
        """Close the session.

        Raises:
            TornStateError: an update of this session broke after applying a bucket; vLLM keeps
                the session open and ``weight_version`` unchanged until a complete push lands.
        """
        try:
            self.loader.check_serving()
        except TornStateError as exc:
            self._fail(exc, "finish_weight_update")

    @override
    def shutdown(self) -> None:
        rx, self._rx = self._rx, None
        if rx is not None:
            rx.close()


def register() -> None:
    """Register ``refit`` in vLLM's worker and trainer factories (lazily: the modules are
    imported when vLLM builds an engine). Idempotent; also the ``vllm.general_plugins`` entry
    point, so spawned engine processes know the name."""
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory, WeightTransferTrainerFactory

    for factory, module, cls in (
        (WeightTransferEngineFactory, __name__, "RefitWeightTransferEngine"),
        (WeightTransferTrainerFactory, "refit.adapters.vllm_transfer_trainer", "RefitTrainerWeightTransferEngine"),
    ):
        try:
            factory.register_engine(NAME, module, cls)
        except ValueError as exc:  # registered before (this function ran already)
            if "already registered" not in str(exc):
                raise
