"""Input validation for a push: ``state`` and ``scales`` -> plan entries and sources.

Every bad entry is collected and reported at once (names, types, layouts, dtypes, scale
values); nothing is sent for an invalid push. Scales and amax are found by name wherever they
are (``scales``, or inside ``state``, as a QAT or ModelOpt ``state_dict()`` carries them; see
``refit.scales.is_quant_state``), checked by one rule and planned first, so receivers validate
them before they apply any weight.

Scales are the hot spot of pushes with many small tensors, so their layout is remembered
between pushes. Every push compares, for every scale, everything that decides the value read at
its address (Python type, dtype, device, negative / conjugate / zero-tensor bits, shape and
strides: one C++ loop, see ``signature.py``), then its data pointer (one C-level pass): a cached
layout never sends a value other than the one handed over. Scales in the same memory (quantizer
buffers updated in place, or new 0-d views of one flat buffer) are read with one operation per
run at their addresses (see ``gather.py``), then validated and packed as a stacked block (see
``scales.py``). The layout built from a push's scales keeps their memory allocated until a push
with other scales (or ``Refitter.close``). Scales that are new tensors every push (``amax /
448`` computed at refit time) of the same signature are read once the layout is aimed at their
memory, without keeping it. Anything else (other names or order, another dtype, rank, type or
bit, a value that is not a tensor) builds the layout again with every per-tensor check.

Likewise a state whose names and tensor objects are those of the previous push is not
re-checked (a tensor resized in place since then fails loudly at pack time, never silently).
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import compress
from typing import Any, NamedTuple

import torch

from refit.errors import PlanError, problem_list
from refit.gather import Gather
from refit.meta import DTYPE_NAMES, MIN_RUN, Role, TensorMeta, dtype_name
from refit.pack import Lazy
from refit.plan import PlanEntry
from refit.scales import amax_mask, is_quant_state, run_problems, value_problem
from refit.signature import Signature

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_STRIDED = torch.strided

StateLike = Mapping[str, "torch.Tensor | Lazy"] | Iterable[tuple[str, "torch.Tensor | Lazy"]]


@dataclass
class ScaleBlocks:
    """Consecutive 0-d scales of one dtype, stacked once per push."""

    stacks: list[torch.Tensor]
    position: dict[str, tuple[int, int]]  # name -> (block, index in block)

    def source(self, metas: Sequence[TensorMeta]) -> torch.Tensor | None:
        """The stacked values of a run of metas, if one block holds them in order."""
        first = self.position.get(metas[0].name)
        if first is None:
            return None
        g, k = first
        if self.position.get(metas[-1].name) != (g, k + len(metas) - 1):
            return None
        return self.stacks[g][k : k + len(metas)]


@dataclass
class Collected:
    """What :class:`Collector` made of one push's input: the plan entries (scales first), each name's source tensor
    (or :class:`~refit.pack.Lazy`), and the stacked 0-d scales, if any.
    """
    entries: list[PlanEntry]
    sources: dict[str, torch.Tensor | Lazy]
    blocks: ScaleBlocks | None


_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__


def _check_tensor(name: str, value: object) -> str:
    if not isinstance(value, torch.Tensor):
        return f"{name}: expected a torch.Tensor or refit.Lazy, got {type(value).__name__}"
    if type(value).__torch_dispatch__ is not _PLAIN_DISPATCH:  # a wrapper subclass: its memory is not its values
        return (
            f"{name}: a {type(value).__name__} (a tensor subclass with its own __torch_dispatch__, e.g. DTensor) cannot travel as is; "
            "pass a plain tensor (DTensor: .full_tensor(); or push refit.sources.Source(model), which gathers them)"
        )
    if value.layout != torch.strided or value.is_meta:
        return f"{name}: {value.layout} / meta tensors cannot travel; pass a dense tensor"
    try:
        dtype_name(value.dtype)
    except PlanError as exc:
        return f"{name}: {exc}"
    return ""


@dataclass
class _ScaleLayout:
    """What is remembered of the scales between pushes."""

    names: tuple[str, ...]
    pointers: list[int]  # every scale's data_ptr
    signature: Signature  # everything else of every scale that decides the value read at its address
    entries: list[PlanEntry]
    groups: list[tuple[int, int]]  # [start, end) of stacked blocks
    gathers: list[Gather]  # per group: reads its scales
    masks: list[torch.Tensor | None]
    singles: list[int]  # scales validated one by one
    position: dict[str, tuple[int, int]]

    def follow(self, values: list[Any]) -> bool:
        """Whether this layout reads ``values`` (the scales of a push with the same names).

        Every push, each scale's type, dtype, device, bits, shape and strides are compared
        with the layout's (one C++ loop, see ``signature.py``), then its data pointer. Scales
        in the same memory are read where they are; scales in other memory (new tensors every
        push) are read once the gathers are aimed at them (keeping nothing). Anything else
        needs a new layout.
        """
        if not self.signature.matches(values):
            return False
        pointers = _pointers(values)
        if pointers != self.pointers:
            self.gathers = [Gather(values[s:e], pointers[s:e], hold=False) for s, e in self.groups]
            self.pointers = pointers
        return True


_PTR_OF = torch.Tensor.data_ptr
_DTYPE_OF, _SHAPE_OF = operator.attrgetter("dtype"), operator.attrgetter("shape")
_IS_NEG = torch.Tensor.is_neg


def _pointer(value: torch.Tensor) -> int:
    try:
        return value.data_ptr()
    except RuntimeError:  # a tensor without storage (a wrapper subclass): read one by one, never by address
        return 0


def _pointers(values: list[torch.Tensor]) -> list[int]:
    """Data pointers of ``values`` (a C-level loop; 0 for a tensor without storage)."""
    try:
        return list(map(_PTR_OF, values))
    except RuntimeError:
        return list(map(_pointer, values))


def _signature(values: list[Any]) -> tuple[list[Any], list[Any]]:
    """Dtypes and shapes of ``values`` (C-level loops)."""
    return list(map(_DTYPE_OF, values)), list(map(_SHAPE_OF, values))


def _same_objects(refs: list[weakref.ref[Any]], values: list[Any]) -> bool:
    """True if every weak reference still points at the corresponding value (C-level loops:
    this runs for every tensor of every push)."""
    return len(refs) == len(values) and all(map(operator.is_, [r() for r in refs], values))


@dataclass
class _Split:
    """Which entries of a state (by its names) are scales or amax, remembered between pushes."""

    names: tuple[str, ...]
    quant: list[bool]  # per entry
    keep: list[bool]  # the others
    picked: tuple[str, ...]  # the names of the scales and amax


def _pairs(state: Iterable[Any]) -> list[tuple[str, Any]]:
    if isinstance(state, str | bytes | torch.Tensor) or not isinstance(state, Iterable):
        raise PlanError(f"state must be a mapping or an iterable of (name, tensor) pairs, got {type(state).__name__}")
    pairs = list(state)
    for pair in pairs:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise PlanError(f"state must be a mapping or an iterable of (name, tensor) pairs, got {pair!r:.80}")
    return pairs


class _Last(NamedTuple):
    """The last mapping state and what it gave, reused when the same tensors come again."""

    layout: _ScaleLayout | None
    names: tuple[str, ...]
    refs: list[weakref.ref[Any]]  # weak: the Collector must not keep a trainer's tensors alive
    entries: list[PlanEntry]
    signature: tuple[list[Any], list[Any]]


class Collector:
    """Validates push input; remembers the scales' layout between pushes."""

    def __init__(self) -> None:
        self._layout: _ScaleLayout | None = None  # the last scales' layout (may hold their memory)
        self._split: _Split | None = None  # which entries of the last mapping state are scales
        # the last state (names and tensor objects) and what it gave, reused when the same
        # tensors come again (e.g. the same parameters every step)
        self._last: _Last | None = None

    def __call__(self, state: StateLike, scales: Mapping[str, torch.Tensor | Lazy] | None) -> Collected:
        """Validate ``state`` and ``scales``.

        Scales and amax inside ``state`` (by name, :func:`refit.scales.is_quant_state`) are
        checked and planned with ``scales``, ahead of the weights. A :class:`Lazy` one cannot be
        checked here (its value exists only once it is packed): receivers check it.

        Raises:
            PlanError: listing every bad entry: non-tensor values, duplicate names, sparse or
                meta tensors, dtypes that cannot travel, non-finite or non-positive scales,
                negative or non-finite amax.
        """
        if scales is not None and not isinstance(scales, Mapping):
            raise PlanError(f"scales must be a mapping of name -> tensor, got {type(scales).__name__}")
        if isinstance(state, torch.nn.Module):
            raise PlanError("pass module.state_dict() (or named_parameters()), not the module itself")
        problems: list[str] = []
        scales = scales or {}
        lazy = [(n, v) for n, v in scales.items() if isinstance(v, Lazy)]
        tensors: Mapping[str, torch.Tensor] = scales  # type: ignore[assignment]  # (no Lazy left, or filtered below)
        if lazy:  # a Lazy scale has no value to check yet: planned as a scale, checked by receivers
            tensors = {n: v for n, v in scales.items() if not isinstance(v, Lazy)}
            state = [*lazy, *(state.items() if isinstance(state, Mapping) else state)]
        lazy_names = {n for n, _ in lazy}
        names, values, sources, state = self._quant_state(state, tensors)
        layout, blocks = self._scales(names, values, problems)
        if isinstance(state, Mapping) and not problems:
            state_names, state_values = tuple(state), list(state.values())
            last = self._last
            if (
                last is not None
                and last.layout is layout
                and last.names == state_names
                and _same_objects(last.refs, state_values)
                and last.signature == _signature(state_values)
            ):
                # the same tensors as last push: nothing to re-check
                sources.update(zip(state_names, state_values))
                return Collected(last.entries, sources, blocks)
        entries = list(layout.entries) if layout else []
        lazy_scales: list[PlanEntry] = []  # planned right after the scales, checked by receivers
        reusable = True
        items = state.items() if isinstance(state, Mapping) else state
        for name, value in items:  # pairs: checked by _quant_state (_pairs) already
            if name in sources:
                problems.append(f"{name}: appears more than once (in state and/or scales)")
            elif isinstance(value, Lazy):
                sources[name] = value
                if name in lazy_names or _is_quant(name):
                    lazy_scales.append(PlanEntry(name, value.shape, value.dtype, Role.SCALE))
                else:
                    entries.append(PlanEntry(name, value.shape, value.dtype, Role.WEIGHT))
            elif type(value) in _PLAIN and value.dtype in DTYPE_NAMES and value.layout == _STRIDED and not value.is_meta and not _IS_NEG(value):
                sources[name] = value  # fast path: a dense tensor of a dtype that travels (pack copies under no_grad)
                entries.append(PlanEntry(name, value.shape, value.dtype, Role.WEIGHT))
            elif bad := _check_tensor(name, value):
                problems.append(bad)
            else:
                if value.is_neg():
                    # torch's negative bit: pack copies raw bits, so the value is resolved here (a copy)
                    value, reusable = value.resolve_neg(), False
                sources[name] = value
                entries.append(PlanEntry(name, value.shape, value.dtype, Role.WEIGHT))
        if problems:
            raise PlanError("invalid push input; nothing was sent:\n" + problem_list(problems))
        if lazy_scales:
            n = len(layout.entries) if layout else 0
            entries[n:n] = lazy_scales
        self._last = None
        if isinstance(state, Mapping) and reusable:
            try:  # weak references: the Collector must not keep a trainer's tensors alive between pushes
                state_values = list(state.values())
                self._last = _Last(layout, tuple(state), [weakref.ref(v) for v in state_values], entries, _signature(state_values))
            except TypeError:  # a value that cannot be weakly referenced: no reuse
                pass
        return Collected(entries, sources, blocks)

    def clear(self) -> None:
        """Forget what was remembered of the last push (and release the scales' memory)."""
        self._layout = None
        self._split = None
        self._last = None

    def _quant_state(self, state: StateLike, scales: Mapping[str, torch.Tensor]) -> tuple[tuple[str, ...], list[Any], dict[str, Any], StateLike]:
        """The scales to check and plan as scales: ``scales``, then the scales and amax inside
        ``state`` (tensors; a Lazy one stays in state). Returns their names, values, a sources
        dict holding them, and the rest of ``state``."""
        names, values = tuple(scales), list(scales.values())
        if isinstance(state, Mapping):
            state_names = tuple(state)
            split = self._split
            if split is None or split.names != state_names:  # by name: the same names, the same split
                quant = list(map(_is_quant, state_names))
                split = self._split = _Split(state_names, quant, [not q for q in quant], tuple(compress(state_names, quant)))
            if not split.picked:
                return names, values, dict(scales), state
            state_values = list(state.values())
            picked_names, picked = split.picked, list(compress(state_values, split.quant))
            keep = split.keep
            if any(issubclass(t, Lazy) for t in set(map(type, picked))):  # a Lazy scale stays in state (C-level scan)
                quant = [q and not isinstance(v, Lazy) for q, v in zip(split.quant, state_values)]
                keep = [not q for q in quant]
                picked_names, picked = tuple(compress(state_names, quant)), list(compress(state_values, quant))
            rest: StateLike = dict(zip(compress(state_names, keep), compress(state_values, keep)))
        else:
            pairs = _pairs(state)
            quant = [_is_quant(n) and not isinstance(v, Lazy) for n, v in pairs]
            rest = [p for p, q in zip(pairs, quant) if not q]
            picked_names, picked = tuple(n for (n, _), q in zip(pairs, quant) if q), [v for (_, v), q in zip(pairs, quant) if q]
        names, values = names + picked_names, values + picked
        return names, values, dict(zip(names, values)), rest

    def _scales(self, names: tuple[str, ...], values: list[Any], problems: list[str]) -> tuple[_ScaleLayout | None, ScaleBlocks | None]:
        if not names:
            return None, None
        layout = self._layout
        if layout is None or layout.names != names or not layout.follow(values):
            layout = self._new_layout(names, values, problems)
            if layout is None:
                return None, None
        assert layout is not None  # invariant: set above
        stacks = []
        for (s, e), gather, mask in zip(layout.groups, layout.gathers, layout.masks):
            stacked = gather(values[s:e])
            problems += run_problems(names[s:e], stacked, mask)
            stacks.append(stacked)
        problems += [p for i in layout.singles if (p := value_problem(names[i], values[i].detach()))]
        if problems:
            self._layout = None
            return None, None
        self._layout = layout
        blocks = ScaleBlocks(stacks, layout.position)
        return layout, blocks

    def _new_layout(self, names: tuple[str, ...], values: list[torch.Tensor], problems: list[str]) -> _ScaleLayout | None:
        entries: list[PlanEntry] = []
        n_bad = len(problems)
        if len(set(names)) != len(names):  # a name in scales and state, or twice in a state of pairs
            seen: set[str] = set()
            for name in names:
                if name in seen:
                    problems.append(f"{name}: appears more than once (in state and/or scales)")
                seen.add(name)
        for name, value in zip(names, values):
            if bad := _check_tensor(name, value):
                problems.append(bad)
            else:
                entries.append(PlanEntry(name, tuple(value.shape), value.dtype, Role.SCALE))
        if len(problems) > n_bad:
            return None
        groups: list[tuple[int, int]] = []
        singles: list[int] = []
        i = 0
        while i < len(entries):
            j = i + 1
            if entries[i].shape == () and type(values[i]) in _PLAIN:  # subclasses: one by one (dispatch)
                while (
                    j < len(entries)
                    and entries[j].shape == ()
                    and type(values[j]) in _PLAIN
                    and entries[j].dtype == entries[i].dtype
                    and values[j].device == values[i].device
                ):
                    j += 1
            if j - i >= MIN_RUN:
                groups.append((i, j))
            else:
                singles.extend(range(i, j))
            i = j
        position = {names[x]: (g, x - s) for g, (s, e) in enumerate(groups) for x in range(s, e)}
        masks = [amax_mask(names[s:e], values[s].device) for s, e in groups]
        pointers = _pointers(values)
        gathers = [Gather(values[s:e], pointers[s:e]) for s, e in groups]
        return _ScaleLayout(names, pointers, Signature(values), entries, groups, gathers, masks, singles, position)


def _is_quant(name: object) -> bool:
    return isinstance(name, str) and is_quant_state(name)
