"""FP8 weights quantized on push vs the same FP8 checkpoint loaded from disk, in real vLLM models
(a helper script of test_fp8_weights.py; run as ``python -m tests.vllm.fp8_weights_probe SCHEME OUT.json``).

For one scheme (``tensor``: per-tensor ``weight_scale``; ``block``: 128x128 ``weight_scale_inv``)
it builds a tiny Qwen2 whose ``quantization_config`` is vLLM's ``fp8`` (serialized FP8 weights,
dynamic activation scales), twice, as an engine's worker builds it:

- **disk**: refit's FP8 helper (:func:`refit.fp8.fp8_stream`, materialized) writes the
  quantized checkpoint to safetensors, and vLLM's own model loader loads it;
- **push**: the model starts from dummy weights and ``Refitter("local")`` pushes the same
  bfloat16 weights through ``fp8_stream`` into vLLM's resolver (the path a worker runs:
  mapper, fused shards, weight loaders, layer-wise reload).

It records a digest of every parameter and buffer of both models. What this CPU cannot run:
FP8 GEMMs. So neither model runs the FP8 linears' post-load step (on CPU it has no kernel to
prepare for), the disk model is not post-processed at all, and the push's layer-wise reload
is told to skip the linears' post-load steps (:data:`SKIP`); everything vLLM stores for the
FP8 linears (fp8 weights, scales) is compared as its weight loaders wrote it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from refit.demos.tiny_vllm import QWEN2, hf_state, write_config
from tests.vllm.arch_probe import build_vllm

CONFIG = {**QWEN2, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 4}


def quant_config(scheme: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    if scheme == "block":
        cfg["weight_block_size"] = [128, 128]
    return cfg


def digest(model: torch.nn.Module) -> dict[str, str]:
    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        data = t.detach().contiguous().cpu()
        out[name] = f"{data.dtype} {list(data.shape)} " + hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return out


def main() -> None:
    from safetensors.torch import save_file
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.quantization.fp8 import Fp8LinearMethod
    from vllm.model_executor.model_loader import get_model_loader

    from refit import Lazy, Refitter
    from refit.adapters.vllm_resolve import VllmResolver
    from refit.fp8 import fp8_stream

    scheme, out = sys.argv[1], sys.argv[2]
    model_dir = write_config(Path(tempfile.mkdtemp()), {**CONFIG, "quantization_config": quant_config(scheme)})
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in hf_state(model_dir, 3)[1].items()}
    checkpoint = {n: v.materialize() if isinstance(v, Lazy) else v for n, v in fp8_stream(weights.items(), scheme=scheme)}
    save_file(checkpoint, str(Path(model_dir) / "model.safetensors"))

    torch.set_default_dtype(torch.bfloat16)  # what vLLM's model loader sets while it builds a bfloat16 model
    disk, cfg = build_vllm(model_dir, 0, dtype="bfloat16", process=False, load_format="safetensors")
    with set_current_vllm_config(cfg):
        get_model_loader(cfg.load_config).load_weights(disk, cfg.model_config)

    pushed, cfg2 = build_vllm(model_dir, 0, dtype="bfloat16", process=False)
    # This CPU has no FP8 GEMM to prepare the linears for: keep the layer-wise reload's other
    # post-load steps (attention, norms) and skip only the FP8 linears'.
    Fp8LinearMethod.process_weights_after_loading = lambda self, layer: None  # type: ignore[method-assign]
    before = digest(pushed)
    with Refitter("local", target=VllmResolver(pushed, cfg2)) as refitter:
        report = refitter.push(fp8_stream(weights.items(), scheme=scheme))
    result = {
        "scheme": scheme,
        "checkpoint": {n: [str(v.dtype), list(v.shape)] for n, v in checkpoint.items()},
        "disk": digest(disk),
        "dummy": before,
        "pushed": digest(pushed),
        "tensors_pushed": report.tensors,
    }
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
