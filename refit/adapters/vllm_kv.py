"""KV-cache scales without a quantized cache, and ModelOpt amax names.

* An unquantized KV cache has 0-d ``attn._k_scale`` / ``_v_scale`` buffers and no ``k_scale``
  parameter, so vLLM's remap drops a pushed ``self_attn.k_scale`` with only a warning. Here it
  resolves to that buffer; the value is kept and re-written (buffer, ``_k_scale_float``,
  ``_k_scale_cpu``) after every post-load step, because vLLM resets those to 1.0 when the
  cache is not quantized.
* ModelOpt amax names (``k_bmm_quantizer._amax``, ``input_quantizer._amax``,
  ``weight_quantizer._amax``) are renamed to the scale vLLM loads (``k_scale``,
  ``input_scale``, ``weight_scale``) with ``scale = amax / 448`` (float8_e4m3fn max). Where a
  fused layer keeps one scale for several shards, vLLM's own post-load step merges the shard
  scales with max; nothing is merged here.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from vllm.model_executor.model_loader.weight_utils import maybe_remap_kv_scale_name

from refit.resolve import Placement, Resolution

FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
KV_SCALE_SUFFIXES = (".k_scale", ".v_scale", ".q_scale", ".kv_scale", ".k_cache.scale", ".v_cache.scale")
# ModelOpt quantizer state (as a QAT trainer holds it) -> the scale name vLLM loads.
MODELOPT_AMAX = (
    (re.compile(r"\.([kv])_bmm_quantizer\._amax$"), r".\1_scale"),
    (re.compile(r"\.input_quantizer\._amax$"), ".input_scale"),
    (re.compile(r"\.weight_quantizer\._amax$"), ".weight_scale"),
)


def amax_scale_name(name: str) -> str | None:
    """The scale name vLLM loads for a ModelOpt amax name, or None if ``name`` is not one."""
    for pattern, repl in MODELOPT_AMAX:
        if pattern.search(name):
            return pattern.sub(repl, name)
    return None


def amax_loader(inner: Callable[[torch.Tensor], None]) -> Callable[[torch.Tensor], None]:
    """A loader of an amax that loads ``amax / 448`` through the scale's loader ``inner``."""

    def load_amax(t: torch.Tensor) -> None:
        inner((t.float() / FP8_E4M3_MAX).to(t.dtype))

    return load_amax


class KvBuffers:
    """Pushed scales of an unquantized KV cache, kept and re-applied after every post-load step."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.values: dict[tuple[str, str], torch.Tensor] = {}  # (attention module, "_k_scale") -> value

    def resolve(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Resolution | None:
        """The 0-d buffer a KV-scale name lands in (None: no such buffer here)."""
        # vLLM's own remap decides which module a checkpoint name belongs to.
        candidates = {}
        for qual, mod in self.model.named_modules():
            for x in ("k", "v", "q"):
                if isinstance(mod._buffers.get(f"_{x}_scale"), torch.Tensor) and f"{x}_scale" not in mod._parameters:
                    candidates[f"{qual}.{x}_scale"] = (qual, f"_{x}_scale")
        target = maybe_remap_kv_scale_name(name.replace(".kv_scale", ".k_scale"), candidates)
        if target is None or target not in candidates:
            return None
        module, attr = candidates[target]
        key = f"{module}.{attr}"
        if tuple(shape) not in ((), (1,)):
            return Resolution(Placement.LOCAL, key=key, problem=f"{name}: KV-cache scale must be 0-d or [1], got {list(shape)}")
        if dtype != torch.float32:
            return Resolution(Placement.LOCAL, key=key, problem=f"{name}: dtype {dtype} does not match {key} torch.float32; convert it on the sender")

        def keep(t: torch.Tensor) -> None:
            self.values[(module, attr)] = t.detach().reshape(()).clone()

        return Resolution(Placement.LOCAL, load=keep, key=key)

    def reapply(self) -> None:
        """Write the kept values back (buffer, ``_float`` and ``_cpu`` copies)."""
        for (module, attr), value in self.values.items():
            mod = self.model.get_submodule(module)
            getattr(mod, attr).copy_(value)
            _set_copies(mod, attr, value)


def _set_copies(mod: torch.nn.Module, attr: str, value: torch.Tensor) -> None:
    if hasattr(mod, f"{attr}_float"):
        setattr(mod, f"{attr}_float", float(value))
    if hasattr(mod, f"{attr}_cpu"):
        setattr(mod, f"{attr}_cpu", value.detach().to("cpu", torch.float32).clone())


def sync_scale_copies(mod: torch.nn.Module) -> None:
    """Make an attention layer's float / CPU copies of its 0-d scale buffers (``_k_scale``
    -> ``_k_scale_float``, ``_k_scale_cpu``) equal the buffers again (kernels read either)."""
    for attr, buf in mod._buffers.items():
        if attr.startswith("_") and attr.endswith("_scale") and isinstance(buf, torch.Tensor) and buf.numel() == 1 and not buf.is_meta:
            _set_copies(mod, attr, buf.reshape(()))
