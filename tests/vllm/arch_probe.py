"""Build tiny vLLM text models without an engine and resolve their HF state (a helper script of
test_architectures.py; run as ``python -m tests.vllm.arch_probe OUT.json ARCH...``).

One process for every architecture (vLLM's import and distributed set-up are paid once); each
architecture's result is one JSON record: status ``pass`` / ``fail`` / ``skip`` and why.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from typing import TYPE_CHECKING, Any

import torch

from refit.demos.tiny_vllm import offline_env
from tests.procs import free_port

if TYPE_CHECKING:
    from vllm.config.model import ModelDType

offline_env("ERROR")  # before vLLM is imported

# Small sizes every config gets where it has the attribute (names differ between families).
TINY: dict[str, Any] = {
    "hidden_size": 128,
    "n_embd": 128,
    "d_model": 128,
    "intermediate_size": 256,
    "ffn_hidden_size": 256,
    "n_inner": 256,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "num_layers": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "num_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "n_positions": 256,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "kv_lora_rank": 32,
    "q_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 32,
    "v_head_dim": 32,
    "sliding_window": 64,
}


def tiny_config(arch: str) -> Any:
    import transformers

    cls = getattr(transformers, arch)
    cfg = cls.config_class()
    for k, v in TINY.items():
        if hasattr(cfg, k) and (getattr(cfg, k) is not None or k == "head_dim"):
            setattr(cfg, k, v)
    n = 2
    for k in ("layer_types", "block_types", "attention_layers"):
        if isinstance(getattr(cfg, k, None), list):
            setattr(cfg, k, list(getattr(cfg, k))[:n])
    cfg.architectures = [arch]
    cfg.torch_dtype = "float32"
    return cls, cfg


def checkpoint_state(cls: Any, cfg: Any, d: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of the HF checkpoint transformers writes for ``cfg`` (the
    checkpoint format: per-expert MoE names, tied weights once), read back from safetensors."""
    import glob

    from safetensors import safe_open

    from refit.meta import dtype_from_name

    torch.manual_seed(0)
    cls(cfg).save_pretrained(d)
    codes = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64", "I32": "int32", "BOOL": "bool"}
    state = {}
    for path in sorted(glob.glob(f"{d}/*.safetensors")):
        with safe_open(path, "pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
                sl = f.get_slice(k)
                state[k] = (tuple(sl.get_shape()), dtype_from_name(codes[sl.get_dtype()]))
    return state


def build_vllm(model_dir: str, port: int, *, dtype: ModelDType = "float32", process: bool = True, **engine_args: Any) -> tuple[Any, Any]:
    """A vLLM model built as an engine's worker would (TP=1), without an engine.

    ``process=False`` skips the post-load steps (FP8 models: this CPU has no FP8 kernels). Dummy
    weights unless ``load_format`` is given (the weights are then loaded by the caller)."""
    from vllm.model_executor.models import registry

    # vLLM inspects each model class in a fresh subprocess (~10 s) to keep CUDA out of the
    # parent; there is no CUDA here, so inspect in-process.
    registry._run_in_subprocess = lambda fn: fn()
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading

    args = EngineArgs(
        model=model_dir, skip_tokenizer_init=True, enforce_eager=True, dtype=dtype, max_model_len=128, seed=0, **{"load_format": "dummy", **engine_args}
    )
    cfg = args.create_engine_config()
    with set_current_vllm_config(cfg):
        if not parallel_state.model_parallel_is_initialized():
            port = port or free_port()
            parallel_state.init_distributed_environment(
                world_size=1, rank=0, local_rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo"
            )
            parallel_state.initialize_model_parallel(1, 1)
        model = initialize_model(vllm_config=cfg)
        if process:
            process_weights_after_loading(model, cfg.model_config, torch.device("cpu"))
    return model, cfg


def probe(arch: str, port: int) -> dict[str, Any]:
    from refit.adapters.vllm_resolve import VllmResolver
    from refit.meta import Role, TensorMeta
    from refit.resolve import Placement

    t0 = time.perf_counter()
    try:
        cls, cfg = tiny_config(arch)
        d = tempfile.mkdtemp(prefix=f"arch-{arch}-")
        state = checkpoint_state(cls, cfg, d)
        model, vcfg = build_vllm(d, port)
    except Exception as exc:  # cannot be built tiny on CPU: not a resolver result
        return {"arch": arch, "status": "skip", "why": f"build: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    try:
        resolver = VllmResolver(model, vcfg)
        metas = [TensorMeta(n, dt, s, Role.WEIGHT, 0, 0, 0) for n, (s, dt) in state.items()]
        resolutions = [resolver.resolve(m) for m in metas]
        bad = [r.problem or f"{m.name}: {r.placement}" for m, r in zip(metas, resolutions) if r.problem or r.placement is not Placement.LOCAL]
        bad += resolver.check_push([r for r in resolutions if r.placement is Placement.LOCAL])
        # every target covered: every module with loadable tensors was filled
        filled = {h.module for r in resolutions for h in resolver._hits_by_key.get(r.key, [])}
        shadow = resolver._shadow
        from vllm.model_executor.layers.attention import is_deferred_attention_layer

        uncovered = [
            q
            for q, mod in model.named_modules()
            if q not in filled
            and not is_deferred_attention_layer(mod)
            and shadow.tensors.get(id(mod)) is not None
            and shadow.layer_size(q) > 0
            and not all(f"{q}.{n}" in resolver._aliases for n, _ in mod.named_parameters(recurse=False))  # tied
        ]
        bad += [f"{q}: no pushed name fills it" for q in uncovered]
        first = metas[len(metas) // 2]
        typo = resolver.resolve(TensorMeta(first.name + "x", first.dtype, first.shape, Role.WEIGHT, 0, 0, 0))
        if typo.placement is not Placement.UNKNOWN:
            bad.append(f"misspelled {first.name}x was not refused")
        status = "fail" if bad else "pass"
        return {
            "arch": arch,
            "status": status,
            "why": "; ".join(bad[:4]) + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""),
            "names": len(metas),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    except Exception:
        return {"arch": arch, "status": "fail", "why": traceback.format_exc().splitlines()[-1][:300]}


def main() -> None:
    out, archs = sys.argv[1], sys.argv[2:]
    port = free_port()
    results = []
    for arch in archs:
        results.append(probe(arch, port))
        with open(out, "w") as f:
            json.dump(results, f)
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
