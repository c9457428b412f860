"""A tiny Qwen3 MoE engine (TP=1): after a push, generation equals HF's with the same weights,
in the fused expert form transformers 5 writes (``mlp.experts.gate_up_proj``) and in the
per-expert checkpoint form, for a whole model and for the experts of one layer."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.integration

from refit import Refitter  # noqa: E402
from refit.demos.tiny_vllm import QWEN3_MOE  # noqa: E402

from .conftest import engine_fixture, hf_greedy, hf_state, vllm_greedy  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_model_dir):
    yield from engine_fixture(tmp_model_dir, QWEN3_MOE)


def per_expert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint form: ``experts.{e}.gate_proj/up_proj/down_proj.weight``."""
    out = {}
    for name, t in state.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            base, half = name.removesuffix("gate_up_proj"), t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :half].clone()
                out[f"{base}{e}.up_proj.weight"] = t[e, half:].clone()
        elif name.endswith(".mlp.experts.down_proj"):
            base = name.removesuffix("down_proj")
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t
    return out


def test_fused_expert_push_matches_hf(engine):
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=1)
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    handle.apply(state, version=1)
    assert vllm_greedy(llm) == hf_greedy(hf)


def test_per_expert_push_over_zmq_matches_hf(engine):
    pytest.importorskip("refit.transports.zmq")
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=2)
    with Refitter("zmq", engine=handle, bucket_bytes=1 << 18, timeout=60) as refitter:
        refitter.push(per_expert(state))
    assert vllm_greedy(llm) == hf_greedy(hf)
    handle.open("zmq", {})


def test_experts_of_one_layer(engine):
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=3)
    handle.apply(state, version=3)
    _, state2 = hf_state(model_dir, seed=4)
    experts = {k: v for k, v in state2.items() if k.startswith("model.layers.0.mlp.experts.")}
    handle.apply(experts, version=4)
    hf.load_state_dict({**state, **experts})
    assert vllm_greedy(llm) == hf_greedy(hf)
