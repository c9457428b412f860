"""KV-cache scales without a quantized cache, and ModelOpt amax names.

* An unquantized KV cache has 0-d ``attn._k_scale`` / ``_v_scale`` buffers and no ``k_scale``
  parameter, so vLLM's remap drops a pushed ``self_attn.k_scale`` with only a warning. Here it
  resolves to that buffer; the value is kept and re-written (buffer, ``_k_scale_float``,
  ``_k_scale_cpu``) after every post-load step, because vLLM resets those to 1.0 when the
  cache is not quantized.
* ModelOpt amax (``*_quantizer._amax``: simulated quantization, as in quantization-aware RL)
  lands **unchanged** in the ``_amax`` buffer of the quantizer ModelOpt installed in the vLLM
  model, found through the model's HF-to-vLLM mapper plus one ModelOpt step (vLLM's attention
  keeps the K/V quantizers under its inner ``.attn.`` module). It is written after the reload's
  post-load steps (which take a layer's buffers away while it reloads). An amax whose buffer
  this engine does not have is refused: it is never turned into a scale behind the user's
  back. Where a native FP8 scale is wanted, ``refit.scales.amax_to_scale`` converts
  explicitly, naming the cache dtype.
"""

from __future__ import annotations

import re

import torch

from refit.adapters.vllm_private import maybe_remap_kv_scale_name
from refit.resolve import Placement, Resolution

KV_SCALE_SUFFIXES = (".k_scale", ".v_scale", ".q_scale", ".kv_scale", ".k_cache.scale", ".v_cache.scale")
AMAX_SUFFIX = "_quantizer._amax"
# ModelOpt's vLLM support puts the attention's K/V (and softmax) quantizers on the inner
# ``attn`` module: HF ``self_attn.k_bmm_quantizer`` is vLLM ``self_attn.attn.k_bmm_quantizer``.
_ATTN_QUANTIZER = re.compile(r"^(.*)\.((?:[qkv]|softmax)_bmm_quantizer\._amax)$")


def is_amax_name(name: str) -> bool:
    """A ModelOpt quantizer amax (``*_quantizer._amax``)."""
    return name.endswith(AMAX_SUFFIX)


class AmaxBuffers:
    """ModelOpt ``_amax`` buffers of a vLLM model: resolved by qualified name, written unchanged
    after the reload (see the module doc).

    A fused vLLM layer has one quantizer where HF has one per shard (``qkv_proj`` for
    ``q_proj`` / ``k_proj`` / ``v_proj``, by the model's mapper or its own
    ``packed_modules_mapping``): each shard's amax resolves to the fused buffer, which receives
    the largest pushed (for an input quantizer the shards see the same input, so they are
    equal).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.pending: dict[str, list[torch.Tensor]] = {}  # buffer -> pushed values (one per shard)
        self._buffers: dict[str, torch.Tensor] | None = None
        packed = getattr(model, "packed_modules_mapping", None) or {}
        self._fused = {shard: fused for fused, shards in packed.items() for shard in shards}

    def candidates(self, mapped: str) -> list[str]:
        """Where the vLLM model may hold ``mapped`` (an HF amax name after the model's mapper)."""
        out = [mapped]
        m = _ATTN_QUANTIZER.match(mapped)
        if m is not None and not m.group(1).endswith(".attn"):
            out.append(f"{m.group(1)}.attn.{m.group(2)}")
        parent, shard, tail = _split_quantizer(mapped)
        if shard in self._fused:
            out.append(f"{parent}{self._fused[shard]}.{tail}")
        return out

    def find(self, mapped: str) -> tuple[str, torch.Tensor] | None:
        """The buffer an amax lands in, or None (the buffer list is re-read once on a miss, so
        quantizers installed after the first push are found)."""
        for fresh in (False, True):
            if fresh or self._buffers is None:
                self._buffers = {n: b for n, b in self.model.named_buffers() if n.endswith(AMAX_SUFFIX)}
            for key in self.candidates(mapped):
                if key in self._buffers:
                    return key, self._buffers[key]
        return None

    def resolve(self, name: str, mapped: str, shape: tuple[int, ...], dtype: torch.dtype) -> Resolution | None:
        """The buffer an amax name lands in (None: no such buffer here)."""
        found = self.find(mapped)
        if found is None:
            return None
        buffer, buf = found
        # the shards of one fused buffer (stacked by the model's mapper, or by its packed
        # modules) are not duplicates of each other: one key per shard
        shard, mapped_module, buffer_module = (_split_quantizer(n)[1] for n in (name, mapped, buffer))
        stacked = shard != mapped_module or self._fused.get(shard) == buffer_module
        key = f"{buffer}['{shard}']" if stacked else buffer
        same = tuple(shape) == tuple(buf.shape) or (buf.numel() == 1 and tuple(shape) in ((), (1,)))
        if not same:
            return Resolution(Placement.LOCAL, key=key, problem=f"{name}: shape {list(shape)} does not match {buffer} {list(buf.shape)}")
        if dtype != buf.dtype:
            problem = f"{name}: dtype {dtype} does not match {buffer} {buf.dtype}; convert it on the sender"
            return Resolution(Placement.LOCAL, key=key, problem=problem)

        def keep(t: torch.Tensor) -> None:
            self.pending.setdefault(buffer, []).append(t.detach().reshape(buf.shape).clone())

        return Resolution(Placement.LOCAL, load=keep, key=key)

    def write(self) -> None:
        """Write the pushed amax into their buffers (after the reload: see the module doc)."""
        for key, values in self.pending.items():
            mod, _, attr = key.rpartition(".")
            value = values[0] if len(values) == 1 else torch.stack(values).amax(dim=0)
            getattr(self.model.get_submodule(mod), attr).copy_(value)
        self.pending.clear()

    def missing(self, name: str, mapped: str) -> str:
        """The refusal of an amax with no buffer here."""
        return (
            f"{name}: this engine has no ModelOpt quantizer buffer for it (looked for {' or '.join(self.candidates(mapped))}); "
            "an amax lands unchanged in the quantizer ModelOpt installed in the vLLM model and is never converted. "
            "Quantize the engine's model with ModelOpt, or push a native scale instead: "
            "refit.scales.amax_to_scale(amax, cache_dtype) under the scale's name (e.g. self_attn.k_scale)"
        )


def _split_quantizer(name: str) -> tuple[str, str, str]:
    """``a.b.q_proj.input_quantizer._amax`` -> (``a.b.``, ``q_proj``, ``input_quantizer._amax``)."""
    head, _, amax = name.rpartition(".")
    head, _, quantizer = head.rpartition(".")
    parent, _, module = head.rpartition(".")
    return (f"{parent}." if parent else ""), module, f"{quantizer}.{amax}"


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
