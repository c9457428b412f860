"""KV-cache scales calibrated in the trainer (issue 18): pushed into an FP8-KV-cache engine on
the CPU (AVX-512), they make it generate exactly what the same engine generates after loading
a checkpoint with those scales from disk.

The trainer side is :class:`refit.kv_calibration.KVCalibrator` on the HF model the weights come
from (forward hooks on ``k_proj`` / ``v_proj`` over a calibration batch, amax -> scale for
float8_e4m3fn). The reference is an ``fp8_config`` engine (``fp8_engines.py``) that loads the
weights and the calibrated ``k_scale`` / ``v_scale`` from safetensors; the pushed engine starts
from dummy weights and receives both by one push.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = [pytest.mark.integration]

from refit.adapters.vllm import VllmEngine  # noqa: E402
from refit.demos.tiny_vllm import hf_state, shutdown, start_engine, vllm_greedy, write_config  # noqa: E402
from refit.kv_calibration import KVCalibrator  # noqa: E402

from .conftest import read  # noqa: E402
from .fp8_engines import NO_AVX512, fp8_config, fp8_engine, has_avx512, kv_scales, weights  # noqa: E402

SEED = 3


def calibrated(model_dir: str) -> dict[str, torch.Tensor]:
    """k/v scales of the seeded HF model, calibrated over a fixed batch, as the engine stores
    them (bfloat16 parameters in an ``fp8_config`` engine)."""
    model, _ = hf_state(model_dir, SEED)
    batch = torch.randint(0, model.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
    with KVCalibrator(model) as cal, torch.no_grad():
        model(batch)
    return {name: s.to(torch.bfloat16) for name, s in cal.scales(torch.float8_e4m3fn).items()}


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, torch.Tensor], list[list[int]]]]:
    """(the calibrated scales, the generation of an engine that loaded them from disk)."""
    if not has_avx512():
        pytest.skip(NO_AVX512)
    from safetensors.torch import save_file

    model_dir = write_config(tmp_path_factory.mktemp("disk"), fp8_config())
    scales = calibrated(model_dir)
    save_file({**weights(model_dir, SEED), **scales}, str(Path(model_dir) / "model.safetensors"))
    llm = start_engine(model_dir, dtype="bfloat16", kv_cache_dtype="fp8", load_format="safetensors")
    try:
        yield scales, vllm_greedy(llm)
    finally:
        shutdown(llm)


def test_calibrated_kv_scales_pushed_generate_as_the_checkpoints(disk: tuple[dict[str, torch.Tensor], list[list[int]]], tmp_path: Path) -> None:
    scales, disk_generation = disk
    assert sorted(scales) == sorted(kv_scales("fp8_config", 1.0))  # a k and a v scale for every layer, HF names
    assert all(torch.isfinite(s) and 0 < float(s) != 1.0 for s in scales.values())
    llm, model_dir = fp8_engine(tmp_path, "fp8_config")
    try:
        engine = VllmEngine(llm)
        state = weights(model_dir, SEED)
        engine.apply({**state, **kv_scales("fp8_config", 1.0)})
        unscaled = vllm_greedy(llm)
        engine.apply({**state, **scales})
        assert vllm_greedy(llm) == disk_generation
        assert unscaled != disk_generation  # the calibrated scales reached the kernel
        names = [f"model.layers.{i}.self_attn.attn._{x}_scale" for i in range(2) for x in "kv"]
        stored = read(engine, names)[0]  # the float32 copies the attention kernel reads
        assert [float(stored[n]) for n in names] == [float(scales[n.replace("attn._", "")]) for n in names]
    finally:
        shutdown(llm)
