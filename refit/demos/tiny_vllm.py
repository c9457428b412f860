"""A tiny real vLLM engine on the CPU, and its HF ``transformers`` reference.

Used by ``refit demo --engine vllm`` and by the vLLM integration tests: a config written to a
directory (no hub, dummy weights), an engine started with refit's worker extension, seeded
random weights from ``transformers`` and greedy decoding on both sides, so a push can be
checked by generation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

PROMPTS = [[1, 2, 3, 4, 5, 6], [17, 300, 5, 42]]
NEW_TOKENS = 8

QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}

# A Llama whose output embedding is tied to its input embedding (vLLM builds a separate
# lm_head module sharing the embedding's parameter).
LLAMA_TIED = {
    **QWEN2,
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}

# A Qwen3 MoE: 4 experts, top 2, in every layer (the CPU grouped GEMM wants sizes divisible by 32).
QWEN3_MOE = {
    **QWEN2,
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "head_dim": 32,
    "moe_intermediate_size": 64,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
}


def write_config(path: Path, base: dict[str, Any] = QWEN2, **overrides: Any) -> str:
    """Write ``config.json`` for a tiny model into ``path``; returns the directory."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**base, **overrides}))
    return str(path)


def hf_state(model_dir: str, seed: int) -> tuple[Any, dict[str, torch.Tensor]]:
    """A transformers model of ``model_dir``'s config with seeded random weights (scaled up so
    greedy argmax is decisive), and its state dict (HF names, float32)."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def hf_greedy(model: Any, prompts: list[list[int]] = PROMPTS, n: int = NEW_TOKENS) -> list[list[int]]:
    """Greedy continuation by full forward passes (no cache, no EOS stop)."""
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(n):
                logits = model(torch.tensor([ids])).logits[0, -1]
                ids.append(int(logits.argmax()))
            out.append(ids[len(p) :])
    return out


def greedy_params(n: int = NEW_TOKENS) -> Any:
    """Sampling parameters of the greedy comparisons: ``n`` new tokens, no detokenizer."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, detokenize=False, ignore_eos=True)


def vllm_greedy(llm: Any, prompts: list[list[int]] = PROMPTS, n: int = NEW_TOKENS) -> list[list[int]]:
    """The token ids ``llm`` generates greedily for each prompt (``n`` new tokens each)."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy_params(n), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def offline_env(log_level: str | None = None) -> None:
    """Defaults for vLLM on a CPU machine with no network, set before vLLM is imported: a small
    KV cache (else it reserves most of RAM), no hub downloads, and optionally a log level."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if log_level is not None:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", log_level)


def engine_kwargs(model_dir: str, dtype: str = "float32") -> dict[str, Any]:
    """Engine arguments of the tests' tiny engines (``LLM`` or ``AsyncEngineArgs``): dummy
    weights, no tokenizer, eager, a short context, refit's worker extension."""
    from refit.adapters.vllm import EXTENSION

    return {
        "model": model_dir,
        "load_format": "dummy",
        "skip_tokenizer_init": True,
        "enforce_eager": True,
        "dtype": dtype,
        "max_model_len": 128,
        "max_num_seqs": 4,
        "seed": 0,
        "worker_extension_cls": EXTENSION,
    }


def start_engine(model_dir: str, *, tp: int = 1, pp: int = 1, dtype: str = "float32", **extra: Any) -> Any:
    """A ``vllm.LLM`` on CPU with refit's worker extension and dummy weights; ``extra``
    engine arguments override the defaults (e.g. ``kv_cache_dtype="fp8"``)."""
    offline_env()
    from vllm import LLM

    workers = tp * pp
    if workers > 1:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % max(os.cpu_count() or 1, 1)) for i in range(workers))
    else:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    kwargs: dict[str, Any] = {}
    if workers > 1:
        kwargs["distributed_executor_backend"] = "mp"
    llm = LLM(**(engine_kwargs(model_dir, dtype) | kwargs | extra), tensor_parallel_size=tp, pipeline_parallel_size=pp)
    if pp > 1:
        from refit.adapters.vllm import raise_errors

        raise_errors(llm.collective_rpc("refit_fix_pp"))
    return llm


def shutdown(llm: Any) -> None:
    """Stop ``llm``'s engine core process now (best effort: errors of an engine already gone are ignored)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
