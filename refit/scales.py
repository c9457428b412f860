"""Many small scales at the cost of a few tensor operations.

Quantized models carry hundreds to tens of thousands of 0-d scales (a ``weight_scale`` per
linear, ``k_scale``/``v_scale`` per attention block, ``_amax`` per quantizer). Handling each as
its own tensor costs a few microseconds of Python and dispatch apiece, seconds per push at
that count. Consecutive 0-d tensors of one dtype are therefore laid out at a constant stride
(the planner's alignment), so a *run* of them is one strided view of the bucket: validated with
one reduction, packed from one ``torch.stack``, unpacked by one ``unbind``.

Validation rule, one for every scale and amax whichever argument carried it (sender and
receiver alike, see :func:`is_checked`): every element is finite; an amax (:func:`is_amax`) is
>= 0, any other scale > 0 (a zero or negative scale silently zeroes or flips a layer). What is a
scale is decided by name (:func:`is_scale`, :func:`is_amax`), so a scale inside ``state`` (a QAT
or ModelOpt ``state_dict()``) is checked like one passed in ``scales``; whatever is passed in
``scales`` is checked too, as a scale unless its name is an amax's.

Turning an amax into a scale is never implicit: :func:`amax_to_scale` does it when asked.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from refit.errors import PlanError
from refit.meta import Role, TensorMeta, itemsize

# Quantization scales by name (the last part of the name decides): KV-cache and attention
# scales (``k_scale``, ``v_scale``, ``q_scale``, ``kv_scale``, ``prob_scale``, vLLM's
# ``attn._k_scale`` buffers, older ``k_cache.scale``), per-tensor / per-channel / per-block
# weight, input and output scales (``weight_scale``, ``input_scale``, ``output_scale``, NVFP4's
# ``weight_scale_2`` and ``*_global_scale``, block FP8's ``weight_scale_inv``, fused-MoE
# ``w13_weight_scale``) and ModelOpt's ``_pre_quant_scale``. Deliberately not every name
# ending in ``scale``: ``layer_scale`` (LayerScale gammas) or ``logit_scale`` may be negative.
_SCALE_NAME = re.compile(
    r"(?:^|[._])(?:[kvq]|kv|prob|weight|input|output|weight_global|input_global|pre_quant)_scale(?:_2|_inv)?$"
    r"|(?:^|\.)[kv]_cache\.scale$"
)


def is_amax(name: str) -> bool:
    """True for an amax (a calibrated absolute maximum, >= 0): a name ending in ``amax``
    (ModelOpt's ``*_quantizer._amax``, ``input_amax``)."""
    return name.endswith("amax")


def is_scale(name: str) -> bool:
    """True for a quantization scale by name (> 0; see ``_SCALE_NAME`` for the names).

    Example:
        >>> is_scale("model.layers.0.self_attn.k_scale"), is_scale("model.layers.0.layer_scale")
        (True, False)
    """
    return _SCALE_NAME.search(name) is not None


def is_quant_state(name: str) -> bool:
    """True for a scale or an amax by name: its values are checked wherever it travels."""
    return is_amax(name) or _SCALE_NAME.search(name) is not None


def is_checked(meta: TensorMeta) -> bool:
    """Whether a receiver checks this entry's values: a scale or amax by name, or anything the
    sender marked as a scale (passed in ``scales``). The name decides, so a sender that marked
    nothing (or an older one) cannot slip a bad scale past a receiver."""
    return meta.role is Role.SCALE or is_quant_state(meta.name)


# The float8 KV-cache / activation formats a scale maps an amax into, by their largest value.
_FP8_MAX = {dtype: float(torch.finfo(dtype).max) for dtype in (torch.float8_e4m3fn, torch.float8_e5m2)}


def amax_to_scale(amax: torch.Tensor, cache_dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """The scale that maps ``amax`` onto the largest value of ``cache_dtype``: ``amax / max``.

    refit never converts an amax into a scale by itself (a pushed ``_amax`` lands as an amax);
    call this where a native FP8 scale is wanted (e.g. ``k_scale`` from a ModelOpt
    ``k_bmm_quantizer._amax``) and push the result under the scale's name.

    Args:
        amax: a floating-point tensor of absolute maxima (any shape).
        cache_dtype: ``torch.float8_e4m3fn`` (max 448, the default) or ``torch.float8_e5m2``
            (max 57344).

    Returns:
        A new tensor of ``amax``'s shape and dtype, computed in float32 (one rounding).

    Raises:
        PlanError: ``amax`` is not a floating-point tensor, or ``cache_dtype`` is another dtype
            (e.g. the ``fnuz`` formats, whose scales engines adjust in their own ways).

    Example:
        >>> amax_to_scale(torch.tensor(224.0))
        tensor(0.5000)
        >>> amax_to_scale(torch.tensor(57344.0), torch.float8_e5m2)
        tensor(1.)
    """
    top = _FP8_MAX.get(cache_dtype)
    if top is None:
        raise PlanError(f"amax_to_scale: cache_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {cache_dtype}")
    if not isinstance(amax, torch.Tensor) or not amax.dtype.is_floating_point:
        got = amax.dtype if isinstance(amax, torch.Tensor) else type(amax).__name__
        raise PlanError(f"amax_to_scale: amax must be a floating-point tensor, got {got}")
    return (amax.detach().float() / top).to(amax.dtype)


def value_problem(name: str, value: torch.Tensor) -> str:
    """'' if one scale tensor's values are usable, else the problem (see module doc)."""
    if value.numel() == 0 or not value.dtype.is_floating_point:
        return ""
    v = value.detach().float()
    kind, rule = ("amax", "finite and >= 0") if is_amax(name) else ("scale", "finite and > 0")
    fix = f"every {kind} must be {rule}: fix its calibration (or leave it out of the push) and push again"
    bad = ~torch.isfinite(v)
    what = "non-finite values"
    if not bool(bad.any()):
        bad, what = ((v < 0), "negative values") if kind == "amax" else ((v <= 0), "values <= 0")
        if not bool(bad.any()):
            return ""
    where = f" ({int(bad.sum())} of {v.numel()}, first at index {bad.flatten().nonzero()[0].item()})" if v.dim() else ""
    return f"{name}: {kind} has {what}{where}; {fix}"


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
    """A bool tensor on ``device``, True where ``names[i]`` is an amax (may be 0), or None if none is."""
    flags = [is_amax(n) for n in names]
    return torch.tensor(flags, device=device) if any(flags) else None


def run_view(bucket: torch.Tensor, metas: Sequence[TensorMeta]) -> torch.Tensor:
    """1-D strided view of a run's values in ``bucket`` (see :func:`refit.meta.find_runs`)."""
    first, size = metas[0], itemsize(metas[0].dtype)
    step = (metas[1].offset - first.offset) if len(metas) > 1 else size
    span = step * (len(metas) - 1) + size
    return bucket[first.offset : first.offset + span].view(first.dtype)[:: step // size]
