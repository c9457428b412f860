"""RefitReport: what one push did, on the sender or on one receiver."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RefitReport:
    """Outcome of one push.

    Attributes:
        version: the version the push committed.
        bytes: payload bytes moved (padding excluded).
        buckets: buckets streamed.
        tensors: tensors in the manifest (weights and scales).
        seconds: wall seconds per stage (``plan``, ``handshake``, ``pack``, ``stream``,
            ``apply``, ``finish``, ``total``; a stage a side does not run is absent). On the
            sender, ``stream`` includes the handshake, which overlaps packing the first bucket.
            A receiver fed by messages (``zmq``, ``cuda_ipc``) adds ``wait`` (for the next
            message of the push) and ``stage`` (getting a bucket's bytes on the applying
            thread, or waiting for the thread that got them ahead).
        loaded: tensors applied to a local target (receiver side).
        remote: tensors consumed but owned by another pipeline stage (receiver side).
        peer: who wrote the report (``"sender"`` or a receiver's name).
        receivers: the receivers' own reports, on the sender's report.
    """

    version: int
    bytes: int
    buckets: int
    tensors: int
    seconds: dict[str, float] = field(default_factory=dict)
    loaded: int = 0
    remote: int = 0
    peer: str = "sender"
    receivers: list[RefitReport] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        """Payload GB/s (1e9 bytes) over the ``total`` stage."""
        total = self.seconds.get("total", 0.0)
        return self.bytes / total / 1e9 if total > 0 else 0.0

    def to_wire(self) -> dict[str, Any]:
        """This report as plain values for the wire (read back by :func:`refit.wire.report_from_wire`);
        ``receivers`` is not included: each receiver sends its own.
        """
        return {
            "version": self.version,
            "bytes": self.bytes,
            "buckets": self.buckets,
            "tensors": self.tensors,
            "seconds": dict(self.seconds),
            "loaded": self.loaded,
            "remote": self.remote,
            "peer": self.peer,
        }

    def summary(self) -> str:
        """One line: version, tensors, MB, buckets, total ms and GB/s, then the receiver's counts and each stage's ms."""
        stages = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.seconds.items() if k != "total")
        line = (
            f"[{self.peer}] version {self.version}: {self.tensors} tensors, {self.bytes / 1e6:.1f} MB "
            f"in {self.buckets} buckets, {self.seconds.get('total', 0.0) * 1e3:.1f} ms "
            f"({self.gbps:.2f} GB/s)"
        )
        if self.peer != "sender":
            line += f", loaded {self.loaded}, remote {self.remote}"
        return line + (f"; {stages}" if stages else "")

    def __str__(self) -> str:
        return "\n".join([self.summary(), *("  " + r.summary() for r in self.receivers)])
