"""FP8 weights quantized on push land in a real vLLM FP8 model exactly as vLLM loads the same
FP8 checkpoint from disk (issue 18).

What runs on this CPU (``fp8_weights_probe.py``, a subprocess per scheme): a tiny Qwen2 with
vLLM's ``fp8`` quantization config (serialized FP8 weights, dynamic activations) is built as an
engine's worker builds it, once loading the checkpoint refit's FP8 helper wrote to disk through
vLLM's own model loader, once from dummy weights receiving the same weights by a push through
:func:`refit.fp8.fp8_stream` into vLLM's resolver. Every parameter and buffer must then be equal
bit for bit: fused q/k/v and gate/up FP8 shards, their per-shard scales, biases, norms, embeddings.

What does not run here, measured on vLLM 0.32's CPU build: an FP8 engine. Per-tensor FP8 fails
while starting (the CPU build's ``_C::static_scaled_fp8_quant`` takes no arguments: it is not
implemented), and 128x128 block FP8 needs AMX tiles (Sapphire Rapids or newer) to even build
its linear layers. So the FP8 linears' post-load step is skipped in both models (there is no
kernel to prepare), and there is no generation; the block scheme is skipped on CPUs without AMX.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def probe(scheme: str, tmp: Path) -> dict[str, Any]:
    out = tmp / f"fp8_weights_{scheme}.json"
    proc = subprocess.run([sys.executable, "-m", "tests.vllm.fp8_weights_probe", scheme, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if not out.exists():
        pytest.fail(f"fp8_weights_probe {scheme} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


@pytest.mark.parametrize("scheme", ["tensor", "block"])
def test_fp8_push_stores_what_vllm_loads_from_the_checkpoint(scheme: str, tmp_path: Path) -> None:
    if scheme == "block" and not has_amx():
        pytest.skip("vLLM's CPU block-FP8 linear layers need AMX tiles (Sapphire Rapids or newer); this CPU has none")
    r = probe(scheme, tmp_path)
    scale = "weight_scale" if scheme == "tensor" else "weight_scale_inv"
    fp8 = {n for n, (dtype, _) in r["checkpoint"].items() if dtype == "torch.float8_e4m3fn"}
    assert len(fp8) == 2 * 7 and all(n.removesuffix("weight") + scale in r["checkpoint"] for n in fp8)  # 7 linears per layer, each with its scale
    assert r["pushed"] == r["disk"]  # every parameter and buffer, bit for bit
    stored = {n: d.split()[0] for n, d in r["pushed"].items()}
    assert {n for n, dtype in stored.items() if dtype == "torch.float8_e4m3fn"} == {
        f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    }
    changed = [n for n in r["pushed"] if r["pushed"][n] != r["dummy"][n]]
    assert all(any(n.startswith(f"model.layers.{i}.{m}.") and n.endswith(scale) for n in changed) for i in range(2) for m in ("self_attn.qkv_proj", "mlp.gate_up_proj"))
    assert r["tensors_pushed"] == len(r["checkpoint"])
