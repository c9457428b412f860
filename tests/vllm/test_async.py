"""An AsyncLLM engine (vLLM's asyncio engine) receives a push through AsyncVllmEngine."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("zmq")
pytestmark = pytest.mark.integration

from refit import Refitter  # noqa: E402
from refit.demos.tiny_vllm import engine_kwargs, hf_greedy, hf_state, write_config  # noqa: E402

from .conftest import async_greedy, engine_on_loop  # noqa: E402

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

Served = tuple["AsyncLLM", asyncio.AbstractEventLoop, str]  # the engine, the loop it runs on, its model dir


async def _start(model_dir: str) -> AsyncLLM:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(model_dir)))


@pytest.fixture(scope="module")
def async_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    model_dir = write_config(tmp_path_factory.mktemp("async-model"))
    with engine_on_loop(lambda: _start(model_dir)) as (engine, loop):
        yield engine, loop, model_dir


def test_async_engine_push_matches_hf(async_engine: Served) -> None:
    from refit.adapters.vllm import AsyncVllmEngine

    engine, loop, model_dir = async_engine
    hf, state = hf_state(model_dir, seed=11)
    scales = {"model.layers.0.self_attn.k_scale": torch.tensor(0.5)}
    with Refitter("zmq", engine=AsyncVllmEngine(engine, loop), bucket_bytes=1 << 18, timeout=60) as refitter:
        report = refitter.push(state, scales)  # from this thread, not the engine's loop
    assert [r.loaded for r in report.receivers] == [len(state) + 1]
    assert asyncio.run_coroutine_threadsafe(async_greedy(engine), loop).result(120) == hf_greedy(hf)


def test_pushing_from_the_engine_loop_is_refused(async_engine: Served) -> None:
    from refit.adapters.vllm import AsyncVllmEngine
    from refit.errors import RefitError

    engine, loop, _ = async_engine
    handle = AsyncVllmEngine(engine, loop)

    async def from_loop() -> str:
        try:
            handle.rpc("refit_close")
        except RefitError as exc:
            return str(exc)
        return ""

    assert "another thread" in asyncio.run_coroutine_threadsafe(from_loop(), loop).result(30)


def test_async_engine_apply_inside_rpcs(async_engine: Served) -> None:
    """``apply`` (the RPC-only push) goes through the async engine's own rpc."""
    from refit.adapters.vllm import AsyncVllmEngine

    engine, loop, model_dir = async_engine
    hf, state = hf_state(model_dir, seed=12)
    reports = AsyncVllmEngine(engine, loop).apply(state, version=7)
    assert [(r.version, r.loaded) for r in reports] == [(7, len(state))]
    assert asyncio.run_coroutine_threadsafe(async_greedy(engine), loop).result(120) == hf_greedy(hf)


def _documented_async_example() -> str:
    """The async example of docs/vllm.md, as written (the python block that uses AsyncVllmEngine)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "vllm.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "AsyncVllmEngine(engine" in b]
    assert len(blocks) == 1, "docs/vllm.md should hold one async example"
    return blocks[0]


def test_documented_async_example_runs_as_written(async_engine: Served) -> None:
    """The docs' lines run inside a coroutine on the engine's loop, with ``engine``, ``state``
    and ``scales`` defined, as a user would paste them."""
    engine, loop, model_dir = async_engine
    hf, state = hf_state(model_dir, seed=13)
    scales = {"model.layers.1.self_attn.v_scale": torch.tensor(0.5)}
    body = "".join(f"    {line}\n" for line in _documented_async_example().splitlines())
    namespace: dict[str, Any] = {"Refitter": Refitter}
    exec(f"import asyncio\nasync def example(engine, state, scales):\n{body}    return report\n", namespace)
    report = asyncio.run_coroutine_threadsafe(namespace["example"](engine, state, scales), loop).result(300)
    assert [r.loaded for r in report.receivers] == [len(state) + 1]
    assert asyncio.run_coroutine_threadsafe(async_greedy(engine), loop).result(120) == hf_greedy(hf)
