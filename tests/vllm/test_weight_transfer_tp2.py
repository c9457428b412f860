"""refit's weight-transfer backend on a TP=2 engine (two workers in one executor), through
``LLM``'s public methods. vLLM 0.32's executor gets out of step after a collective call in which
a worker other than the last raised, so here failures reach the trainer through refit's
transport and are not raised by the workers (docs/vllm_transfer.md): a refused push must change
nothing on either worker, and every later call must still get its own replies."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed")
pytest.importorskip("zmq", reason="pyzmq is not installed")
pytestmark = pytest.mark.integration

from refit.errors import ResolveError  # noqa: E402

from .conftest import digests, engine_fixture, hf_greedy, hf_state, vllm_greedy  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_model_dir):
    import refit.adapters.vllm  # noqa: F401  (backend "refit" in this process)

    yield from engine_fixture(tmp_model_dir, tp=2, weight_transfer_config={"backend": "refit"})


def _trainer(llm: Any, transport: str = "zmq", workers: int = 2) -> Any:
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

    from refit.adapters.vllm import LLMClient, RefitTrainerInitInfo

    info = RefitTrainerInitInfo(rank=0, transport=transport, workers=workers, bucket_bytes=1 << 18, timeout=90)
    return WeightTransferTrainerFactory.trainer_init(info, client=LLMClient(llm))


@pytest.mark.parametrize("transport", ["zmq", "nccl"])
def test_push_refusal_and_the_calls_after_it(engine, transport):
    llm, handle, model_dir = engine
    trainer = _trainer(llm, transport)
    try:
        hf, state = hf_state(model_dir, seed=61 if transport == "zmq" else 62)
        report = trainer.send_weights(state, {"model.layers.1.self_attn.v_scale": torch.tensor(0.25)})
        assert [r.loaded for r in report.receivers] == [len(state) + 1] * 2
        assert llm.get_weight_version() == str(report.version)
        assert vllm_greedy(llm) == hf_greedy(hf)
        before, version = digests(handle), llm.get_weight_version()
        with pytest.raises(ResolveError) as info:
            trainer.send_weights({**state, "model.norm.weight": torch.ones(127)})
        assert {p.split("]")[0] for p in info.value.problems} == {"[vllm-worker-0", "[vllm-worker-1"}, info.value.problems
        assert digests(handle) == before and llm.get_weight_version() == version  # a collective call, in step
        assert vllm_greedy(llm) == hf_greedy(hf)
        hf2, state2 = hf_state(model_dir, seed=63)
        report = trainer.send_weights(state2)  # the next update: start, update, finish all in step
        assert llm.get_weight_version() == str(report.version) and vllm_greedy(llm) == hf_greedy(hf2)
    finally:
        trainer.shutdown()


def test_too_few_addresses_is_raised_by_the_last_worker_only(engine):
    llm, handle, model_dir = engine
    with pytest.raises(Exception, match=r"vllm-worker-1: init_info.addresses has 1 entries"):
        _trainer(llm, workers=1)
    trainer = _trainer(llm)  # the engine's calls are still in step
    try:
        hf, state = hf_state(model_dir, seed=64)
        trainer.send_weights(state)
        assert vllm_greedy(llm) == hf_greedy(hf)
    finally:
        trainer.shutdown()
