"""Name resolution: where does each incoming tensor go on this receiver?

A resolver classifies every manifest name as *local* (a target exists here, with its buffer or
loader), *remote* (owned by another pipeline stage of this engine: consumed, not loaded) or
*unknown* (a problem that refuses the push). The strict loader (``load.py``) only talks to this
small interface, so the vLLM adapter plugs its own resolver into the same receiver.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from refit.digest import fingerprints
from refit.errors import ResolveError
from refit.meta import TensorMeta


class Placement(enum.StrEnum):
    """Where a manifest entry goes on a receiver.

    ``LOCAL``: a buffer or ``load`` callable here takes it. ``REMOTE``: another pipeline stage owns it
    (consumed, not loaded). ``UNKNOWN``: nothing here takes it; the push is refused.
    """
    LOCAL = "local"
    REMOTE = "remote"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Resolution:
    """Where one manifest entry goes.

    Exactly one of ``dest`` (a buffer of the entry's shape and dtype, filled by a direct copy)
    or ``load`` (a callable that receives the whole tensor as a view valid only during the call,
    e.g. a vLLM ``weight_loader`` bound to its shard) is set for a LOCAL entry. ``key`` names
    what the entry fills, for duplicate and coverage checks. ``problem`` says why an UNKNOWN
    entry, or a LOCAL entry with the wrong shape or dtype, cannot be loaded.
    """

    placement: Placement
    dest: torch.Tensor | None = None
    load: Callable[[torch.Tensor], None] | None = None
    key: str = ""
    problem: str = ""


class Resolver(Protocol):
    """What a receiver needs to know about its target.

    Optional, called by the :class:`~refit.load.Loader` where present:

    * ``stable: bool`` (default True): False makes every push resolve again instead of reusing
      the resolution of a layout seen before.
    * ``check_push(resolutions) -> list[str]``: rules for a whole accepted push (the LOCAL
      resolutions of its first chunks), e.g. vLLM's whole-layer rule; problems refuse the push.
    * ``end_bucket(bucket, *, keep_views: bool)``: called after each bucket's entries were
      handed to their ``load`` callables, lets a resolver batch a bucket's loads (the vLLM
      adapter makes one ``load_weights`` call per bucket). Until it returns, the views given to
      ``load`` stay valid; past it, only when ``keep_views`` is True (the bucket's memory is
      never written again, see ``Loader.buckets_stay``).
    * ``abandon()``: a push was refused by ``check_push`` or aborted: drop what the resolver
      holds for it and leave the target usable.
    * ``loads_copied: bool`` (default False): True promises that every tensor handed to a
      ``load`` callable has been copied out by the time ``post_load`` returns (vLLM copies it
      into its layers). The loader may then assemble a tensor that arrives in chunks in a
      host buffer it keeps for the next push, instead of allocating one each push.
    """

    def resolve(self, meta: TensorMeta) -> Resolution:
        """Classify one manifest entry (called once per tensor, before any byte is loaded)."""
        ...

    def required_keys(self) -> set[str]:
        """Keys a complete push must cover (for ``require_complete=True``)."""
        ...

    def post_load(self) -> None:
        """Runs after the last bucket of a push was applied, before the version is committed."""
        ...


def suggest(name: str, known: Mapping[str, object] | list[str]) -> str:
    """' (did you mean X?)' for the closest known name, or ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_compatible(meta: TensorMeta, dest: torch.Tensor, target: str) -> str:
    """'' if ``dest`` can take ``meta``'s tensor by direct copy, else the problem."""
    if tuple(dest.shape) != meta.shape:
        return f"{meta.name}: shape {list(meta.shape)} does not match {target} {list(dest.shape)}"
    if dest.dtype != meta.dtype:
        return f"{meta.name}: dtype {meta.dtype} does not match {target} {dest.dtype}; convert it on the sender"
    return ""


class TensorsResolver:
    """Resolver for a ``torch.nn.Module`` (parameters and buffers by name) or a dict of tensors.

    Names must match exactly (``Module.named_parameters`` / ``named_buffers`` names, tied
    weights under each of their names). Targets are written in place, under ``no_grad``. They
    are captured when the resolver is built: after replacing a module's tensors
    (``module.to(...)``, ``load_state_dict(assign=True)``), build a new receiver.

    Args:
        target: the module or ``dict[str, Tensor]`` to load into.
        post_load: optional hook run after the last bucket of each push.
        remote: for one stage of a pipeline: ``remote(name)`` is True for the names another
            stage owns. Such a name, when not a target here, is consumed and not loaded
            (``remote`` in reports); any other unknown name refuses the push. The owning stage
            checks the name, shape and dtype, and one refusal stops the push everywhere.

    Example:
        >>> stage = {"layers.1.w": torch.zeros(2)}  # this stage owns layer 1
        >>> r = TensorsResolver(stage, remote=lambda n: n.startswith("layers.0."))
    """

    def __init__(
        self,
        target: torch.nn.Module | Mapping[str, torch.Tensor],
        post_load: Callable[[], None] | None = None,
        *,
        remote: Callable[[str], bool] | None = None,
    ):
        if isinstance(target, torch.nn.Module):
            tensors: dict[str, torch.Tensor] = {}
            for n, p in target.named_parameters(remove_duplicate=False):
                tensors[n] = p.data
            for n, b in target.named_buffers(remove_duplicate=False):
                if b is not None:
                    tensors[n] = b
        elif isinstance(target, Mapping):
            tensors = dict(target)
            bad = [k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
            if bad:
                raise ResolveError(f"a dict target must map str -> Tensor; bad keys: {bad[:5]}")
        else:
            raise ResolveError(f"target must be a torch.nn.Module or a dict of tensors, got {type(target).__name__}")
        self.tensors = tensors
        self._post_load = post_load
        self._remote = remote

    def resolve(self, meta: TensorMeta) -> Resolution:
        """LOCAL with the target tensor of ``meta.name`` (a problem if its shape or dtype differ), REMOTE for a name
        ``remote`` claims, else UNKNOWN with the closest name as a hint.
        """
        dest = self.tensors.get(meta.name)
        if dest is None and self._remote is not None and self._remote(meta.name):
            return Resolution(Placement.REMOTE, key=meta.name)
        if dest is None:
            return Resolution(Placement.UNKNOWN, key=meta.name, problem=f"{meta.name}: no such parameter or buffer{suggest(meta.name, self.tensors)}")
        # (a chunked tensor's need for a contiguous target is the Loader's check, for every resolver)
        return Resolution(Placement.LOCAL, dest=dest, key=meta.name, problem=check_compatible(meta, dest, "target"))

    def required_keys(self) -> set[str]:
        """Every target name: a complete push covers them all."""
        return set(self.tensors)

    def fingerprints(self) -> dict[str, bytes]:
        """``name -> sha256`` of every target tensor as it is now (``refit verify``)."""
        return fingerprints(self.tensors)

    def post_load(self) -> None:
        """Run the ``post_load`` hook, if one was given."""
        if self._post_load is not None:
            self._post_load()
