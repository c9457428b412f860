"""ModelOpt QARL for real (issue 13): a tiny vLLM model quantized by ModelOpt's own vLLM support
on the CPU backend (``nvidia-modelopt``; FP8 input quantizers on every linear, FP8 K/V
quantizers on attention, amax calibrated by generating), receiving HF-semantic amax names.

What ModelOpt 0.47 does on vLLM 0.32's CPU backend: the linear layers get ``input_quantizer``
/ ``weight_quantizer`` and attention (``self_attn.attn``) gets ``k_bmm_quantizer`` /
``v_bmm_quantizer``; after calibration the input and K/V quantizers hold 0-d ``_amax`` buffers
in the model dtype. On a CPU with AVX-512 the weight quantizers get none: the CPU backend hands
linear weights to a prepacked GEMM and leaves an empty parameter, so there is nothing to
calibrate (and so an HF ``weight_quantizer._amax`` has no buffer there and is refused); on an
AVX2 CPU the weights stay plain and ModelOpt calibrates their quantizers too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("modelopt.torch.quantization")
pytestmark = [pytest.mark.integration]

from refit.adapters.vllm import VllmEngine, raise_errors  # noqa: E402
from refit.demos.tiny_vllm import QWEN2, shutdown, start_engine, vllm_greedy, write_config  # noqa: E402

from .conftest import read, refusal, refused  # noqa: E402
from .fp8_engines import has_avx512, weights  # noqa: E402

HARNESS = "tests.vllm.harness.HarnessExtension"
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def hf_names(vllm_name: str) -> list[str]:
    """The names a ModelOpt-quantized HF model gives the amax held by vLLM buffer ``vllm_name``."""
    name = vllm_name.replace(".self_attn.attn.", ".self_attn.")
    for fused, shards in FUSED.items():
        if f".{fused}." in name:
            return [name.replace(f".{fused}.", f".{s}.") for s in shards]
    return [name]


def quantize(llm: Any) -> dict[str, float]:
    """ModelOpt-quantize every worker's model and calibrate by generating; returns every
    worker's amax by vLLM name."""
    raise_errors(llm.collective_rpc("refit_test_modelopt", args=("quantize",)))
    vllm_greedy(llm)
    amax: dict[str, float] = {}
    for reply in raise_errors(llm.collective_rpc("refit_test_modelopt", args=("calibrated",))):
        amax |= reply["amax"]
    return amax


def as_pushed(amax: dict[str, float], factor: float = 1.0) -> dict[str, torch.Tensor]:
    return {h: torch.tensor(v * factor, dtype=torch.bfloat16) for n, v in amax.items() for h in hf_names(n)}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    model_dir = write_config(tmp_path_factory.mktemp("modelopt"), QWEN2)
    llm = start_engine(model_dir, dtype="bfloat16", worker_extension_cls=HARNESS)
    try:
        engine = VllmEngine(llm)
        state = weights(model_dir, 1)
        engine.apply(state)  # dummy weights give flat logits: nothing to calibrate or compare
        amax = quantize(llm)
        yield {"llm": llm, "engine": engine, "state": state, "amax": amax, "ref": vllm_greedy(llm)}
    finally:
        shutdown(llm)


def test_modelopt_installs_the_quantizers_refit_resolves(quantized: dict[str, Any]) -> None:
    names = set(quantized["amax"])
    for i in range(cast(int, QWEN2["num_hidden_layers"])):
        for q in ("self_attn.attn.k_bmm_quantizer", "self_attn.attn.v_bmm_quantizer", "self_attn.qkv_proj.input_quantizer", "mlp.down_proj.input_quantizer"):
            assert f"model.layers.{i}.{q}._amax" in names
    calibrated_weights = {n for n in names if "weight_quantizer" in n}
    if has_avx512():  # vLLM's CPU backend prepacks linear weights for oneDNN: nothing to calibrate
        assert not calibrated_weights
    else:  # AVX2 (seen on an AMD EPYC box): plain weights, so ModelOpt calibrates them too
        for i in range(cast(int, QWEN2["num_hidden_layers"])):
            for linear in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
                assert f"model.layers.{i}.{linear}.weight_quantizer._amax" in calibrated_weights
    assert all(v > 0 for v in quantized["amax"].values())


def test_hf_amax_lands_unchanged_and_generates_as_calibrated(quantized: dict[str, Any]) -> None:
    llm, engine, amax = quantized["llm"], quantized["engine"], quantized["amax"]
    engine.apply(as_pushed(amax, 1e-3))  # amax alone, far too small: inputs saturate
    got = read(engine, sorted(amax))[0]
    assert {n: t.item() for n, t in got.items()} == {n: torch.tensor(v * 1e-3, dtype=torch.bfloat16).item() for n, v in amax.items()}
    assert vllm_greedy(llm) != quantized["ref"]  # the pushed amax is what the quantizers use
    engine.apply({**quantized["state"], **as_pushed(amax)})  # with the weights, in one push
    got = read(engine, sorted(amax))[0]
    assert {n: t.item() for n, t in got.items()} == {n: torch.tensor(v, dtype=torch.bfloat16).item() for n, v in amax.items()}
    assert vllm_greedy(llm) == quantized["ref"]


def test_fused_shards_land_as_their_max_and_targets_say_amax(quantized: dict[str, Any]) -> None:
    engine = quantized["engine"]
    shards = {f"model.layers.0.self_attn.{s}_proj.input_quantizer._amax": torch.tensor(v, dtype=torch.bfloat16) for s, v in zip("qkv", (1.0, 3.0, 2.0))}
    want = engine.targets(shards)[0]
    assert {(w["kind"], w["dtype"], w["problem"]) for w in want.values()} == {("amax", "bfloat16", "")}
    engine.apply(shards)
    assert read(engine, ["model.layers.0.self_attn.qkv_proj.input_quantizer._amax"])[0]["model.layers.0.self_attn.qkv_proj.input_quantizer._amax"].item() == 3.0
    engine.apply(as_pushed(quantized["amax"]))  # back to the calibration


def test_an_amax_without_its_buffer_refuses_the_whole_push(quantized: dict[str, Any]) -> None:
    # a quantizer that holds no amax here: the weight quantizer where the CPU backend prepacks
    # the weights (AVX-512), else the output quantizer (disabled in this FP8 config)
    quantizer = next(q for q in ("weight_quantizer", "output_quantizer") if f"model.layers.0.self_attn.qkv_proj.{q}._amax" not in quantized["amax"])
    push = {**as_pushed(quantized["amax"]), f"model.layers.0.self_attn.q_proj.{quantizer}._amax": torch.tensor(0.5, dtype=torch.bfloat16)}
    message = refused(quantized["engine"], push, version=10**6)
    assert f"model.layers.0.self_attn.qkv_proj.{quantizer}._amax" in message and "amax_to_scale" in message
    wrong = {"model.layers.0.self_attn.k_bmm_quantizer._amax": torch.tensor(0.5)}  # float32 into a bfloat16 buffer
    assert "dtype torch.float32 does not match model.layers.0.self_attn.attn.k_bmm_quantizer._amax torch.bfloat16" in refused(quantized["engine"], wrong, version=10**6)


def test_pipeline_parallel_amax_is_remote_on_the_other_stage(tmp_path: Path) -> None:
    model_dir = write_config(tmp_path, QWEN2)
    llm = start_engine(model_dir, pp=2, dtype="bfloat16", worker_extension_cls=HARNESS)
    try:
        engine = VllmEngine(llm)
        engine.apply(weights(model_dir, 1))
        amax = quantize(llm)
        assert {n.split(".")[2] for n in amax} == {"0", "1"}  # each stage quantized its own layer
        pushed = as_pushed(amax, 0.5)
        reports = engine.apply(pushed)
        per_layer = len(pushed) // 2
        assert sorted((r.loaded, r.remote) for r in reports) == [(per_layer, per_layer)] * 2
        got: dict[str, torch.Tensor] = {}
        for worker in read(engine, sorted(amax)):
            got |= {n: t for n, t in worker.items() if t is not None}
        assert {n: t.item() for n, t in got.items()} == {n: torch.tensor(v * 0.5, dtype=torch.bfloat16).item() for n, v in amax.items()}
        bad = {"model.layers.1.self_attn.kk_bmm_quantizer._amax": torch.tensor(1.0, dtype=torch.bfloat16)}
        error = refusal(engine, bad, version=10**6)
        assert "vllm-worker-0" in str(error) and "vllm-worker-1" in str(error)  # refused on every stage
    finally:
        shutdown(llm)
