"""TP=2 on CPU: each rank loads its own shard through the parameter's weight_loader."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.integration

from refit import Refitter  # noqa: E402

from .conftest import engine_fixture, hf_greedy, hf_state, read, refusal, refused, vllm_greedy  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_model_dir):
    yield from engine_fixture(tmp_model_dir, tp=2)


def test_each_rank_loads_its_shard_and_generation_matches_hf(engine):
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=11)
    reports = handle.apply(state, version=1)
    assert sorted(r.peer for r in reports) == ["vllm-worker-0", "vllm-worker-1"]
    assert all(r.loaded == len(state) and r.remote == 0 for r in reports)
    # The vocab-parallel embedding: rank r holds rows [r*256, (r+1)*256) (vocab 512).
    embed = state["model.embed_tokens.weight"]
    got = read(handle, ["model.embed_tokens.weight", "model.norm.weight"])
    for rank, tensors in enumerate(got):
        assert torch.equal(tensors["model.embed_tokens.weight"], embed[rank * 256 : (rank + 1) * 256])
        assert torch.equal(tensors["model.norm.weight"], state["model.norm.weight"])
    assert vllm_greedy(llm) == hf_greedy(hf)


def test_zmq_fan_out_to_both_ranks(engine):
    pytest.importorskip("refit.transports.zmq")
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=12)
    with Refitter("zmq", engine=handle, bucket_bytes=1 << 18, timeout=120) as refitter:
        report = refitter.push(state, {"model.layers.1.self_attn.v_scale": torch.tensor(0.75)})
    assert len(report.receivers) == 2
    assert [t["model.layers.1.self_attn.attn._v_scale_float"] for t in read(handle, ["model.layers.1.self_attn.attn._v_scale_float"])] == [0.75, 0.75]
    assert vllm_greedy(llm) == hf_greedy(hf)
    handle.open("zmq", {})


def test_refusal_on_every_rank_leaves_engine_untouched(engine):
    _, handle, model_dir = engine
    _, state = hf_state(model_dir, seed=13)
    msg = refused(handle, {**state, "model.layers.0.mlp.gate_projj.weight": torch.zeros(256, 128)}, 2)
    assert "vllm-worker-0" in msg and "vllm-worker-1" in msg


@pytest.mark.parametrize(
    "name, shape, expected",
    [
        ("model.layers.0.mlp.up_proj.weight", (255, 128), [256, 128]),
        ("model.layers.0.mlp.up_proj.weight", (128, 128), [256, 128]),
        ("model.layers.1.mlp.down_proj.weight", (128, 300), [128, 256]),
        ("model.layers.1.self_attn.k_proj.weight", (96, 128), [64, 128]),
    ],
    ids=["up-rows-over", "up-rows-under", "down-columns", "k-rows"],
)
def test_wrong_shape_is_refused_by_every_rank(engine, name, shape, expected):
    # Each rank loads only its shard, so a rank alone cannot see the other rank's rows; every
    # rank checks the whole tensor against all ranks' shards.
    _, handle, model_dir = engine
    _, state = hf_state(model_dir, seed=14)
    err = refusal(handle, {**state, name: torch.zeros(shape)}, 5)
    for rank in (0, 1):
        mine = [p for p in err.problems if p.startswith(f"[vllm-worker-{rank}]")]
        assert any(f"{name}: shape {list(shape)}" in p and f"expected {expected}" in p for p in mine), (rank, err.problems)
