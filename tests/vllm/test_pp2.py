"""PP=2 on CPU: each stage loads exactly the layers it owns and classifies the rest as remote."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.integration

from .conftest import engine_fixture, hf_greedy, hf_state, read, refused, vllm_greedy  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_model_dir):
    yield from engine_fixture(tmp_model_dir, pp=2)


def _owned_by_stage0(name: str) -> bool:
    return name.startswith(("model.embed_tokens.", "model.layers.0."))


def test_stages_split_the_model_and_generation_matches_hf(engine):
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=21)
    reports = {r.peer: r for r in handle.apply(state, version=1)}
    n0 = sum(_owned_by_stage0(k) for k in state)
    assert (reports["vllm-worker-0"].loaded, reports["vllm-worker-0"].remote) == (n0, len(state) - n0)
    assert (reports["vllm-worker-1"].loaded, reports["vllm-worker-1"].remote) == (len(state) - n0, n0)
    # the union covers the model, nothing twice
    assert reports["vllm-worker-0"].loaded + reports["vllm-worker-1"].loaded == len(state)
    stage0, stage1 = read(handle, ["model.layers.0.input_layernorm.weight"])[0], read(handle, ["model.norm.weight"])[1]
    assert torch.equal(stage0["model.layers.0.input_layernorm.weight"], state["model.layers.0.input_layernorm.weight"])
    assert torch.equal(stage1["model.norm.weight"], state["model.norm.weight"])
    assert vllm_greedy(llm) == hf_greedy(hf)


def test_kv_scale_lands_on_the_owning_stage_only(engine):
    _, handle, _ = engine
    reports = {r.peer: r for r in handle.apply({}, {"model.layers.1.self_attn.k_scale": torch.tensor(0.5)}, version=2)}
    assert (reports["vllm-worker-0"].remote, reports["vllm-worker-1"].loaded) == (1, 1)
    got = read(handle, ["model.layers.1.self_attn.attn._k_scale_float"])[1]
    assert got["model.layers.1.self_attn.attn._k_scale_float"] == 0.5


@pytest.mark.parametrize(
    "bad",
    ["model.layers.1.self_attn.q_projj.weight", "model.layers.0.self_attn.q_projj.weight", "model.layers.7.self_attn.q_proj.weight"],
    ids=["under-remote-layer", "under-local-layer", "no-such-layer"],
)
def test_name_no_stage_owns_is_refused_on_every_stage(engine, bad):
    _, handle, model_dir = engine
    _, state = hf_state(model_dir, seed=22)
    msg = refused(handle, {**state, bad: torch.zeros(128, 128)}, 3)
    assert "vllm-worker-0" in msg and "vllm-worker-1" in msg, msg
    if bad.startswith("model.layers.1."):  # stage 0 names the local layer it tried, not another one
        assert "belongs to another pipeline stage, but the same name for the local model.layers.0 is refused there" in msg, msg
        assert "did you mean 'model.layers.0.self_attn.qkv_proj.weight'?" in msg, msg


def test_one_stage_refusing_stops_both(engine):
    # Stage 0 lacks lm_head entirely and can only check the module path, so it accepts this
    # name as remote; stage 1 refuses it. Nothing may be loaded on either stage.
    _, handle, model_dir = engine
    _, state = hf_state(model_dir, seed=23)
    msg = refused(handle, {**state, "lm_head.weightt": torch.zeros(512, 128)}, 4)
    assert "vllm-worker-1" in msg
