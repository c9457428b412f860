"""Engine fixtures for the vLLM integration tests: tiny models written into tmp dirs, dummy
weights, no hub, one engine per test module (engine start ~30 s on 2 CPU cores)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from refit.demos.tiny_vllm import (  # noqa: F401
    NEW_TOKENS,
    PROMPTS,
    QWEN2,
    greedy_params,
    hf_greedy,
    hf_state,
    offline_env,
    shutdown,
    start_engine,
    vllm_greedy,
    write_config,
)

offline_env("WARNING")  # before vLLM is imported anywhere


def digests(engine: Any) -> list[str]:
    """Per-worker sha256 over every parameter and buffer (bit-identity checks)."""
    return [r["digest"] for r in engine.rpc("refit_digest")]


def refused(engine: Any, state: dict[str, torch.Tensor], version: int) -> str:
    """Push ``state`` in-RPC expecting a refusal; check that no worker's tensors changed;
    return the error message."""
    return str(refusal(engine, state, version))


def refusal(engine: Any, state: dict[str, torch.Tensor], version: int) -> Any:
    """Like :func:`refused`, returning the ``ResolveError`` (its ``problems`` name the worker)."""
    from refit import ResolveError

    before = digests(engine)
    with pytest.raises(ResolveError) as info:
        engine.apply(state, version=version)
    assert digests(engine) == before
    return info.value


def read(engine: Any, names: list[str]) -> list[dict[str, Any]]:
    """Per-worker {name: tensor or plain value} of model tensors / attributes."""
    from refit.meta import dtype_from_name

    out = []
    for reply in engine.rpc("refit_read", names):
        got: dict[str, Any] = {}
        for name, d in reply["tensors"].items():
            if "absent" in d:
                got[name] = None
            elif "value" in d:
                got[name] = d["value"]
            else:
                dt = dtype_from_name(d["dtype"])
                got[name] = (
                    torch.frombuffer(bytearray(d["data"]), dtype=torch.uint8).view(dt).reshape(d["shape"])
                    if d["data"]
                    else torch.empty(d["shape"], dtype=dt)
                )
        out.append(got)
    return out


@pytest.fixture(scope="module")
def tmp_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model")


def engine_fixture(tmp: Path, config: dict[str, Any] = QWEN2, **kwargs: Any) -> Iterator[tuple[Any, Any, str]]:
    """(llm, VllmEngine, model_dir) of a tiny ``config`` for a module; shuts the engine down afterwards."""
    from refit.adapters.vllm import VllmEngine

    model_dir = write_config(tmp, config)
    llm = start_engine(model_dir, **kwargs)
    engine = VllmEngine(llm)
    try:
        yield llm, engine, model_dir
    finally:
        try:
            engine.close()
        finally:
            shutdown(llm)


@contextlib.contextmanager
def engine_on_loop(start: Callable[[], Coroutine[Any, Any, Any]]) -> Iterator[tuple[Any, asyncio.AbstractEventLoop]]:
    """(engine, loop): an async engine (``AsyncLLM``) made by ``start()`` on an event loop that
    runs in a thread of its own, as a server runs it; shut down with its loop on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    engine = asyncio.run_coroutine_threadsafe(start(), loop).result(300)
    try:
        yield engine, loop
    finally:
        engine.shutdown()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


async def async_greedy(engine: Any) -> list[list[int]]:
    """Greedy token ids of every prompt from an async engine (run it on the engine's loop)."""
    out = []
    for p in PROMPTS:
        final: Any = None
        async for o in engine.generate({"prompt_token_ids": p}, greedy_params(), request_id=str(uuid.uuid4())):
            final = o
        assert final is not None  # generate yields at least the finished output
        out.append(list(final.outputs[0].token_ids))
    return out
