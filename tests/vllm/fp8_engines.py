"""Tiny FP8-KV-cache vLLM engines on the CPU (vLLM 0.32's CPU backend runs an FP8 KV cache on
CPUs with AVX-512), in the two forms a refit user meets:

* ``fp8_kv``: an unquantized checkpoint served with ``kv_cache_dtype="fp8"``: the attention
  layers hold 0-d float32 ``_k_scale`` / ``_v_scale`` buffers and no scale parameter;
* ``fp8_config``: a checkpoint whose ``quantization_config`` is ``fp8`` with every linear layer
  ignored (the CPU backend has no FP8 GEMM), so vLLM builds ``k_scale`` / ``v_scale``
  *parameters* (model dtype) on each attention layer and loads them from the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch

from refit.demos.tiny_vllm import QWEN2, hf_state, start_engine, write_config

KINDS = ("fp8_kv", "fp8_config")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


NO_AVX512 = "vLLM's CPU backend runs an FP8 KV cache only on CPUs with AVX-512 (no avx512f in /proc/cpuinfo)"


def fp8_config(base: dict[str, Any] = QWEN2) -> dict[str, Any]:
    """``base`` with an ``fp8`` quantization config that ignores every linear layer."""
    n = base["num_hidden_layers"]
    ignored = [f"model.layers.{i}.{m}" for i in range(n) for m in LINEARS] + ["lm_head"]
    return {**base, "quantization_config": {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ignored}}


def scale_dtype(kind: str) -> torch.dtype:
    """What the engine's KV scales are: float32 buffers (``fp8_kv``), model-dtype parameters
    (``fp8_config``)."""
    return torch.float32 if kind == "fp8_kv" else torch.bfloat16


def kv_scales(kind: str, value: float, layers: int = cast(int, QWEN2["num_hidden_layers"])) -> dict[str, torch.Tensor]:
    return {f"model.layers.{i}.self_attn.{x}_scale": torch.tensor(value, dtype=scale_dtype(kind)) for i in range(layers) for x in "kv"}


def weights(model_dir: str, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random HF weights in bfloat16 (the engines' dtype)."""
    return {k: v.to(torch.bfloat16).contiguous() for k, v in hf_state(model_dir, seed)[1].items()}


def fp8_engine(tmp: Path, kind: str, **extra: Any) -> tuple[Any, str]:
    """(llm, model_dir) of a tiny ``kind`` engine with dummy weights."""
    model_dir = write_config(tmp, QWEN2 if kind == "fp8_kv" else fp8_config())
    return start_engine(model_dir, dtype="bfloat16", kv_cache_dtype="fp8", **extra), model_dir
