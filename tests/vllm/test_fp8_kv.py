"""FP8 KV-cache scales against attention modules vLLM builds for a serialized-FP8 Qwen2 with
``kv_cache_dtype="fp8"``. This CPU cannot start such an engine (FP8 kernels need AVX-512/AMX
and CUDA ops), so the model is built without one (``fp8_probe.py``, a subprocess): every
rename vLLM applies is resolved, and a scale push runs through layer-wise reload and the
attention post-load step. No generation runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.integration

from .fp8_probe import NAMES  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("fp8") / "fp8.json"
    proc = subprocess.run([sys.executable, "-m", "tests.vllm.fp8_probe", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if not out.exists():
        pytest.fail(f"fp8_probe failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def test_vllm_builds_kv_scale_parameters_and_consumes_them(result):
    assert result["params"] == [f"model.layers.{i}.self_attn.attn.{x}_scale" for i in (0, 1) for x in ("k", "v")]
    assert result["params_after_post_load"] == []  # vLLM deletes them into _k_scale after loading


@pytest.mark.parametrize("name", sorted(NAMES))
def test_every_rename_resolves(result, name):
    got = result["resolved"][name]
    if NAMES[name] is None:
        assert got["placement"] == "unknown" and got["problem"]
    else:
        assert (got["placement"], got["key"], got["problem"]) == ("local", NAMES[name], "")


def test_pushed_scales_reach_kernel_side_copies(result):
    assert result["loaded"] == {"_k_scale": 0.5, "_v_scale": 0.25, "_k_scale_float": 0.5, "_v_scale_float": 0.25, "kv_cache_dtype": "fp8"}
