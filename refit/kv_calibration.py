"""KV-cache scales calibrated in the trainer: amax of the key/value projections' outputs.

An FP8 KV cache stores ``k / k_scale`` and ``v / v_scale``; a scale left at 1.0 (or a stale
one) silently clips or wastes range. Here forward hooks on the attention projections record
the largest absolute output over a calibration batch; :meth:`KVCalibrator.scales` takes the max
over every rank (when torch.distributed is initialized) and turns each amax into a scale with
:func:`refit.scales.amax_to_scale`, named as FP8 checkpoints name them
(``model.layers.0.self_attn.k_scale``), ready to push.

Caveat: ``k_proj``'s output is the key *before* rotary embedding (and any key norm). RoPE
rotates pairs of channels, which can raise a channel's magnitude by up to sqrt(2); to calibrate
the cached keys exactly, hook the module that outputs them (``keys=`` takes any module-name
suffix).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from refit.errors import PlanError, problem_list
from refit.scales import amax_to_scale


def kv_scales(amax: Mapping[str, torch.Tensor], cache_dtype: torch.dtype = torch.float8_e4m3fn) -> dict[str, torch.Tensor]:
    """Scales from calibrated amax: ``amax / max(cache_dtype)`` as 0-d float32, same names.

    Args:
        amax: scale name (``...k_scale``) -> 0-d amax.
        cache_dtype: ``torch.float8_e4m3fn`` (448) or ``torch.float8_e5m2`` (57344).

    Returns:
        name -> 0-d float32 scale.

    Raises:
        PlanError: listing every amax that is NaN, Inf, zero or negative (a zero amax means no
            calibration data reached that projection, or its output was all zero).

    Example:
        >>> kv_scales({"layers.0.self_attn.k_scale": torch.tensor(224.0)})
        {'layers.0.self_attn.k_scale': tensor(0.5000)}
    """
    problems = []
    for name, a in amax.items():
        v = float(a)
        if not v > 0 or v == float("inf"):
            if v != v or v == float("inf"):
                what = "NaN or Inf"
            else:
                what = "zero: no calibration data reached it, or it output only zeros" if v == 0 else "negative"
            problems.append(f"{name}: amax is {v} ({what})")
    if problems:
        fix = "calibrate on a batch that reaches every attention layer with finite activations, then call scales() again"
        raise PlanError(f"cannot turn amax into KV-cache scales; {fix}:\n" + problem_list(problems))
    return {name: amax_to_scale(a.detach().float().reshape(()), cache_dtype) for name, a in amax.items()}


class KVCalibrator:
    """Records the amax of attention key/value (and optionally query) projection outputs.

    Use as a context manager around the calibration forwards (hooks are removed on exit), then
    call :meth:`scales`. Every rank of a data-parallel trainer runs its share of the batch;
    :meth:`scales` takes the max over ranks.

    Args:
        model: the trainer's model.
        keys: last name segments of the modules whose output is the key (default ``k_proj``).
        values: likewise for values (default ``v_proj``).
        queries: likewise for queries (default none: only engines with FP8 attention read
            ``q_scale``).

    Raises:
        PlanError: no module matches one of the kinds asked for.

    Example:
        >>> attn = torch.nn.Module(); attn.k_proj, attn.v_proj = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        >>> with KVCalibrator(attn) as cal:
        ...     _ = attn.k_proj(torch.ones(2, 4)), attn.v_proj(torch.ones(2, 4))
        >>> sorted(cal.scales())
        ['k_scale', 'v_scale']
    """

    def __init__(
        self, model: torch.nn.Module, *, keys: Sequence[str] = ("k_proj",), values: Sequence[str] = ("v_proj",), queries: Sequence[str] = ()
    ) -> None:
        self._targets: dict[str, torch.nn.Module] = {}  # scale name -> module
        kinds = {"k_scale": tuple(keys), "v_scale": tuple(values), "q_scale": tuple(queries)}
        for module_name, module in model.named_modules():
            parent, _, leaf = module_name.rpartition(".")
            for scale, suffixes in kinds.items():
                if leaf in suffixes:
                    self._targets[f"{parent}.{scale}" if parent else scale] = module
        missing = [f"no module named {list(s)} for {k}" for k, s in kinds.items() if s and not any(n.endswith(k) for n in self._targets)]
        if missing:
            fix = "pass keys=/values=/queries= with the last name segment of the model's modules"
            raise PlanError("KVCalibrator found nothing to hook: " + "; ".join(missing) + f" ({fix})")
        self._amax: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> KVCalibrator:
        self._amax = {}
        for name, module in self._targets.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: object, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            with torch.no_grad():
                amax = out.detach().abs().amax().float()  # NaN propagates: refused in scales()
                prev = self._amax.get(name)
                self._amax[name] = amax if prev is None else torch.maximum(prev, amax.to(prev.device))

        return hook

    def amax(self, group: Any = None) -> dict[str, torch.Tensor]:
        """name -> 0-d float32 amax, the max over every rank of ``group`` (default WORLD) when
        torch.distributed is initialized (one all-reduce; every rank must call it). A module that
        never ran has amax 0 (refused by :meth:`scales`)."""
        names = sorted(self._targets)
        # where the all-reduce runs: where the activations were (NCCL needs the GPU), else the model's device
        device = next((a.device for a in self._amax.values()), None) or next(
            (p.device for m in self._targets.values() for p in m.parameters()), torch.device("cpu")
        )
        stacked = torch.stack([self._amax.get(n, torch.zeros((), device=device)).to(device) for n in names]) if names else torch.zeros(0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # NaN survives MAX on gloo and NCCL alike only if we make it: map NaN to +inf first
            stacked = torch.where(torch.isnan(stacked), torch.full_like(stacked, float("inf")), stacked)
            torch.distributed.all_reduce(stacked, op=torch.distributed.ReduceOp.MAX, group=group)
        return dict(zip(names, stacked.unbind()))

    def scales(self, cache_dtype: torch.dtype = torch.float8_e4m3fn, group: Any = None) -> dict[str, torch.Tensor]:
        """The calibrated scales (0-d float32), by name; see :func:`kv_scales` for the rule.

        Raises:
            PlanError: listing every NaN, Inf, zero or negative amax.
        """
        return kv_scales(self.amax(group), cache_dtype)
