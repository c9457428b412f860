"""A tied-embedding MoE model (Qwen3 MoE with ``tie_word_embeddings``) at TP=2 and at PP=2 on
CPU: the two vLLM 0.32 update gaps refit closes (the CPU fused-MoE prepack, lm_head's packed
copy of a tied embedding; see vllm_reload) must stay closed when each rank holds a shard or a
stage. One engine per layout (started once for both tests of it); checked by greedy generation
against HF transformers with the same weights."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytest.importorskip("zmq")
pytestmark = pytest.mark.integration

from refit import Refitter  # noqa: E402
from refit.demos.tiny_vllm import QWEN3_MOE  # noqa: E402

from .conftest import engine_fixture, hf_greedy, hf_state, vllm_greedy  # noqa: E402

TIED_MOE = {**QWEN3_MOE, "tie_word_embeddings": True}
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module", params=[{"tp": 2}, {"pp": 2}], ids=["tp2", "pp2"])
def engine(request, tmp_path_factory):
    yield from engine_fixture(tmp_path_factory.mktemp("tied-moe"), TIED_MOE, **request.param)


def test_state_dict_over_zmq_then_embedding_alone_over_gloo(engine):
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=31)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight and HEAD in state  # both names, one value
    with Refitter("zmq", engine=handle, bucket_bytes=1 << 18, timeout=120) as refitter:
        report = refitter.push(state)
    assert len(report.receivers) == 2
    assert sum(r.loaded for r in report.receivers) >= len(state)  # every name loaded by its owner(s)
    assert vllm_greedy(llm) == hf_greedy(hf)
    # A second push of different weights: experts re-packed again, lm_head serves the new
    # embedding although only the input embedding was pushed.
    hf, state = hf_state(model_dir, seed=32)
    del state[HEAD]
    with Refitter("nccl", engine=handle, bucket_bytes=1 << 18, timeout=120) as refitter:
        refitter.push(state)
    assert vllm_greedy(llm) == hf_greedy(hf)


def test_experts_of_one_layer_in_rpc(engine):
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=33)
    handle.apply(state, version=3)
    _, state2 = hf_state(model_dir, seed=34)
    experts = {k: v for k, v in state2.items() if k.startswith("model.layers.1.mlp.experts.")}
    handle.apply(experts, version=4)
    hf.load_state_dict({**state, **experts})
    assert vllm_greedy(llm) == hf_greedy(hf)
