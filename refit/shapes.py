"""Synthetic states shaped like named decoder models, for benchmarks, demos and tests.

Names are HF-style (``model.layers.0.self_attn.q_proj.weight``); scales are one 0-d float32
``weight_scale`` per linear plus ``k_scale`` / ``v_scale`` per attention block, the quantization
state an FP8 rollout engine needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from refit.errors import RefitError


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False

    def weights(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every weight, in checkpoint order."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        yield "model.embed_tokens.weight", (self.vocab, h)
        for i in range(self.layers):
            p = f"model.layers.{i}"
            yield f"{p}.input_layernorm.weight", (h,)
            for name, shape in (("q_proj", (q, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, q))):
                yield f"{p}.self_attn.{name}.weight", shape
            yield f"{p}.post_attention_layernorm.weight", (h,)
            for name, shape in (("gate_proj", (self.intermediate, h)), ("up_proj", (self.intermediate, h)), ("down_proj", (h, self.intermediate))):
                yield f"{p}.mlp.{name}.weight", shape
        yield "model.norm.weight", (h,)
        if not self.tied:
            yield "lm_head.weight", (self.vocab, h)

    def scales(self) -> Iterator[str]:
        """Names of the 0-d scales: one per linear, plus k/v scales per attention block."""
        for name, shape in self.weights():
            if len(shape) == 2 and "embed_tokens" not in name and not name.startswith("lm_head"):
                yield name.removesuffix(".weight") + ".weight_scale"
        for i in range(self.layers):
            yield f"model.layers.{i}.self_attn.k_scale"
            yield f"model.layers.{i}.self_attn.v_scale"


SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape(layers=2, hidden=128, intermediate=256, heads=4, kv_heads=2, head_dim=32, vocab=512),
    "llama-1b": ModelShape(layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64, vocab=128256, tied=True),
    "llama-8b": ModelShape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256),
}


def get_shape(name: str) -> ModelShape:
    try:
        return SHAPES[name]
    except KeyError:
        raise RefitError(f"unknown shape {name!r}; choose one of {sorted(SHAPES)}") from None


def make_state(
    shape: ModelShape, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", seed: int | None = 0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Weights (random with ``seed``, uninitialized with ``seed=None``) and 0-d float32 scales."""
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    state = {}
    for name, s in shape.weights():
        t = torch.empty(s, dtype=dtype, device=device)
        if gen is not None:
            t.normal_(0, 0.02, generator=gen) if dtype.is_floating_point else t.zero_()
        state[name] = t
    scales = {n: torch.tensor(0.5 + (i % 7) / 8, dtype=torch.float32, device=device) for i, n in enumerate(shape.scales())}
    return state, scales


class SyntheticModel(torch.nn.Module):
    """A torch module whose parameter and buffer names are exactly ``shape``'s HF names.

    Stands in for an engine's model where no engine is at hand (demo, tests): weights are
    parameters, scales are 0-d float32 buffers initialised to 1.0.
    """

    def __init__(self, shape: ModelShape, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> None:
        super().__init__()
        for name, s in shape.weights():
            self._place(name, torch.nn.Parameter(torch.zeros(s, dtype=dtype, device=device), requires_grad=False))
        for name in shape.scales():
            self._place(name, torch.ones((), dtype=torch.float32, device=device), buffer=True)

    def _place(self, dotted: str, value: torch.Tensor, buffer: bool = False) -> None:
        *path, leaf = dotted.split(".")
        mod: torch.nn.Module = self
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        if buffer:
            mod.register_buffer(leaf, value)
        else:
            mod.register_parameter(leaf, value)  # type: ignore[arg-type]
