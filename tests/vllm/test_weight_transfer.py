"""refit as a backend of vLLM's own weight-transfer API, on one tiny Qwen2 engine (TP=1, float32)
driven only through ``LLM``'s public methods (``init_weight_transfer_engine``,
``start_weight_update``, ``update_weights``, ``finish_weight_update``, ``get_weight_version``)
and vLLM's ``WeightTransferTrainerFactory``. Greedy output must equal HF's with the pushed
weights; a refusal must leave every engine tensor bit-identical (digests through refit's
worker extension, used here for inspection only)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed")
pytest.importorskip("zmq", reason="pyzmq is not installed")
pytestmark = pytest.mark.integration

from refit import Refitter  # noqa: E402
from refit.errors import RefitError, ResolveError  # noqa: E402

from .conftest import digests, engine_fixture, hf_greedy, hf_state, read, vllm_greedy  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "vllm_transfer.md"
K0, V1 = "model.layers.0.self_attn.attn._k_scale", "model.layers.1.self_attn.attn._v_scale"


@pytest.fixture(scope="module")
def engine(tmp_model_dir):
    import refit.adapters.vllm  # noqa: F401  (registers backend "refit" in this process)

    yield from engine_fixture(tmp_model_dir, weight_transfer_config={"backend": "refit"})


def _trainer(llm: Any, transport: str = "zmq", **kwargs: Any) -> Any:
    from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

    from refit.adapters.vllm import LLMClient, RefitTrainerInitInfo

    info = RefitTrainerInitInfo(rank=0, transport=transport, bucket_bytes=1 << 18, timeout=60, **kwargs)
    return WeightTransferTrainerFactory.trainer_init(info, client=LLMClient(llm))


@pytest.fixture
def trainer(engine):
    t = _trainer(engine[0])
    yield t
    t.shutdown()


def test_push_then_generation_equals_hf_and_weight_version_is_the_refit_version(engine, trainer):
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=21)
    scales = {"model.layers.0.self_attn.k_scale": torch.tensor(0.5), "model.layers.1.self_attn.v_scale": torch.tensor(0.25)}  # 0-d float32
    report = trainer.send_weights(state, scales)
    assert report.buckets > 1 and [r.loaded for r in report.receivers] == [len(state) + 2]
    assert llm.get_weight_version() == str(report.version)
    got = read(handle, [K0, V1])[0]
    assert (got[K0].dtype, got[K0].shape, got[K0].item(), got[V1].item()) == (torch.float32, (), 0.5, 0.25)
    assert vllm_greedy(llm) == hf_greedy(hf)


@pytest.mark.parametrize(
    "bad, expect",
    [
        (
            lambda s: {("model.layers.0.mlp.gate_prj.weight" if k == "model.layers.0.mlp.gate_proj.weight" else k): v for k, v in s.items()},
            "gate_prj",
        ),
        (lambda s: {**s, "model.norm.weight": torch.ones(127)}, "model.norm.weight: shape [127]"),
        (lambda s: {**s, "model.norm.weight": torch.ones(128, dtype=torch.bfloat16)}, "dtype torch.bfloat16"),
        (lambda s: {**s, "model.layers.0.self_attn.k_scale": torch.tensor(float("nan"))}, "k_scale"),
    ],
    ids=["misspelled", "wrong-shape", "wrong-dtype", "nan-scale"],
)
def test_refusal_leaves_the_engine_unchanged(engine, trainer, bad, expect):
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=22)
    trainer.send_weights(state)
    before, version = digests(handle), llm.get_weight_version()
    with pytest.raises(RefitError) as info:  # PlanError (caught by the trainer) or ResolveError (by the worker)
        trainer.send_weights(bad(dict(state)))
    assert expect in str(info.value) and "nothing" in str(info.value), info.value
    assert digests(handle) == before and llm.get_weight_version() == version
    assert vllm_greedy(llm) == hf_greedy(hf)
    hf2, state2 = hf_state(model_dir, seed=23)  # and the next update is accepted
    trainer.send_weights(state2)
    assert vllm_greedy(llm) == hf_greedy(hf2)


def test_two_consecutive_updates(engine, trainer):
    llm, _, model_dir = engine
    versions = []
    for seed in (24, 25):
        hf, state = hf_state(model_dir, seed=seed)
        versions.append(trainer.send_weights(state).version)
        assert llm.get_weight_version() == str(versions[-1])
        assert vllm_greedy(llm) == hf_greedy(hf)
    assert versions[1] == versions[0] + 1


@pytest.mark.parametrize("transport", ["nccl", "cuda_ipc"])  # the gloo stream and shared-memory buckets on CPU
def test_push_over_the_other_transports(engine, transport):
    llm, handle, model_dir = engine
    t = _trainer(llm, transport)
    try:
        hf, state = hf_state(model_dir, seed=26)
        report = t.send_weights(state, {"model.layers.0.self_attn.k_scale": torch.tensor(0.125)})
        assert [r.loaded for r in report.receivers] == [len(state) + 1]
        assert read(handle, [K0])[0][K0].item() == 0.125
        assert vllm_greedy(llm) == hf_greedy(hf)
    finally:
        t.shutdown()


class Crash(Exception):
    """A trainer dying in the middle of a push."""


def _addresses(tmp: Path) -> list[str]:
    return [f"ipc://{tmp / 'worker-0'}"]


def _update(llm: Any, addresses: list[str], state: dict[str, torch.Tensor], **push: Any) -> Any:
    """One ``update_weights`` call served while a plain Refitter pushes ``state`` (the raw API)."""
    with ThreadPoolExecutor(1) as pool:
        served = pool.submit(llm.update_weights, {"update_info": {"timeout": 60}})
        try:
            with Refitter("zmq", peers=addresses, bucket_bytes=1 << 16, timeout=60, **push) as r:
                return r.push(state)
        finally:
            served.exception(120)  # let the worker's call end before the next one


def test_several_update_weights_calls_each_a_whole_push(engine, tmp_path):
    """Each ``update_weights`` call is one refit push of its own: two calls of one session
    (layer 0, then the rest) load both halves; a refused call loads nothing of itself, keeps
    what earlier calls of the session loaded, ends the session (vLLM does) and leaves
    ``weight_version`` alone."""
    llm, handle, model_dir = engine
    addresses = _addresses(tmp_path)
    llm.init_weight_transfer_engine({"init_info": {"transport": "zmq", "addresses": addresses}})
    try:
        hf, state = hf_state(model_dir, seed=27)
        first = {k: v for k, v in state.items() if k.startswith(("model.embed_tokens.", "model.layers.0."))}
        rest = {k: v for k, v in state.items() if k not in first}
        llm.start_weight_update()
        _update(llm, addresses, first)
        _update(llm, addresses, rest)
        llm.finish_weight_update("step-27")
        assert llm.get_weight_version() == "step-27"
        assert vllm_greedy(llm) == hf_greedy(hf)

        hf2, state2 = hf_state(model_dir, seed=28)
        first2 = {k: v for k, v in state2.items() if k in first}
        llm.start_weight_update()
        _update(llm, addresses, first2)
        after_first = digests(handle)
        with pytest.raises(ResolveError, match="gate_prj"):
            _update(
                llm,
                addresses,
                {("model.layers.1.mlp.gate_prj.weight" if "layers.1.mlp.gate_proj" in k else k): v for k, v in state2.items() if k in rest},
            )
        assert digests(handle) == after_first  # the refused call loaded nothing; the first call's tensors stay
        with pytest.raises(Exception, match="without a matching start_weight_update"):
            llm.finish_weight_update("step-28")  # vLLM ended the session when update_weights raised
        assert llm.get_weight_version() == "step-27"
        hf.load_state_dict({**state, **first2})
        assert vllm_greedy(llm) == hf_greedy(hf)
    finally:
        llm.shutdown_weight_transfer_engine()


def test_a_torn_update_never_finishes(engine, tmp_path):
    """A push that breaks after a bucket was applied: ``update_weights`` raises, the worker is
    torn, and ``finish_weight_update`` refuses (``weight_version`` stays) until a complete push
    has landed in the same session."""
    llm, _, model_dir = engine
    addresses = _addresses(tmp_path)
    llm.init_weight_transfer_engine({"init_info": {"transport": "zmq", "addresses": addresses}})
    try:
        version = llm.get_weight_version()

        def crash(done: int, total: int) -> None:
            if done == 3:
                raise Crash("trainer killed mid-push")

        _, state = hf_state(model_dir, seed=29)
        llm.start_weight_update()
        with pytest.raises(Crash):
            _update(llm, addresses, state, progress=crash)
        llm.start_weight_update()  # vLLM ended the session when update_weights raised
        with pytest.raises(Exception, match="TornStateError|partially applied"):
            llm.finish_weight_update("torn")
        assert llm.get_weight_version() == version
        hf, state = hf_state(model_dir, seed=30)
        _update(llm, addresses, state)  # the session is still open: a complete push heals it
        llm.finish_weight_update("healed")
        assert llm.get_weight_version() == "healed"
        assert vllm_greedy(llm) == hf_greedy(hf)
    finally:
        llm.shutdown_weight_transfer_engine()


@pytest.mark.parametrize(
    "init_info, expect",
    [
        ({"transport": "zmq", "adresses": ["ipc:///tmp/x"]}, "no field 'adresses'"),
        ({"transport": "tcp", "addresses": ["ipc:///tmp/x"]}, "unknown transport 'tcp'"),
        ({"transport": "zmq", "addresses": ["ipc:///tmp/x"], "options": {"devise": "cpu"}}, "no option 'devise'"),
    ],
)
def test_bad_init_info_is_refused_naming_the_field(engine, init_info, expect):
    llm = engine[0]
    with pytest.raises(Exception, match=re.escape(expect)):
        llm.init_weight_transfer_engine({"init_info": init_info})


def test_update_with_no_push_times_out_and_ends_the_session(engine, tmp_path):
    llm = engine[0]
    llm.init_weight_transfer_engine({"init_info": {"transport": "zmq", "addresses": _addresses(tmp_path)}})
    try:
        llm.start_weight_update()
        with pytest.raises(Exception, match="no push began within 0.5 s"):
            llm.update_weights({"update_info": {"timeout": 0.5}})
        llm.start_weight_update()  # vLLM ended the session when update_weights raised
        with pytest.raises(Exception, match="update_info.timeout must be a positive number"):
            llm.update_weights({"update_info": {"timeout": -1}})
    finally:
        llm.shutdown_weight_transfer_engine()


def _doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_documented_examples_run_as_written(engine):
    """docs/vllm_transfer.md: the engine block starts what the fixture started; the trainer
    block and the raw-API block run as written with ``llm``, ``state`` and ``scales`` defined."""
    llm, _, model_dir = engine
    blocks = _doc_blocks()
    assert len(blocks) == 3 and 'weight_transfer_config={"backend": "refit"}' in blocks[0]
    for i, seed in ((1, 31), (2, 32)):
        hf, state = hf_state(model_dir, seed=seed)
        namespace: dict[str, Any] = {"llm": llm, "state": state, "scales": {"model.layers.0.self_attn.k_scale": torch.tensor(0.5)}}
        exec(compile(blocks[i], f"{DOC}:block{i}", "exec"), namespace)
        assert vllm_greedy(llm) == hf_greedy(hf), f"block {i}"
