"""An FP8 KV cache on the CPU (AVX-512): a pushed KV scale changes generation exactly as the
same scale loaded from a checkpoint on disk does (issue 13).

The reference is an ``fp8_config`` engine (``fp8_engines.py``) that loads weights and
``k_scale`` / ``v_scale`` from a safetensors checkpoint. Each engine form then starts from
dummy weights and receives the same weights and scales by push, first with scales of 1.0
(the generation differs: the scale is not a no-op) and then the checkpoint's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.integration]

from refit.adapters.vllm import VllmEngine  # noqa: E402
from refit.demos.tiny_vllm import shutdown, vllm_greedy, write_config  # noqa: E402

from .fp8_engines import KINDS, NO_AVX512, fp8_config, fp8_engine, has_avx512, kv_scales, weights  # noqa: E402

SCALE = 2.0**-9  # exact in bfloat16 and float32; small enough that FP8 saturates and generation moves


@pytest.fixture(scope="module")
def disk_generation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[list[int]]]:
    if not has_avx512():
        pytest.skip(NO_AVX512)
    from safetensors.torch import save_file

    from refit.demos.tiny_vllm import start_engine

    model_dir = write_config(tmp_path_factory.mktemp("disk"), fp8_config())
    save_file({**weights(model_dir, 3), **kv_scales("fp8_config", SCALE)}, str(Path(model_dir) / "model.safetensors"))
    llm = start_engine(model_dir, dtype="bfloat16", kv_cache_dtype="fp8", load_format="safetensors")
    try:
        yield vllm_greedy(llm)
    finally:
        shutdown(llm)


@pytest.mark.parametrize("kind", KINDS)
def test_a_pushed_kv_scale_generates_as_the_checkpoints(disk_generation: list[list[int]], kind: str, tmp_path: Path) -> None:
    llm, model_dir = fp8_engine(tmp_path, kind)
    try:
        engine = VllmEngine(llm)
        state = weights(model_dir, 3)
        engine.apply({**state, **kv_scales(kind, 1.0)})
        unscaled = vllm_greedy(llm)
        engine.apply({**state, **kv_scales(kind, SCALE)})
        assert vllm_greedy(llm) == disk_generation
        assert unscaled != disk_generation  # the scale reached the kernel
    finally:
        shutdown(llm)
