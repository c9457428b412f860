"""Synthetic states shaped like decoder models (named, or read from an HF ``config.json``),
for benchmarks, demos and tests.

Names are HF-style (``model.layers.0.self_attn.q_proj.weight``; MoE experts as Qwen3-MoE's
``model.layers.0.mlp.experts.3.gate_proj.weight``); scales are one 0-d float32 ``weight_scale``
per linear (the router excepted) plus ``k_scale`` / ``v_scale`` per attention block, the
quantization state an FP8 rollout engine needs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from refit.errors import RefitError


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The tensor shapes of a decoder checkpoint.

    ``experts`` > 0 makes every layer not in ``dense_layers`` a mixture of experts (a router
    ``mlp.gate`` and ``experts`` gate/up/down projections of ``moe_intermediate``); ``qk_norm``
    adds Qwen3's per-head ``q_norm`` / ``k_norm``; ``attn_bias`` adds q/k/v biases (Qwen2).
    """

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    experts: int = 0
    moe_intermediate: int = 0
    dense_layers: tuple[int, ...] = ()
    qk_norm: bool = False
    attn_bias: bool = False

    def __post_init__(self) -> None:
        for f in ("layers", "hidden", "heads", "kv_heads", "head_dim", "vocab"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise RefitError(f"ModelShape.{f} must be a positive int, got {getattr(self, f)!r}")
        if self.experts < 0 or (self.experts and self.moe_intermediate <= 0):
            raise RefitError(f"ModelShape: experts={self.experts} needs moe_intermediate > 0, got {self.moe_intermediate}")
        if self.intermediate <= 0 and any(not self.is_moe(i) for i in range(self.layers)):
            raise RefitError(f"ModelShape.intermediate must be > 0 for dense layers, got {self.intermediate}")
        if self.heads % self.kv_heads:
            raise RefitError(f"ModelShape: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))

    def is_moe(self, layer: int) -> bool:
        """Whether ``layer`` holds experts (else a dense MLP)."""
        return self.experts > 0 and layer not in self.dense_layers

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (JSON, an RPC); ``ModelShape(**d)`` rebuilds it."""
        return asdict(self)

    def weights(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every weight, in checkpoint order."""
        h, q, kv, d = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.head_dim
        yield "model.embed_tokens.weight", (self.vocab, h)
        for i in range(self.layers):
            p = f"model.layers.{i}"
            yield f"{p}.input_layernorm.weight", (h,)
            for name, shape in (("q_proj", (q, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, q))):
                yield f"{p}.self_attn.{name}.weight", shape
                if self.attn_bias and name != "o_proj":
                    yield f"{p}.self_attn.{name}.bias", shape[:1]
            if self.qk_norm:
                yield f"{p}.self_attn.q_norm.weight", (d,)
                yield f"{p}.self_attn.k_norm.weight", (d,)
            yield f"{p}.post_attention_layernorm.weight", (h,)
            if self.is_moe(i):
                yield f"{p}.mlp.gate.weight", (self.experts, h)
                m = self.moe_intermediate
                for e in range(self.experts):
                    for name, shape in (("gate_proj", (m, h)), ("up_proj", (m, h)), ("down_proj", (h, m))):
                        yield f"{p}.mlp.experts.{e}.{name}.weight", shape
                continue
            for name, shape in (("gate_proj", (self.intermediate, h)), ("up_proj", (self.intermediate, h)), ("down_proj", (h, self.intermediate))):
                yield f"{p}.mlp.{name}.weight", shape
        yield "model.norm.weight", (h,)
        if not self.tied:
            yield "lm_head.weight", (self.vocab, h)

    def nbytes(self, element_size: int = 2) -> int:
        """Bytes of the weights at ``element_size`` bytes per element (bf16: 2)."""
        total = 0
        for _, s in self.weights():
            n = 1
            for x in s:
                n *= x
            total += n
        return total * element_size

    def scales(self) -> Iterator[str]:
        """Names of the 0-d scales: one per linear (not the router), plus k/v scales per attention block."""
        for name, shape in self.weights():
            if len(shape) == 2 and "embed_tokens" not in name and not name.startswith("lm_head") and not name.endswith("mlp.gate.weight"):
                yield name.removesuffix(".weight") + ".weight_scale"
        for i in range(self.layers):
            yield f"model.layers.{i}.self_attn.k_scale"
            yield f"model.layers.{i}.self_attn.v_scale"


SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape(layers=2, hidden=128, intermediate=256, heads=4, kv_heads=2, head_dim=32, vocab=512),
    "tiny-moe": ModelShape(
        layers=2, hidden=128, intermediate=256, heads=4, kv_heads=2, head_dim=32, vocab=512, experts=4, moe_intermediate=64, qk_norm=True
    ),
    "llama-1b": ModelShape(layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64, vocab=128256, tied=True),
    "llama-8b": ModelShape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256),
    "qwen3-8b": ModelShape(layers=36, hidden=4096, intermediate=12288, heads=32, kv_heads=8, head_dim=128, vocab=151936, qk_norm=True),
    "qwen3-30b-a3b": ModelShape(
        layers=48, hidden=2048, intermediate=6144, heads=32, kv_heads=4, head_dim=128, vocab=151936, experts=128, moe_intermediate=768, qk_norm=True
    ),
}


def get_shape(name: str) -> ModelShape:
    """The named shape ``name`` (one of ``SHAPES``), or the shape of an HF ``config.json`` when
    ``name`` is a path to one (or to the folder holding it).

    Raises:
        RefitError: an unknown name, or a config that cannot be read (see :func:`shape_from_config`).
    """
    if name in SHAPES:
        return SHAPES[name]
    if name.endswith(".json") or "/" in name or Path(name).is_dir():
        return shape_from_config(name)
    raise RefitError(f"unknown shape {name!r}; choose one of {sorted(SHAPES)} or give the path of an HF config.json")


def _int(cfg: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise RefitError(f"{where}: {key!r} is missing; an HF decoder config needs it (is this a model's config.json?)")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RefitError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value


def shape_from_config(path: str | Path) -> ModelShape:
    """The :class:`ModelShape` of an HF decoder ``config.json`` (Llama, Mistral, Qwen2/3, Qwen3-MoE,
    Mixtral-style experts; a multimodal config's ``text_config``).

    Raises:
        RefitError: the file is missing or not JSON, a needed key is missing or not a positive
            integer, or the architecture is one whose tensors this module does not model (MLA).
    """
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    where = str(p)
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise RefitError(f"--shape {where}: no such file; give a named shape ({sorted(SHAPES)}) or the path of an HF config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RefitError(f"--shape {where}: not a readable JSON file ({exc})") from None
    if not isinstance(cfg, dict):
        raise RefitError(f"{where}: expected a JSON object (an HF config.json), got {type(cfg).__name__}")
    if isinstance(cfg.get("text_config"), dict):
        text = cfg["text_config"]
        cfg = {**text, "architectures": cfg.get("architectures"), "model_type": text.get("model_type", cfg.get("model_type"))}
    if "kv_lora_rank" in cfg or "q_lora_rank" in cfg:
        raise RefitError(f"{where}: multi-head latent attention (DeepSeek-style) is not modelled; use a named shape or a Llama/Qwen/Mixtral config")
    model_type = str(cfg.get("model_type", ""))
    hidden, heads = _int(cfg, "hidden_size", where), _int(cfg, "num_attention_heads", where)
    if cfg.get("head_dim") is None and hidden % heads:
        raise RefitError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}; set head_dim")
    layers = _int(cfg, "num_hidden_layers", where)
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 0:
        raise RefitError(f"{where}: 'num_experts' must be a non-negative integer, got {experts!r}")
    dense: list[int] = []
    if experts:
        step = _int(cfg, "decoder_sparse_step", where, default=1)
        only = cfg.get("mlp_only_layers") or []
        if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
            raise RefitError(f"{where}: 'mlp_only_layers' must be a list of layer indices, got {only!r}")
        dense = [i for i in range(layers) if i in only or (i + 1) % step]
    needs_dense = not experts or bool(dense)
    kwargs = {
        "intermediate": _int(cfg, "intermediate_size", where) if needs_dense or cfg.get("intermediate_size") is not None else 0,
        "moe_intermediate": 0,
    }
    if experts:  # Qwen-MoE names the experts' width; Mixtral's experts use intermediate_size
        key = "moe_intermediate_size" if cfg.get("moe_intermediate_size") is not None else "intermediate_size"
        kwargs["moe_intermediate"] = _int(cfg, key, where)
    try:
        return ModelShape(
            layers=layers,
            hidden=hidden,
            heads=heads,
            kv_heads=_int(cfg, "num_key_value_heads", where, default=heads),
            head_dim=_int(cfg, "head_dim", where, default=hidden // heads),
            vocab=_int(cfg, "vocab_size", where),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            experts=experts,
            dense_layers=tuple(dense),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            attn_bias=bool(cfg.get("attention_bias", model_type in ("qwen2", "qwen2_moe"))),
            **kwargs,
        )
    except RefitError as exc:
        raise RefitError(f"{where}: {exc}") from None


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
