"""Ray adapter, placement: where each actor runs, which transport joins them, which address
every side binds. Pure functions over :class:`Place` records (no Ray calls), so the choice is
tested with tables; :mod:`refit.adapters.ray_actors` measures a ``Place`` inside each actor.

The rules (``transport="auto"``): ``cuda_ipc`` when the trainer has a GPU and every engine
receiver sits on that same GPU (same node, same UUID: colocated); ``nccl`` when every side has
a GPU; else ``zmq``. ``bind="auto"``: loopback when every actor is on the trainer's node, else
each side's Ray node IP. Rejected: guessing addresses from hostnames (a Ray node IP is the
address Ray itself uses between nodes); fixed ports (every socket binds port ``*``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from refit.errors import RefitError, TransportError

TRANSPORTS = ("auto", "zmq", "nccl", "cuda_ipc")
BINDS = ("auto", "loopback", "node")
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, kw_only=True)
class Place:
    """Where one actor (or one vLLM worker) runs.

    Args:
        node_id: the Ray node id.
        node_ip: the Ray node's IP (what Ray itself uses between nodes).
        host: the host identity of the shared-memory path (boot id).
        gpus: UUIDs of the GPUs this process sees (empty on a CPU-only process).
    """

    node_id: str
    node_ip: str
    host: str
    gpus: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for what in ("node_id", "node_ip", "host"):
            if not isinstance(getattr(self, what), str) or not getattr(self, what):
                raise RefitError(f"Place.{what} must be a non-empty string, got {getattr(self, what)!r:.80}")
        check_ip(self.node_ip, "Place.node_ip")

    def to_wire(self) -> dict[str, Any]:
        """This place as plain values, as an actor reports it (read back by :meth:`from_wire`)."""
        return {"node_id": self.node_id, "node_ip": self.node_ip, "host": self.host, "gpus": list(self.gpus)}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], who: str) -> Place:
        """The ``Place`` an actor reported; TransportError naming ``who`` if it is malformed."""
        try:
            return cls(node_id=d["node_id"], node_ip=d["node_ip"], host=d["host"], gpus=tuple(str(g) for g in d.get("gpus", ())))
        except (KeyError, TypeError, RefitError) as exc:
            raise TransportError(f"{who} reported an invalid placement {dict(d)!r:.200}: {exc}") from None


def check_ip(value: str, what: str) -> str:
    """``value`` if it is an IPv4 or IPv6 address, else RefitError naming ``what``."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise RefitError(f"{what} must be an IP address (e.g. 10.0.0.5), got {value!r:.80}") from None
    return value


def check_choice(value: Any, allowed: Sequence[str], what: str) -> str:
    """``value`` if it is one of ``allowed``.

    Raises:
        RefitError: naming option ``what`` and the allowed values.
    """
    if not isinstance(value, str) or value not in allowed:
        raise RefitError(f"{what} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r:.80}")
    return value


def choose_transport(requested: str, trainer: Place, engines: Mapping[str, Sequence[Place]]) -> str:
    """The transport between ``trainer`` and every engine's receivers (``engines``: engine name
    -> the places of its receivers).

    Raises:
        RefitError: ``requested`` is not a transport this adapter sets up.
        TransportError: ``cuda_ipc`` was requested for receivers not colocated with the trainer.
    """
    check_choice(requested, TRANSPORTS, "transport")
    places = [(name, p) for name, ps in engines.items() for p in ps]
    if requested == "cuda_ipc":
        apart = [name for name, p in places if not _colocated(trainer, p)]
        if apart:
            where = f"GPU {trainer.gpus[0]}" if trainer.gpus else f"host {trainer.node_ip} (shared memory)"
            raise TransportError(
                f"transport 'cuda_ipc' needs every receiver on the trainer's {where}; engine actor(s) {sorted(set(apart))} are not: "
                "use transport='nccl' or 'zmq' (or 'auto')"
            )
    if requested != "auto":
        return requested
    if trainer.gpus and all(p.node_id == trainer.node_id and set(p.gpus) == {trainer.gpus[0]} for _, p in places):
        return "cuda_ipc"
    if trainer.gpus and all(p.gpus for _, p in places):
        return "nccl"
    return "zmq"


def _colocated(trainer: Place, p: Place) -> bool:
    if trainer.gpus:
        return p.node_id == trainer.node_id and trainer.gpus[0] in p.gpus
    return p.host == trainer.host and not p.gpus  # the shared-memory path: one host, no GPU


def choose_bind(requested: str, trainer: Place, engines: Mapping[str, Sequence[Place]]) -> str:
    """``"loopback"`` or ``"node"``: what every side binds (``"auto"``: loopback when every
    receiver is on the trainer's node, else each side's node IP).

    Raises:
        RefitError: ``requested`` is not one of ``auto``, ``loopback``, ``node``.
        TransportError: ``loopback`` was requested for actors on different nodes.
    """
    check_choice(requested, BINDS, "bind")
    away = sorted({name for name, ps in engines.items() for p in ps if p.node_id != trainer.node_id})
    if requested == "loopback" and away:
        raise TransportError(f"bind='loopback' cannot reach engine actor(s) {away} on other nodes than the trainer's: use bind='node' (or 'auto')")
    if requested == "auto":
        return "node" if away else "loopback"
    return requested


def side_options(transport: str, bind: str, ip: str, *, sender: bool) -> dict[str, Any]:
    """The transport options that make one side bind ``ip`` (its node IP) when ``bind`` is
    ``"node"``; nothing for loopback (every transport's default) and for ``cuda_ipc`` (an
    ``ipc://`` socket on the one host)."""
    if bind != "node" or transport == "cuda_ipc":
        return {}
    if sender:
        return {"host": ip} if transport == "nccl" else {}
    address = f"tcp://[{ip}]:*" if ":" in ip else f"tcp://{ip}:*"
    return {"address": address, "host": ip} if transport == "nccl" else {"address": address}
