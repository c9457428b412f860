"""Trainer-side sources: a module or a state dict -> a lazy ``(name, tensor)`` stream for a push.

What a push needs from a trainer is its weights under the names an HF checkpoint uses:
parameters and persistent buffers (``state_dict()`` order), tied weights once, wrapper prefixes
(``torch.compile``'s ``_orig_mod.``, activation checkpointing's ``_checkpoint_wrapped_module.``)
removed. Plain tensors are yielded as they are (the push copies them into its buckets);
sharded ``DTensor`` parameters (FSDP2, TP) as :class:`Gathered` producers that gather one full
tensor straight into its bucket view when the push packs it, so the peak is one full tensor
plus the buckets, never the whole state. Gathers are collectives driven by the pushing rank
(see ``refit.sharded``): push inside ``source.lead()`` there, call ``source.serve()`` on every
other rank.

Lives in ``refit`` (not ``refit.adapters``): it needs nothing but torch.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from refit.errors import PlanError, problem_list
from refit.pack import Lazy
from refit.sharded import ShardedGathers, is_dtensor

# Name segments that wrappers insert and HF checkpoints never have.
WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


@dataclass(frozen=True)
class Gathered(Lazy):
    """A sharded tensor's producer: ``fill(out)`` gathers it and copies it into ``out``;
    :meth:`full` returns the gathered tensor itself (on the trainer's device), for a
    conversion that reads it (e.g. FP8 quantization)."""

    full: Callable[[], torch.Tensor]


def strip_wrappers(name: str) -> str:
    """``name`` without the segments wrappers insert (``_orig_mod.``, ``_checkpoint_wrapped_module.``,
    ``_fsdp_wrapped_module.``), anywhere in it.

    Example:
        >>> strip_wrappers("_orig_mod.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight")
        'model.layers.0.mlp.up_proj.weight'
    """
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def tied_names(module: torch.nn.Module) -> set[str]:
    """The names HF leaves out of a checkpoint because they are tied to another weight: each
    submodule's ``_tied_weights_keys`` (a list in transformers 4, a dict target -> source in 5),
    prefixed with the submodule's name."""
    out: set[str] = set()
    for prefix, sub in module.named_modules():
        keys = getattr(sub, "_tied_weights_keys", None) or ()
        for key in keys.keys() if isinstance(keys, Mapping) else keys:
            out.add(f"{prefix}.{key}" if prefix else str(key))
    return out


def _identity(value: Any) -> tuple[Any, ...] | None:
    """What makes two entries the same weight (tied), or None for a tensor never deduplicated."""
    if is_dtensor(value):
        return ("dtensor", id(value))
    if not isinstance(value, torch.Tensor) or value.numel() == 0 or value.is_meta:
        return None
    return (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), value.dtype, tuple(value.shape), value.stride())


class Source:
    """The ``(name, tensor)`` stream of a trainer's model for :meth:`refit.Refitter.push`.

    Iterating yields every parameter and persistent buffer in ``state_dict()`` order: plain
    tensors as they are, ``DTensor``s as :class:`Gathered` producers (one full tensor at a time,
    straight into the push's bucket). Tied weights come once, under the name an HF checkpoint
    keeps (not one listed in ``_tied_weights_keys``; else the first). The stream can be iterated
    for every push; it reads the current values each time. It holds the parameter objects: build
    it after wrapping and sharding (``fully_shard``, ``torch.compile``), and again if the trainer
    replaces parameter objects.

    With sharded tensors on several ranks, every rank builds the same ``Source``; the pushing
    rank pushes inside ``with source.lead():``, every other rank calls ``source.serve()`` at the
    same time (it returns when the push ends, whether it succeeded or not).

    Args:
        model: a ``torch.nn.Module`` or a state dict (name -> tensor or DTensor).
        include: ``include(name) -> bool`` on the HF name (wrappers stripped, before ``rename``);
            default: everything.
        rename: ``rename(name) -> str``, applied after ``include``; default: unchanged.
        strip: remove wrapper segments (:data:`WRAPPER_PREFIXES`) from names (default True).
        group: process group of the sharded tensors' ranks (default WORLD).
        leader: global rank that pushes (default 0).

    Raises:
        PlanError: listing every bad entry: a name ``rename`` maps to a non-string, two names
            mapping to one, a value that is not a tensor.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> [name for name, _ in Source(model, include=lambda n: n.endswith("weight"))]
        ['weight']
    """

    def __init__(
        self,
        model: torch.nn.Module | Mapping[str, Any],
        *,
        include: Callable[[str], bool] | None = None,
        rename: Callable[[str], str] | None = None,
        strip: bool = True,
        group: Any = None,
        leader: int = 0,
    ) -> None:
        if isinstance(model, torch.nn.Module):
            state: Mapping[str, Any] = model.state_dict(keep_vars=True)  # parameters stay Parameters / DTensors, no copies
            tied = {strip_wrappers(n) if strip else n for n in tied_names(model)}
        elif isinstance(model, Mapping):
            state, tied = model, set()
        else:
            raise PlanError(f"Source takes a torch.nn.Module or a state dict (name -> tensor), got {type(model).__name__}")
        problems: list[str] = []
        picked: list[tuple[str, str, Any]] = []  # (output name, original name, value)
        groups: dict[tuple[Any, ...], list[int]] = {}  # tied weights: one storage, several names
        for original, value in state.items():
            name = strip_wrappers(original) if strip else original
            if not isinstance(value, torch.Tensor):
                problems.append(f"{original}: expected a tensor, got {type(value).__name__}")
                continue
            if include is not None and not include(name):
                continue
            out = rename(name) if rename is not None else name
            if not isinstance(out, str) or not out:
                problems.append(f"{original}: rename returned {out!r}; it must return a non-empty name (filter with include= instead)")
                continue
            key = _identity(value)
            if key is not None:
                groups.setdefault(key, []).append(len(picked))
            picked.append((out, name, value))
        drop: set[int] = set()
        for members in groups.values():
            if len(members) > 1:  # tied: keep the name HF checkpoints keep, once
                keep = next((i for i in members if not _is_tied(picked[i][1], tied)), members[0])
                drop.update(i for i in members if i != keep)
        kept: dict[str, str] = {}
        for i, (out, name, _) in enumerate(picked):
            if i in drop:
                continue
            if out in kept:
                problems.append(f"{name}: renamed to {out!r}, which {kept[out]!r} is already exported as; fix rename")
            kept[out] = name
        if problems:
            raise PlanError("cannot build the source:\n" + problem_list(problems))
        self._entries = [(out, value) for i, (out, _, value) in enumerate(picked) if i not in drop]
        sharded = [(out, v) for out, v in self._entries if is_dtensor(v)]
        self._index = {out: i for i, (out, _) in enumerate(sharded)}
        self.gathers = ShardedGathers(sharded, group=group, leader=leader)

    @property
    def names(self) -> list[str]:
        """The exported names, in order."""
        return [n for n, _ in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor | Lazy]]:
        for name, value in self._entries:
            if name in self._index:
                yield name, self._gathered(name, value)
            else:
                yield name, value

    def _gathered(self, name: str, value: Any) -> Gathered:
        index = self._index[name]

        def full() -> torch.Tensor:
            return self.gathers.gather(index)

        def fill(out: torch.Tensor) -> None:
            whole = full()
            out.copy_(whole)  # the full tensor is freed on return: one at a time
            del whole

        return Gathered(tuple(value.shape), value.dtype, fill, full)

    def lead(self) -> contextlib.AbstractContextManager[None]:
        """Context manager on the pushing rank: push inside it (see :class:`Source`)."""
        return self.gathers.lead()

    def serve(self) -> int:
        """On every rank but the pushing one: join its gathers until its push ends.

        Returns:
            How many tensors were gathered.
        """
        return self.gathers.serve()


def _is_tied(name: str, tied: set[str]) -> bool:
    """Whether HF checkpoints leave ``name`` out (listed in a ``_tied_weights_keys``)."""
    if name in tied:
        return True
    for pattern in tied:  # some HF models list regular expressions there
        with contextlib.suppress(re.error):
            if re.fullmatch(pattern, name):
                return True
    return False


def quantizer_amax(model: torch.nn.Module | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The ModelOpt ``*_quantizer._amax`` buffers of ``model``, under the names a ModelOpt-quantized
    HF model has them (``model.layers.0.self_attn.q_proj.weight_quantizer._amax``, ...).

    For pushing calibrated amax alone (the engine's quantizers land them unchanged); a full
    :class:`Source` already carries them with every other persistent buffer.

    Args:
        model: a module or a state dict.

    Returns:
        name -> tensor (the buffers themselves, not copies), in ``state_dict()`` order.

    Example:
        >>> m = torch.nn.Module(); m.input_quantizer = torch.nn.Module()
        >>> m.input_quantizer.register_buffer("_amax", torch.tensor(3.0))
        >>> list(quantizer_amax(m))
        ['input_quantizer._amax']
    """
    return {n: v for n, v in Source(model, include=is_quantizer_amax)}  # type: ignore[misc]


def is_quantizer_amax(name: str) -> bool:
    """True for a ModelOpt quantizer's amax buffer (``..._quantizer._amax``)."""
    return name.endswith("_quantizer._amax")
