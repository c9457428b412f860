"""A vocabulary that is not a multiple of 64: vLLM pads the embedding and the LM head to the
next multiple (500 -> 512 rows) and its weight loader zero-fills the padding rows itself. A push
of the checkpoint's 500 rows is a whole layer; it must be accepted and served exactly as HF."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.integration

from refit import Refitter  # noqa: E402
from refit.demos.tiny_vllm import QWEN2  # noqa: E402

from .conftest import engine_fixture, hf_greedy, hf_state, vllm_greedy  # noqa: E402

VOCAB = 500  # vLLM pads it to 512


@pytest.fixture(scope="module")
def engine(tmp_model_dir):
    yield from engine_fixture(tmp_model_dir, {**QWEN2, "vocab_size": VOCAB})


def test_a_padded_vocabulary_is_pushed_whole_and_generates_like_hf(engine):
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=21)
    assert state["model.embed_tokens.weight"].shape[0] == VOCAB
    handle.apply(state, version=1)  # in one RPC
    assert vllm_greedy(llm) == hf_greedy(hf)
    pytest.importorskip("zmq")
    hf, state = hf_state(model_dir, seed=22)
    with Refitter("zmq", engine=handle, bucket_bytes=1 << 16, timeout=60) as refitter:  # the embedding in chunks
        refitter.push(state)
    assert vllm_greedy(llm) == hf_greedy(hf)
