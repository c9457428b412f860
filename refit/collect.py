"""Input validation for a push: ``state`` and ``scales`` -> plan entries and sources.

Every bad entry is collected and reported at once (names, types, layouts, dtypes, scale
values); nothing is sent for an invalid push. Scales are planned first, so receivers validate
them before they apply any weight.

Scales are the hot spot of pushes with many small tensors, so their layout is remembered
between pushes. Every push compares each scale's data pointer and rank with the layout's (one
C-level pass each, no Python per scale). Scales in the same memory (quantizer buffers updated
in place, or new 0-d views of one flat buffer) are read with one operation per run at their
addresses (see ``gather.py``), then validated and packed as a stacked block (see ``scales.py``).
The layout built from a push's scales keeps their memory allocated until a push with other
scales (or ``Refitter.close``), so an equal address is the same memory. Scales that are new
tensors every push (``amax / 448`` computed at refit time) are checked in bulk for the layout's
types, dtypes and devices, and the layout is aimed at their memory without keeping it; from then
on dtypes are compared every push too. Anything else (other names or order, a scale given other
memory, rank or dtype, a value that is not a tensor) builds the layout again with every
per-tensor check. Not noticed while the layout keeps the memory: a scale handed over as another
dtype of the same size over the same memory (``t.view(torch.int32)``); its bytes are sent as
the layout's dtype. Comparing dtypes every push would cost about 1 ms per 10,000 scales.

Likewise a state whose names and tensor objects are those of the previous push is not
re-checked (a tensor resized in place since then fails loudly at pack time, never silently).
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from refit.errors import PlanError, problem_list
from refit.gather import Gather
from refit.meta import DTYPE_NAMES, Role, TensorMeta, dtype_name
from refit.pack import Lazy
from refit.plan import PlanEntry
from refit.scales import MIN_RUN, amax_mask, run_problems, value_problem

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
    entries: list[PlanEntry]
    sources: dict[str, torch.Tensor | Lazy]
    blocks: ScaleBlocks | None


def _check_tensor(name: str, value: object) -> str:
    if not isinstance(value, torch.Tensor):
        return f"{name}: expected a torch.Tensor or refit.Lazy, got {type(value).__name__}"
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
    where: tuple[list[int], list[int]]  # every scale's data_ptr and rank
    entries: list[PlanEntry]
    groups: list[tuple[int, int]]  # [start, end) of stacked blocks
    gathers: list[Gather]  # per group: reads its scales
    masks: list[torch.Tensor | None]
    singles: list[int]  # scales validated one by one
    position: dict[str, tuple[int, int]]
    dtypes: list[torch.dtype]
    devices: list[torch.device]

    @property
    def holds_storages(self) -> bool:
        """The gathers keep the scales' memory allocated (else nothing is kept)."""
        return all(g.held is not None for g in self.gathers)

    def follow(self, values: list[Any]) -> bool:
        """Whether this layout reads ``values`` (the scales of a push with the same names).

        Scales in the same memory are read where they are; scales in other memory (new
        tensors every push) of the same types, dtypes, devices and ranks are read once the
        gathers are aimed at them (keeping nothing: from then on, dtypes are compared every
        push). Anything else needs a new layout.
        """
        try:
            where = _where(values)
        except (TypeError, RuntimeError):  # not a tensor, or one without storage: check it properly
            return False
        if where[1] != self.where[1] or not all(values[i].shape == self.entries[i].shape for i in self.singles):
            return False
        if where[0] == self.where[0]:  # the same memory (so the same devices)
            if self.holds_storages:  # no other tensor can sit at these addresses
                return all(values[i].dtype == self.entries[i].dtype for i in self.singles)
            return list(map(_DTYPE_OF, values)) == self.dtypes
        if not _PLAIN_TYPES.issuperset(map(type, values)):
            return False
        if list(map(_DTYPE_OF, values)) != self.dtypes or list(map(_DEVICE_OF, values)) != self.devices:
            return False
        self.gathers = [Gather(values[s:e], where[0][s:e], hold=False) for s, e in self.groups]
        self.where = where
        return True


_PLAIN_TYPES = frozenset(_PLAIN)
_DTYPE_OF, _DEVICE_OF = operator.attrgetter("dtype"), operator.attrgetter("device")
_SHAPE_OF = operator.attrgetter("shape")
_PTR_OF, _DIM_OF = torch.Tensor.data_ptr, torch.Tensor.dim


def _where(values: list[Any]) -> tuple[list[int], list[int]]:
    """Data pointers and ranks of ``values`` (C-level loops)."""
    return list(map(_PTR_OF, values)), list(map(_DIM_OF, values))


def _signature(values: list[Any]) -> tuple[list[Any], list[Any]]:
    """Dtypes and shapes of ``values`` (C-level loops)."""
    return list(map(_DTYPE_OF, values)), list(map(_SHAPE_OF, values))


def _same_objects(refs: list[weakref.ref[Any]], values: list[Any]) -> bool:
    """True if every weak reference still points at the corresponding value (C-level loops:
    this runs for every tensor of every push)."""
    return len(refs) == len(values) and all(map(operator.is_, [r() for r in refs], values))


class Collector:
    """Validates push input; remembers the scales' layout between pushes."""

    def __init__(self) -> None:
        self._layout: _ScaleLayout | None = None  # the last scales' layout (may hold their memory)
        # the last state (names and tensor objects) and what it gave, reused when the same
        # tensors come again (e.g. the same parameters every step)
        self._last: tuple[_ScaleLayout | None, tuple[str, ...], list[weakref.ref[Any]], list[PlanEntry], tuple[list[Any], list[Any]]] | None = None

    def __call__(self, state: StateLike, scales: Mapping[str, torch.Tensor] | None) -> Collected:
        """Validate ``state`` and ``scales``.

        Raises:
            PlanError: listing every bad entry: non-tensor values, duplicate names, sparse or
                meta tensors, dtypes that cannot travel, non-finite or non-positive scales.
        """
        if scales is not None and not isinstance(scales, Mapping):
            raise PlanError(f"scales must be a mapping of name -> tensor, got {type(scales).__name__}")
        if isinstance(state, torch.nn.Module):
            raise PlanError("pass module.state_dict() (or named_parameters()), not the module itself")
        problems: list[str] = []
        layout, blocks = self._scales(scales or {}, problems)
        sources: dict[str, torch.Tensor | Lazy] = dict(scales or {}) if layout is not None else {}
        if isinstance(state, Mapping) and not problems:
            names, values = tuple(state), list(state.values())
            last = self._last
            if last is not None and last[0] is layout and last[1] == names and _same_objects(last[2], values) and last[4] == _signature(values):
                # the same tensors as last push: nothing to re-check
                sources.update(zip(names, values))
                return Collected(last[3], sources, blocks)
        entries = list(layout.entries) if layout else []
        items = state.items() if isinstance(state, Mapping) else state
        for pair in items:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise PlanError(f"state must be a mapping or an iterable of (name, tensor) pairs, got {pair!r:.80}")
            name, value = pair
            if name in sources:
                problems.append(f"{name}: appears more than once (in state and/or scales)")
            elif isinstance(value, Lazy):
                sources[name] = value
                entries.append(PlanEntry(name, value.shape, value.dtype, Role.WEIGHT))
            elif type(value) in _PLAIN and value.dtype in DTYPE_NAMES and value.layout == _STRIDED and not value.is_meta:
                sources[name] = value  # fast path: a dense tensor of a dtype that travels (pack copies under no_grad)
                entries.append(PlanEntry(name, value.shape, value.dtype, Role.WEIGHT))
            elif bad := _check_tensor(name, value):
                problems.append(bad)
            else:
                sources[name] = value  # type: ignore[assignment]
                entries.append(PlanEntry(name, value.shape, value.dtype, Role.WEIGHT))  # type: ignore[union-attr]
        if problems:
            raise PlanError("invalid push input; nothing was sent:\n" + problem_list(problems))
        if isinstance(state, Mapping):
            try:  # weak references: the Collector must not keep a trainer's tensors alive between pushes
                values = list(state.values())
                self._last = (layout, tuple(state), [weakref.ref(v) for v in values], entries, _signature(values))
            except TypeError:  # a value that cannot be weakly referenced: no reuse
                self._last = None
        return Collected(entries, sources, blocks)

    def clear(self) -> None:
        """Forget what was remembered of the last push (and release the scales' memory)."""
        self._layout = None
        self._last = None

    def _scales(self, scales: Mapping[str, torch.Tensor], problems: list[str]) -> tuple[_ScaleLayout | None, ScaleBlocks | None]:
        if not scales:
            return None, None
        names, values = tuple(scales), list(scales.values())
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
        where = _where(values)
        gathers = [Gather(values[s:e], where[0][s:e]) for s, e in groups]
        dtypes, devices = list(map(_DTYPE_OF, values)), list(map(_DEVICE_OF, values))
        return _ScaleLayout(names, where, entries, groups, gathers, masks, singles, position, dtypes, devices)
