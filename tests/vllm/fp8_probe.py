"""Build a tiny FP8 (static, serialized) Qwen2 with an FP8 KV cache without an engine, resolve
every KV-scale name vLLM renames, and push scales through layer-wise reload (a helper script
of test_fp8_kv.py; run as ``python -m tests.vllm.fp8_probe OUT.json``).

The FP8 model is only constructed: this CPU cannot run FP8 kernels (no post-load processing of
the FP8 linears, no generation). Attention post-load steps do run: they copy the pushed scales
into ``_k_scale`` / ``_k_scale_float``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from tests.vllm.arch_probe import build_vllm
from tests.vllm.conftest import write_config

NAMES = {
    # checkpoint name -> the target vLLM's remap gives it
    "model.layers.0.self_attn.k_scale": "model.layers.0.self_attn.attn.k_scale",
    "model.layers.0.self_attn.v_scale": "model.layers.0.self_attn.attn.v_scale",
    "model.layers.0.self_attn.k_proj.k_scale": "model.layers.0.self_attn.attn.k_scale",
    "model.layers.0.self_attn.qkv_proj.v_scale": "model.layers.0.self_attn.attn.v_scale",
    "model.layers.0.self_attn.attn.k_scale": "model.layers.0.self_attn.attn.k_scale",
    "model.layers.0.self_attn.k_cache.scale": "model.layers.0.self_attn.attn.k_scale",
    "model.layers.1.self_attn.kv_scale": "model.layers.1.self_attn.attn.k_scale",
    "model.layers.1.self_attn.v_bmm_quantizer._amax": None,  # an amax lands only in a ModelOpt quantizer's buffer
    "model.layers.0.self_attn.q_proj.input_scale": "model.layers.0.self_attn.qkv_proj.input_scale['q']",
    "model.layers.0.self_attn.k_proj.weight_scale": "model.layers.0.self_attn.qkv_proj.weight_scale['k']",
    "model.layers.0.self_attn.v_proj.input_quantizer._amax": None,
    "model.layers.0.self_attn.k_scalee": None,
    "model.layers.0.mlp.down_proj.k_scale": None,
}


def main() -> None:
    from refit import Refitter
    from refit.adapters.vllm_resolve import VllmResolver
    from refit.meta import Role, TensorMeta

    out = sys.argv[1]
    d = write_config(Path(tempfile.mkdtemp()), quantization_config={"quant_method": "fp8", "activation_scheme": "static"})
    model, cfg = build_vllm(d, 0, kv_cache_dtype="fp8", dtype="bfloat16", process=False)
    params = [n for n, _ in model.named_parameters() if n.endswith(("k_scale", "v_scale"))]
    # An engine runs every post-load step at start; here only the attention layers' (which
    # consume the k/v_scale parameters into `_k_scale`), the FP8 linears' need FP8 kernels.
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    with set_current_vllm_config(cfg):
        for mod in model.modules():
            if isinstance(mod, Attention):
                quant_method = mod.quant_method
                assert isinstance(quant_method, QuantizeMethodBase)  # an attribute vLLM sets, untyped on the class
                quant_method.process_weights_after_loading(mod)
                mod.process_weights_after_loading(cfg.model_config.dtype)
    params_after = [n for n, _ in model.named_parameters() if n.endswith(("k_scale", "v_scale"))]
    resolver = VllmResolver(model, cfg)
    got = {}
    for name in NAMES:
        r = resolver.resolve(TensorMeta(name, torch.float32, (), Role.SCALE, 0, 0, 0))
        got[name] = {"placement": str(r.placement), "key": r.key, "problem": r.problem}
    attn = model.get_submodule("model.layers.0.self_attn.attn")
    with Refitter("local", target=resolver) as refitter:
        refitter.push({}, {"model.layers.0.self_attn.k_scale": torch.tensor(0.5), "model.layers.0.self_attn.v_scale": torch.tensor(0.25)})
    loaded = {
        "_k_scale": float(attn._k_scale),
        "_v_scale": float(attn._v_scale),
        "_k_scale_float": attn._k_scale_float,
        "_v_scale_float": attn._v_scale_float,
        "kv_cache_dtype": attn.kv_cache_dtype,
    }
    Path(out).write_text(json.dumps({"params": params, "params_after_post_load": params_after, "resolved": got, "loaded": loaded}))


if __name__ == "__main__":
    main()
