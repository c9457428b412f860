"""The generation sweep (a helper script of test_generation.py; run as
``python -m tests.vllm.gen_probe OUT.json ARCH...``).

Per architecture: a tiny config (``arch_probe.tiny_config``) with seeded random weights A saved
as safetensors; a real engine (TP=1) loads them from disk and generates (the reference, same
kernels); then, over ``zmq`` and then over ``nccl`` (the gloo stream on CPU), the full
checkpoint state B and then A are pushed. After each B the engine must generate what HF
transformers generates with B, after each A exactly what the disk-loaded engine generated.
One JSON record per architecture; engines are started one after the other.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from typing import Any

from refit.demos.tiny_vllm import hf_greedy, offline_env

offline_env("WARNING")  # before vLLM is imported; the test reads the log (vLLM writes it to stdout)

PROMPTS = [[1, 2, 3, 4, 5, 6], [17, 300, 5, 42], [7, 7, 7, 100, 200, 31, 64]]
NEW_TOKENS = 16
# Beyond arch_probe's tiny sizes: tie Llama's embeddings (its default is untied).
OVERRIDES: dict[str, dict[str, Any]] = {"LlamaForCausalLM": {"tie_word_embeddings": True}}
# zmq: frames applied as received; nccl: the gloo stream on CPU, into reused staging buffers.
TRANSPORTS = ("zmq", "nccl")


def seeded(model: Any, seed: int) -> dict[str, Any]:
    """Seeded random weights (as ``tiny_vllm.hf_state``) written into ``model``; its state dict."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dtype.is_floating_point:
                p.copy_(
                    1.0 + 0.1 * torch.randn(p.shape, generator=gen) if name.endswith("norm.weight") else 0.15 * torch.randn(p.shape, generator=gen)
                )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def checkpoint(model: Any, d: str) -> dict[str, Any]:
    """``model`` saved into ``d`` and read back: the HF checkpoint format refit is documented to
    take (transformers 5 renames some modules at run time, e.g. Mixtral's ``block_sparse_moe``;
    ``save_pretrained`` writes the checkpoint names; a tied output embedding is written once)."""
    import glob

    from safetensors.torch import load_file

    model.save_pretrained(d)
    state: dict[str, Any] = {}
    for path in sorted(glob.glob(f"{d}/*.safetensors")):
        state.update(load_file(path))
    return state


def run(arch: str) -> dict[str, Any]:
    import torch

    from refit import Refitter
    from refit.adapters.vllm import VllmEngine
    from refit.demos.tiny_vllm import engine_kwargs, shutdown, vllm_greedy
    from tests.vllm.arch_probe import tiny_config

    t0 = time.perf_counter()
    cls, cfg = tiny_config(arch)
    for k, v in OVERRIDES.get(arch, {}).items():
        setattr(cfg, k, v)
    if getattr(cfg, "pad_token_id", None) is not None:
        cfg.pad_token_id = 0  # defaults index a real-size vocabulary
    d = tempfile.mkdtemp(prefix=f"gen-{arch}-")
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    seeded(hf, 1)
    state_a = checkpoint(hf, d)
    want_a = hf_greedy(hf, PROMPTS, NEW_TOKENS)
    seeded(hf, 2)
    state_b = checkpoint(hf, tempfile.mkdtemp(prefix=f"gen-{arch}-b-"))
    want_b = hf_greedy(hf, PROMPTS, NEW_TOKENS)

    from vllm import LLM

    llm = LLM(**{**engine_kwargs(d), "load_format": "safetensors"})
    try:
        engine = VllmEngine(llm)
        disk = vllm_greedy(llm, PROMPTS, NEW_TOKENS)
        got: dict[str, list[list[int]]] = {}
        for transport in TRANSPORTS:
            with Refitter(transport, engine=engine, bucket_bytes=1 << 20, timeout=120) as refitter:
                refitter.push(state_b)
                got[f"{transport}_b"] = vllm_greedy(llm, PROMPTS, NEW_TOKENS)
                refitter.push(state_a)
                got[f"{transport}_a"] = vllm_greedy(llm, PROMPTS, NEW_TOKENS)
    finally:
        shutdown(llm)
    checks = {"disk_equals_hf": disk == want_a, "b_differs_from_a": want_b != want_a}
    for transport in TRANSPORTS:
        checks[f"{transport}_push_b_equals_hf"] = got[f"{transport}_b"] == want_b
        checks[f"{transport}_push_a_equals_disk"] = got[f"{transport}_a"] == disk
    bad = [k for k, ok in checks.items() if not ok]
    return {
        "arch": arch,
        "status": "fail" if bad else "pass",
        "why": ", ".join(f"not {k}" for k in bad),
        "checks": checks,
        "tied": bool(getattr(cfg, "tie_word_embeddings", False)),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    out, archs = sys.argv[1], sys.argv[2:]
    results = []
    for arch in archs:
        try:
            results.append(run(arch))
        except Exception:
            results.append({"arch": arch, "status": "fail", "why": traceback.format_exc().splitlines()[-1][:400]})
        with open(out, "w") as f:
            json.dump(results, f)
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
