"""``Refitter.verify`` against a real vLLM engine (CPU, tiny Qwen2, one engine start-up): a
push with checksums and ``record_digests`` lands (greedy output equals HF's), every worker's
fingerprint of what it received matches the trainer's, and a tensor that differs is named."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("zmq")
pytestmark = pytest.mark.integration

from refit import Refitter  # noqa: E402

from .conftest import engine_fixture, hf_greedy, hf_state, vllm_greedy  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_model_dir):
    yield from engine_fixture(tmp_model_dir)


def test_checksummed_push_then_verify_per_worker(engine):
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=3)
    with Refitter("zmq", engine=handle, bucket_bytes=1 << 18, timeout=60, checksum="auto", record_digests=True) as refitter:
        report = refitter.push(state)
        assert report.buckets > 1 and report.seconds["checksum"] >= 0 and report.receivers[0].seconds["checksum"] >= 0
        results = refitter.verify(state)
        assert [(r.ok, r.source, r.matched, r.mismatched, r.missing) for r in results] == [(True, "received", len(state), (), ())]
        assert results[0].peer.startswith("vllm-worker-") and results[0].version == report.version
        changed = dict(state)
        changed["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"] + 1  # fused into qkv_proj
        [result] = refitter.verify(changed)
        assert not result.ok and result.mismatched == ("model.layers.0.self_attn.q_proj.weight",)
        assert result.matched == len(state) - 1
    assert vllm_greedy(llm) == hf_greedy(hf)  # the checksummed push landed as HF computes it
    assert torch.equal(changed["model.norm.weight"], state["model.norm.weight"])
