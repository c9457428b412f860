"""``refit verify``: compare a sha256 fingerprint of the sender's state with each receiver's.

A debugging aid for a run whose engines behave oddly: after a push, the trainer hashes every
tensor it pushed (name, dtype, shape, bytes; :func:`refit.digest.tensor_digest`) and asks each
receiver for the same digests of what it holds; every name whose digests differ is reported.

What a receiver hashes depends on its target (the ``source`` of its answer):

- ``stored``: a module or dict target (``RefitReceiver``, ``local``) hashes its tensors as they
  are *now*, so a tensor altered after the push (or never written) shows as a mismatch.
- ``received``: the vLLM worker extension stores tensors fused, sharded or repacked, so there is
  nothing to hash under the pushed names; its loader instead records the sha256 of each tensor
  as it arrived, when the push was sent with ``Refitter(record_digests=True)``. It proves the
  bytes that reached each worker equal the trainer's; it does not re-read the engine's weights.
  A later push without recording, or a broken one, drops the records of the names it wrote.
- ``none``: nothing to compare (no recording): every name is reported missing.

A name the receiver does not hold (another pipeline stage's layer, a name never pushed) is
reported as ``missing``, not as a mismatch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from refit.digest import fingerprints
from refit.pack import Lazy


@dataclass(frozen=True)
class VerifyResult:
    """How one receiver's fingerprint compares with the sender's state.

    Attributes:
        peer: the receiver's name.
        version: its committed version.
        source: what it hashed: ``stored``, ``received`` or ``none`` (see the module doc).
        matched: how many names have equal digests.
        mismatched: the names whose digests differ (sorted).
        missing: the sender's names this receiver does not hold (sorted).
    """

    peer: str
    version: int
    source: str
    matched: int
    mismatched: tuple[str, ...]
    missing: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when no name differs (``missing`` names are another stage's or unrecorded)."""
        return not self.mismatched and self.source != "none"

    def summary(self) -> str:
        """One line for a log: ``rx0 (v3, stored): 12 match, 1 differ (w), 0 missing``."""
        differ = f" ({', '.join(self.mismatched[:5])}{' ...' if len(self.mismatched) > 5 else ''})" if self.mismatched else ""
        counts = f"{self.matched} match, {len(self.mismatched)} differ{differ}, {len(self.missing)} missing"
        return f"{self.peer} (v{self.version}, {self.source}): {counts}"


def sender_fingerprints(sources: Mapping[str, torch.Tensor | Lazy]) -> dict[str, bytes]:
    """``name -> tensor_digest`` of the pushed tensors (a :class:`Lazy` is materialized on the
    host, so its ``fill`` must give the same bytes as during the push)."""
    return fingerprints({name: src.materialize("cpu") if isinstance(src, Lazy) else src for name, src in sources.items()})


def compare(mine: Mapping[str, bytes], peer: str, version: int, source: str, theirs: Mapping[str, bytes]) -> VerifyResult:
    """Compare the sender's digests ``mine`` with one receiver's ``theirs``."""
    mismatched, missing, matched = [], [], 0
    for name, d in mine.items():
        other = theirs.get(name)
        if other is None:
            missing.append(name)
        elif other != d:
            mismatched.append(name)
        else:
            matched += 1
    return VerifyResult(peer, version, source, matched, tuple(sorted(mismatched)), tuple(sorted(missing)))
