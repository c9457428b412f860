"""Tied embeddings (a Llama with ``tie_word_embeddings``, TP=1): vLLM builds a separate
``lm_head`` module that shares the embedding's parameter, and the CPU backend packs that
parameter into lm_head's GEMM kernel. Every form of push must leave the engine serving the
pushed embedding as its output embedding, checked by greedy generation against HF."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.integration

from refit import RefitError  # noqa: E402
from refit.demos.tiny_vllm import LLAMA_TIED  # noqa: E402

from .conftest import engine_fixture, hf_greedy, hf_state, read, vllm_greedy  # noqa: E402

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def engine(tmp_model_dir):
    yield from engine_fixture(tmp_model_dir, LLAMA_TIED)


def test_hf_state_of_a_tied_model_lists_both_names(engine):
    _, _, model_dir = engine
    hf, state = hf_state(model_dir, seed=1)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    assert EMBED in state and HEAD in state and torch.equal(state[EMBED], state[HEAD])


@pytest.mark.parametrize("seed", [2, 3])
def test_push_without_lm_head_serves_the_new_embedding(engine, seed):
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=seed)
    del state[HEAD]
    handle.apply(state, version=seed)
    assert vllm_greedy(llm) == hf_greedy(hf)


def test_push_of_the_whole_state_dict(engine):
    # model.state_dict() of a tied HF model: both names, one value.
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=4)
    reports = handle.apply(state, version=4)
    assert reports[0].loaded == len(state)
    assert vllm_greedy(llm) == hf_greedy(hf)


def test_lm_head_alone_carries_the_tied_value(engine):
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=5)
    del state[EMBED]
    handle.apply(state, version=5)
    got = read(handle, [EMBED])[0][EMBED]
    assert torch.equal(got, state[HEAD])
    assert vllm_greedy(llm) == hf_greedy(hf)


def test_different_lm_head_and_embedding_fail_loudly(engine):
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=6)
    state[HEAD] = state[HEAD] + 1.0
    with pytest.raises(RefitError) as info:
        handle.apply(state, version=6)
    assert HEAD in str(info.value) and EMBED in str(info.value) and "tied" in str(info.value)
    # A complete push afterwards is served as usual.
    hf, state = hf_state(model_dir, seed=7)
    handle.apply(state, version=7)
    assert vllm_greedy(llm) == hf_greedy(hf)
