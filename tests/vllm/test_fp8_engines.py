"""FP8-KV vLLM engines (issue 13): a push that fails in any phase never leaves one unusable;
``targets()`` tells a trainer each engine's scale dtypes before it pushes; ModelOpt amax lands
unchanged in quantizer buffers.

For each engine form (``fp8_engines.py``) and each phase, a failure is injected inside the
worker (``harness.py``): while resolving (the push is refused, nothing changes), while loading
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
import torch

pytest.importorskip("vllm")
pytestmark = [pytest.mark.integration]

from refit import ResolveError, TransportError  # noqa: E402
from refit.adapters.vllm import VllmEngine, raise_errors  # noqa: E402
from refit.demos.tiny_vllm import shutdown, vllm_greedy  # noqa: E402

from .fp8_engines import KINDS, NO_AVX512, fp8_engine, has_avx512, kv_scales, weights  # noqa: E402
from .harness import PHASES  # noqa: E402


@pytest.fixture(scope="module", params=KINDS)
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not has_avx512():
        pytest.skip(NO_AVX512)
    kind = request.param
    llm, model_dir = fp8_engine(tmp_path_factory.mktemp(kind), kind, worker_extension_cls="tests.vllm.harness.HarnessExtension")
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


def test_targets_tell_the_trainer_what_each_engine_expects(setup: dict[str, Any]) -> None:
    """The same k_scale is a float32 buffer on one engine form and a bfloat16 parameter on the
    other: targets() says which before any push, and what a refused name would need."""
    kind, engine = setup["kind"], setup["engine"]
    ask = {
        "model.layers.0.self_attn.k_scale": torch.tensor(0.5),
        "model.embed_tokens.weight": torch.zeros(512, 128),
        "model.layers.0.self_attn.o_proj.weight": torch.zeros(128, 64, dtype=torch.bfloat16),
        "model.layers.0.self_attn.k_scalee": torch.tensor(0.5),
    }
    got = engine.targets(ask)[0]
    k = got["model.layers.0.self_attn.k_scale"]
    assert (k["kind"], k["dtype"], k["shape"]) == ("scale", "float32" if kind == "fp8_kv" else "bfloat16", [])
    assert bool(k["problem"]) is (kind != "fp8_kv")  # float32 into a bfloat16 parameter: refused, and said so
    e = got["model.embed_tokens.weight"]
    assert (e["kind"], e["dtype"], e["shape"]) == ("weight", "bfloat16", [512, 128]) and "dtype torch.float32" in e["problem"]
    o = got["model.layers.0.self_attn.o_proj.weight"]
    assert (o["kind"], o["dtype"], o["shape"]) == ("weight", "bfloat16", [128, 128]) and "shape" in o["problem"]
    bad = got["model.layers.0.self_attn.k_scalee"]
    assert bad["kind"] == "unknown" and bad["dtype"] is None and bad["problem"]


def test_modelopt_amax_lands_unchanged_in_its_quantizer(setup: dict[str, Any]) -> None:
    """With quantizers where ModelOpt's vLLM support puts them (attention K/V under the inner
    ``attn``), HF amax names land unchanged, in the same push as weights; an amax with no
    quantizer is refused (fail closed) and nothing of that push loads."""
    from .conftest import read, refused

    llm, engine = setup["llm"], setup["engine"]
    raise_errors(llm.collective_rpc("refit_test_quantizers", args=([f"model.layers.{i}.self_attn.attn.{x}_bmm_quantizer" for i in (0, 1) for x in "kv"],)))
    amax = {f"model.layers.{i}.self_attn.{x}_bmm_quantizer._amax": torch.tensor(3.0 + i + (x == "v")) for i in (0, 1) for x in "kv"}
    engine.apply({**setup["good"], **amax})
    got = read(engine, [f"model.layers.{i}.self_attn.attn.{x}_bmm_quantizer._amax" for i in (0, 1) for x in "kv"])[0]
    assert [v.item() for v in got.values()] == [3.0, 4.0, 4.0, 5.0]
    assert vllm_greedy(llm) == setup["ref"]  # the weights of the same push loaded as before
    message = refused(engine, {**amax, "model.layers.0.self_attn.o_proj.input_quantizer._amax": torch.tensor(1.0)}, version=10**6)
    assert "model.layers.0.self_attn.o_proj.input_quantizer._amax" in message and "amax_to_scale" in message


def test_documented_targets_example_runs_as_written(setup: dict[str, Any]) -> None:
    """docs/vllm.md's "ask before pushing" lines, as a user would paste them: a state in the
    wrong dtypes (float32 everywhere) is cast once to what each target holds, then accepted."""
    import re
    import textwrap
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "vllm.md").read_text()
    blocks = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", text, re.S) if "engine.targets(state)" in b]
    assert len(blocks) == 1, "docs/vllm.md should hold one targets() example"
    namespace = {"engine": setup["engine"], "state": {k: v.float() for k, v in setup["good"].items()}, "torch": torch}
    exec(blocks[0], namespace)
    setup["engine"].apply(namespace["state"])
    assert vllm_greedy(setup["llm"]) == setup["ref"]
