"""refit's weight-transfer backend on vLLM's asyncio engine (``AsyncLLM``), in bfloat16: one push
of bfloat16 weights and 0-d float32 scales (two dtypes, 0-d tensors between them in the
buckets) through vLLM's public API must leave the engine bit-identical to the same push through
refit's worker extension (the path tested against HF elsewhere), and generate the same; a
refusal (a float32 tensor for a bfloat16 parameter) changes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed")
pytest.importorskip("zmq", reason="pyzmq is not installed")
pytestmark = pytest.mark.integration

from refit import Refitter  # noqa: E402
from refit.demos.tiny_vllm import engine_kwargs, hf_state, offline_env, write_config  # noqa: E402
from refit.errors import RefitError  # noqa: E402

from .conftest import async_greedy, digests, engine_on_loop, read  # noqa: E402

K0 = "model.layers.0.self_attn.attn._k_scale"


@pytest.fixture(scope="module")
def async_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, asyncio.AbstractEventLoop, str]]:
    offline_env("WARNING")
    import refit.adapters.vllm  # noqa: F401  (backend "refit")

    async def start(model_dir: str) -> Any:
        from vllm.config import WeightTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**engine_kwargs(model_dir, "bfloat16"), weight_transfer_config=WeightTransferConfig(backend="refit"))
        return AsyncLLM.from_engine_args(args)

    model_dir = write_config(tmp_path_factory.mktemp("wt-async-model"), torch_dtype="bfloat16")
    with engine_on_loop(lambda: start(model_dir)) as (engine, loop):
        yield engine, loop, model_dir


def _on(loop: asyncio.AbstractEventLoop, coro: Any, timeout: float = 300) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


def _greedy(engine: Any, loop: asyncio.AbstractEventLoop) -> list[list[int]]:
    return _on(loop, async_greedy(engine))


def _bf16(seed: int, model_dir: str) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16).contiguous() for k, v in hf_state(model_dir, seed=seed)[1].items()}


@pytest.fixture
def trainer(async_engine: Any) -> Iterator[Any]:
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

    from refit.adapters.vllm import AsyncLLMClient, RefitTrainerInitInfo

    engine, loop, _ = async_engine
    info = RefitTrainerInitInfo(rank=0, bucket_bytes=1 << 17, timeout=60)
    t = WeightTransferTrainerFactory.trainer_init(info, client=AsyncLLMClient(engine, loop))
    yield t
    t.shutdown()


def test_bf16_push_with_0d_float32_scales_equals_the_extension_path(async_engine: Any, trainer: Any) -> None:
    from refit.adapters.vllm import AsyncVllmEngine

    engine, loop, model_dir = async_engine
    handle = AsyncVllmEngine(engine, loop)
    state = _bf16(41, model_dir)
    scales = {"model.layers.0.self_attn.k_scale": torch.tensor(0.5), "model.layers.1.self_attn.v_scale": torch.tensor(0.25)}
    report = trainer.send_weights(state, scales)
    assert [r.loaded for r in report.receivers] == [len(state) + 2]
    assert _on(loop, engine.get_weight_version()) == str(report.version)
    assert read(handle, [K0])[0][K0].item() == 0.5
    native, native_out = digests(handle), _greedy(engine, loop)

    trainer.send_weights(_bf16(42, model_dir))  # something else in between
    assert _greedy(engine, loop) != native_out
    with Refitter("zmq", engine=handle, bucket_bytes=1 << 17, timeout=60) as refitter:  # refit's worker extension
        refitter.push(state, scales)
    assert digests(handle) == native and _greedy(engine, loop) == native_out


def test_async_refusal_changes_nothing(async_engine: Any, trainer: Any) -> None:
    from refit.adapters.vllm import AsyncVllmEngine

    engine, loop, model_dir = async_engine
    handle = AsyncVllmEngine(engine, loop)
    trainer.send_weights(_bf16(43, model_dir))
    before, out, version = digests(handle), _greedy(engine, loop), _on(loop, engine.get_weight_version())
    wrong = {**_bf16(44, model_dir), "model.norm.weight": torch.ones(128)}  # float32 for a bfloat16 parameter
    with pytest.raises(RefitError, match=r"model.norm.weight.*dtype torch.float32"):
        trainer.send_weights(wrong)
    assert digests(handle) == before and _greedy(engine, loop) == out
    assert _on(loop, engine.get_weight_version()) == version


def test_calls_from_the_engine_loop_are_refused(async_engine: Any) -> None:
    from refit.adapters.vllm import AsyncLLMClient

    engine, loop, _ = async_engine
    client = AsyncLLMClient(engine, loop)

    async def from_loop() -> str:
        try:
            client.start_weight_update()
        except RefitError as exc:
            return str(exc)
        return ""

    assert "another thread" in _on(loop, from_loop(), 30)
