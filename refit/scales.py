"""Many small scales at the cost of a few tensor operations.

Quantized models carry hundreds to tens of thousands of 0-d scales (a ``weight_scale`` per
linear, ``k_scale``/``v_scale`` per attention block, ``_amax`` per quantizer). Handling each as
its own tensor costs a few microseconds of Python and dispatch apiece, seconds per push at
that count. Consecutive 0-d tensors of one dtype are therefore laid out at a constant stride
(the planner's alignment), so a *run* of them is one strided view of the bucket: validated with
one reduction, packed from one ``torch.stack``, unpacked by one ``unbind``.

Validation rule (sender and receiver alike): every scale element is finite; an amax (name
ending in ``amax``) is >= 0, any other scale > 0 (a zero or negative scale silently zeroes or
flips a layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refit.meta import TensorMeta, itemsize

MIN_RUN = 8  # shorter runs are cheaper one by one


def is_amax(name: str) -> bool:
    return name.endswith("amax")


def value_problem(name: str, value: torch.Tensor) -> str:
    """'' if one scale tensor's values are usable, else the problem (see module doc)."""
    if value.numel() == 0 or not value.dtype.is_floating_point:
        return ""
    v = value.float()
    if not bool(torch.isfinite(v).all()):
        return f"{name}: scale has non-finite values"
    if is_amax(name):
        if bool((v < 0).any()):
            return f"{name}: amax has negative values"
    elif bool((v <= 0).any()):
        return f"{name}: scale has values <= 0"
    return ""


def run_problems(names: Sequence[str], values: torch.Tensor, amax: torch.Tensor | None) -> list[str]:
    """Problems of a 1-D tensor of 0-d scale values (``amax``: bool mask of amax entries on the
    values' device, or None).

    One reduction in the common case; per-name messages only when something is wrong.
    """
    if not values.dtype.is_floating_point or values.numel() == 0:
        return []
    v = values.float()
    ok = torch.isfinite(v) & ((v > 0) | ((v == 0) & amax) if amax is not None else (v > 0))
    if bool(ok.all()):
        return []
    bad = torch.nonzero(~ok).flatten().tolist()
    return [value_problem(names[i], values[i]) for i in bad]


def amax_mask(names: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor | None:
    flags = [is_amax(n) for n in names]
    return torch.tensor(flags, device=device) if any(flags) else None


def find_runs(metas: Sequence[TensorMeta]) -> list[tuple[int, int]]:
    """Index ranges ``[i, j)`` of ``metas`` that are runs of >= MIN_RUN 0-d tensors of one dtype
    at a constant stride (a multiple of the dtype's size)."""
    out: list[tuple[int, int]] = []
    i, n = 0, len(metas)
    while i < n:
        m = metas[i]
        j = i + 1
        if m.shape == () and i + 1 < n:
            step = metas[i + 1].offset - m.offset
            size = itemsize(m.dtype)
            if step > 0 and step % size == 0:
                while j < n and metas[j].shape == () and metas[j].dtype == m.dtype and metas[j].offset - metas[j - 1].offset == step:
                    j += 1
        if j - i >= MIN_RUN:
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


def run_view(bucket: torch.Tensor, metas: Sequence[TensorMeta]) -> torch.Tensor:
    """1-D strided view of a run's values in ``bucket`` (see :func:`find_runs`)."""
    first, size = metas[0], itemsize(metas[0].dtype)
    step = (metas[1].offset - first.offset) if len(metas) > 1 else size
    span = step * (len(metas) - 1) + size
    return bucket[first.offset : first.offset + span].view(first.dtype)[:: step // size]


def segments(metas: Sequence[TensorMeta]) -> list[tuple[int, int, bool]]:
    """``metas`` cut into ``(i, j, is_run)`` pieces: runs, and the single tensors between them."""
    out: list[tuple[int, int, bool]] = []
    k = 0
    for i, j in find_runs(metas):
        out.extend((x, x + 1, False) for x in range(k, i))
        out.append((i, j, True))
        k = j
    out.extend((x, x + 1, False) for x in range(k, len(metas)))
    return out
