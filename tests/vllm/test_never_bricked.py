"""A push that fails in any phase never leaves an FP8-KV vLLM engine unusable (issue 13).

For each engine form (``fp8_engines.py``) and each phase, a failure is injected inside the
worker (``faulty.py``): while resolving (the push is refused, nothing changes), while loading
(vLLM's processing of a layer raises after another layer took new weights) and in the reload's
final step (an attention layer's post-load step raises, where vLLM turns KV scales into the
kernel's). Afterwards the error names the failure, the engine reports itself torn (or
untouched), still generates, and the next valid push restores exactly the reference
generation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.integration]

from refit import ResolveError, TransportError  # noqa: E402
from refit.adapters.vllm import VllmEngine, raise_errors  # noqa: E402
from refit.adapters.vllm_tiny import shutdown, vllm_greedy  # noqa: E402

from .faulty import PHASES  # noqa: E402
from .fp8_engines import KINDS, NO_AVX512, fp8_engine, has_avx512, kv_scales, weights  # noqa: E402


@pytest.fixture(scope="module", params=KINDS)
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not has_avx512():
        pytest.skip(NO_AVX512)
    kind = request.param
    llm, model_dir = fp8_engine(tmp_path_factory.mktemp(kind), kind, worker_extension_cls="tests.vllm.faulty.FaultyExtension")
    engine = VllmEngine(llm)
    try:
        good = {**weights(model_dir, 1), **kv_scales(kind, 0.05)}
        engine.apply(good)
        yield {"kind": kind, "llm": llm, "engine": engine, "good": good, "other": {**weights(model_dir, 2), **kv_scales(kind, 0.5)}, "ref": vllm_greedy(llm)}
    finally:
        shutdown(llm)


@pytest.mark.parametrize("phase", PHASES)
def test_a_failed_push_never_bricks_the_engine(setup: dict[str, Any], phase: str) -> None:
    llm, engine = setup["llm"], setup["engine"]
    before = engine.status()[0]
    assert not before["torn"]
    raise_errors(llm.collective_rpc("refit_test_fault", args=(phase,)))
    with pytest.raises(ResolveError if phase == "resolve" else TransportError, match=f"injected failure: {phase}"):
        engine.apply(setup["other"])
    after = engine.status()[0]
    assert after["version"] == before["version"]
    assert after["torn"] is (phase != "resolve")
    assert f"injected failure: {phase}" in after["last_error"]
    vllm_greedy(llm)  # still serves (a torn mix of old and new layers, each one whole)
    engine.apply(setup["good"])
    now = engine.status()[0]
    assert now["version"] > before["version"] and not now["torn"]
    assert vllm_greedy(llm) == setup["ref"]
