"""FP8 on push: quantize linear weights to ``float8_e4m3fn`` on the sender, straight into buckets.

An FP8 rollout engine serves ``float8_e4m3fn`` weights with their scales; quantizing on the
trainer halves the bytes a push moves and gives the engine exactly the values the trainer
computed (no requantization after loading). Two layouts, with vLLM's checkpoint names:

- ``"tensor"``: ``<prefix>.weight`` fp8 and a 0-d float32 ``<prefix>.weight_scale``, with
  ``weight ~= fp8 * weight_scale``; ``weight_scale = amax / 448`` (true division in float32, as
  vLLM's online quantizer computes it), floored at ``1 / (448 * 512)`` (vLLM's floor for its
  per-channel scales) so an all-zero weight gets a positive scale; values are
  ``(w / scale).clamp(-448, 448)`` rounded to nearest even.
- ``"block"``: 128x128 blocks (DeepSeek-V3 / vLLM block FP8): ``<prefix>.weight`` fp8 and a
  float32 ``<prefix>.weight_scale_inv`` of shape ``[ceil(out/128), ceil(in/128)]`` with
  ``weight ~= fp8 * weight_scale_inv`` per block; exactly vLLM's ``per_block_cast_to_fp8``:
  block amax clamped at 1e-4, ``scale = amax / 448``, values ``w * (1 / scale)``.

Both are fused through :class:`~refit.Lazy`: the weight's fill writes fp8 straight into its
bucket view (rows at a time, so the float32 temporary stays small), the scale's fill writes the
scale. The scale is computed once per push and shared by both fills, whichever runs first
(refit plans scales first, so normally the scale's). A weight with NaN or Inf is refused, with
every such name, when the first one is found: scales are planned ahead of weights, so this
happens before any weight is sent.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from refit.errors import PlanError, problem_list
from refit.pack import Lazy

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
BLOCK = 128
TENSOR_SCALE_FLOOR = 1.0 / (FP8_MAX * 512)  # vLLM's _fp8_channel_scale floor
BLOCK_AMAX_FLOOR = 1e-4  # vLLM's per_block_cast_to_fp8 clamp
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ROWS_ELEMS = 16 << 20  # rows quantized at once: the float32 temporary stays under ~64 MB (as vLLM's)


class Scheme(enum.StrEnum):
    """How :func:`quantize` scales a weight: ``TENSOR``, one float32 scale for the whole tensor; ``BLOCK``, one per
    128x128 block (vLLM's block-wise FP8).
    """
    TENSOR = "tensor"
    BLOCK = "block"


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """The default choice of weights to quantize: 2-D ``*.weight`` of q/k/v/o/gate/up/down projections.

    Example:
        >>> is_linear_weight("model.layers.0.self_attn.q_proj.weight", (64, 32))
        True
    """
    parts = name.split(".")
    return len(shape) == 2 and len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in LINEARS


def _fp8_max(device: torch.device) -> torch.Tensor:
    # a 0-d tensor divisor keeps true division (a Python float may lower to a reciprocal multiply)
    return torch.tensor(FP8_MAX, dtype=torch.float32, device=device)


def tensor_scale(w: torch.Tensor) -> torch.Tensor:
    """The per-tensor scale of ``w``: 0-d float32 ``max(amax / 448, 1 / (448 * 512))``.

    Raises:
        PlanError: ``w`` holds NaN or Inf (the message says how many).
    """
    lo, hi = w.aminmax()  # no full-size abs() temporary; NaN propagates
    amax = torch.maximum(lo.abs(), hi.abs()).float()
    if not bool(torch.isfinite(amax)):
        raise PlanError(_non_finite(w))
    return (amax / _fp8_max(amax.device)).clamp_min(TENSOR_SCALE_FLOOR)


def block_scales(w: torch.Tensor) -> torch.Tensor:
    """The 128x128 block scales of 2-D ``w``: float32 ``[ceil(out/128), ceil(in/128)]``.

    Raises:
        PlanError: ``w`` is not 2-D, or holds NaN or Inf.
    """
    if w.dim() != 2:
        raise PlanError(f"block FP8 needs a 2-D weight, got shape {list(w.shape)}")
    m, n = w.shape
    mb, nb = math.ceil(m / BLOCK), math.ceil(n / BLOCK)
    out = torch.empty((mb, nb), dtype=torch.float32, device=w.device)
    step = max(1, _ROWS_ELEMS // max(1, n * BLOCK)) * BLOCK
    for r in range(0, m, step):
        slab = _padded(w[r : r + step], nb * BLOCK)  # zero padding never raises a block's amax
        view = slab.view(-1, BLOCK, nb, BLOCK)
        out[r // BLOCK : r // BLOCK + view.shape[0]] = view.abs().float().amax(dim=(1, 3))
    if not bool(torch.isfinite(out).all()):
        raise PlanError(_non_finite(w))
    return out.clamp(min=BLOCK_AMAX_FLOOR) / FP8_MAX


def _padded(rows: torch.Tensor, width: int) -> torch.Tensor:
    """``rows`` zero-padded to a multiple of 128 rows and to ``width`` columns."""
    m, n = rows.shape
    height = math.ceil(m / BLOCK) * BLOCK
    if (m, n) == (height, width):
        return rows
    out = torch.zeros((height, width), dtype=rows.dtype, device=rows.device)
    out[:m, :n] = rows
    return out


def _non_finite(w: torch.Tensor) -> str:
    bad = int((~torch.isfinite(w)).sum())
    return f"{bad} of {w.numel()} values are NaN or Inf"


def quantize_tensor_into(out: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> None:
    """Write ``(w / scale).clamp(-448, 448)`` as float8_e4m3fn into contiguous ``out`` (any device),
    16 Mi elements at a time (so the float32 temporary stays under 64 MB)."""
    scale = scale.to(device=w.device, dtype=torch.float32)
    flat_out, flat_w = out.view(-1), w.reshape(-1)
    for i in range(0, flat_w.numel(), _ROWS_ELEMS):
        part = flat_w[i : i + _ROWS_ELEMS]
        flat_out[i : i + _ROWS_ELEMS].copy_((part.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8))


def quantize_blocks_into(out: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor) -> None:
    """Write ``w * (1 / scale_inv)`` per 128x128 block as float8_e4m3fn into ``out``, 128-row slabs at a time."""
    m, n = w.shape
    nb = scale_inv.shape[1]
    step = max(1, _ROWS_ELEMS // max(1, n * BLOCK)) * BLOCK
    for r in range(0, m, step):
        slab = _padded(w[r : r + step], nb * BLOCK)
        view = slab.view(-1, BLOCK, nb, BLOCK)
        sf = scale_inv[r // BLOCK : r // BLOCK + view.shape[0]].to(w.device)[:, None, :, None]
        q = (view * (1.0 / sf)).clamp_(-FP8_MAX, FP8_MAX).to(FP8).view(slab.shape)
        rows = min(step, m - r)
        out[r : r + rows].copy_(q[:rows, :n])


def quantize(w: torch.Tensor, scheme: Scheme | str = Scheme.TENSOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` to float8_e4m3fn (see the module doc for the two schemes).

    Args:
        w: the weight (any floating dtype, any device; 2-D for ``"block"``).
        scheme: ``"tensor"`` or ``"block"``.

    Returns:
        ``(fp8 weight, scale)``: a 0-d ``weight_scale`` or a ``[ceil(out/128), ceil(in/128)]``
        ``weight_scale_inv``, float32, on ``w``'s device.

    Raises:
        PlanError: ``w`` holds NaN or Inf, or is not 2-D for ``"block"``.

    Example:
        >>> q, s = quantize(torch.tensor([[1.0, -448.0]]))
        >>> q.float().tolist(), float(s)
        ([[1.0, -448.0]], 1.0)
    """
    scheme = Scheme(scheme)
    out = torch.empty(w.shape, dtype=FP8, device=w.device)
    if scheme is Scheme.TENSOR:
        scale = tensor_scale(w)
        quantize_tensor_into(out, w, scale)
    else:
        scale = block_scales(w)
        quantize_blocks_into(out, w, scale)
    return out, scale


class _Quantized:
    """One weight being quantized in a push: its source, and its scale once computed."""

    def __init__(self, name: str, source: torch.Tensor | Lazy, scheme: Scheme, group: list[_Quantized]) -> None:
        self.name, self.source, self.scheme, self.group = name, source, scheme, group
        self.scale: torch.Tensor | None = None

    def full(self) -> torch.Tensor:
        """The full-precision weight on the trainer's device (gathered if sharded)."""
        src = self.source
        if isinstance(src, torch.Tensor):
            return src.detach()
        full = getattr(src, "full", None)  # refit.sources.Gathered: the gathered tensor itself
        return full() if callable(full) else src.materialize()

    def compute_scale(self) -> torch.Tensor:
        """The scale, computed on first use; a non-finite weight refuses with every such name."""
        if self.scale is None:
            try:
                self.compute_scale_alone()
            except PlanError as exc:
                raise PlanError(self._refusal(f"{self.name}: {exc}")) from None
        assert self.scale is not None  # invariant: set by compute_scale_alone
        return self.scale

    def _refusal(self, first: str) -> str:
        """The refusal of every non-finite weight of the push (the others are checked now)."""
        problems = [first]
        for other in self.group:
            if other is not self and other.scale is None:
                try:
                    other.compute_scale_alone()
                except PlanError as exc:
                    problems.append(f"{other.name}: {exc}")
        fix = "fix the weights (or leave them out of FP8 quantization with select=) and push again"
        return f"FP8 quantization refused weights with NaN or Inf; {fix}:\n" + problem_list(problems)

    def compute_scale_alone(self) -> None:
        w = self.full()  # dropped on return: one full tensor at a time
        self.scale = tensor_scale(w) if self.scheme is Scheme.TENSOR else block_scales(w)

    def fill_scale(self, out: torch.Tensor) -> None:
        out.copy_(self.compute_scale())

    def fill_weight(self, out: torch.Tensor) -> None:
        scale = self.compute_scale()
        w = self.full()
        if self.scheme is Scheme.TENSOR:
            quantize_tensor_into(out, w, scale)
        else:
            quantize_blocks_into(out, w, scale)


def fp8_stream(
    pairs: Iterable[tuple[str, Any]],
    *,
    scheme: Scheme | str = Scheme.TENSOR,
    select: Callable[[str, tuple[int, ...]], bool] = is_linear_weight,
) -> Iterator[tuple[str, Any]]:
    """``pairs`` with the selected weights replaced by FP8 producers and their scales added.

    Call it once per push (the scales are computed once per call). Each selected ``name``
    (``select(name, shape)``, default :func:`is_linear_weight`) becomes a :class:`~refit.Lazy`
    float8_e4m3fn weight plus a Lazy float32 scale under ``name`` with ``.weight`` replaced by
    ``.weight_scale`` (``"tensor"``) or ``.weight_scale_inv`` (``"block"``); everything else
    passes through unchanged.

    Args:
        pairs: ``(name, tensor or Lazy)`` pairs, e.g. a dict's ``items()`` or a
            :class:`refit.sources.Source`.
        scheme: ``"tensor"`` or ``"block"``.
        select: ``select(name, shape) -> bool``: which weights to quantize.

    Returns:
        An iterator of ``(name, tensor or Lazy)`` pairs for :meth:`refit.Refitter.push`.

    Raises:
        PlanError: a selected weight is not floating point, or not 2-D for ``"block"``, or its
            name does not end in ``weight`` (listing every one); at push time, weights with
            NaN or Inf (listing every one).

    Example:
        >>> state = {"layers.0.q_proj.weight": torch.randn(4, 8), "norm.weight": torch.ones(8)}
        >>> [(n, v.dtype) for n, v in fp8_stream(state.items())]   # doctest: +NORMALIZE_WHITESPACE
        [('layers.0.q_proj.weight', torch.float8_e4m3fn), ('layers.0.q_proj.weight_scale', torch.float32),
         ('norm.weight', torch.float32)]
    """
    scheme = Scheme(scheme)
    items = list(pairs)
    group: list[_Quantized] = []
    out: list[tuple[str, Any]] = []
    problems: list[str] = []
    for name, value in items:
        shape = tuple(value.shape)
        if not select(name, shape):
            out.append((name, value))
            continue
        if not value.dtype.is_floating_point or not name.endswith("weight"):
            problems.append(f"{name}: only floating-point tensors named '*weight' can be quantized to FP8 (got {value.dtype}); fix select=")
            continue
        if scheme is Scheme.BLOCK and len(shape) != 2:
            problems.append(f"{name}: block FP8 needs a 2-D weight, got shape {list(shape)}; fix select=")
            continue
        q = _Quantized(name, value, scheme, group)
        group.append(q)
        scale_shape: tuple[int, ...] = ()
        if scheme is Scheme.TENSOR:
            scale_name = name + "_scale"
        else:
            scale_name, scale_shape = name + "_scale_inv", (math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK))
        out.append((name, Lazy(shape, FP8, q.fill_weight)))
        out.append((scale_name, Lazy(scale_shape, torch.float32, q.fill_scale)))
    if problems:
        raise PlanError("cannot quantize to FP8:\n" + problem_list(problems))
    return iter(out)
