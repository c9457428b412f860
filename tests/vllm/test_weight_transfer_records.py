"""The records of refit's vLLM weight-transfer backend, without an engine: what the workers and
the trainer accept, every refusal a RefitError naming the field, and the registration (by
import, idempotent, and as the ``vllm.general_plugins`` entry point vLLM loads in its
spawned processes)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed")
pytest.importorskip("zmq", reason="pyzmq is not installed")
pytestmark = pytest.mark.unit

from refit.errors import RefitError  # noqa: E402


def test_worker_init_info_parses_and_refuses_naming_the_field():
    from refit.adapters.vllm_transfer import RefitInitInfo

    info = RefitInitInfo.parse({"transport": "nccl", "addresses": ["ipc:///tmp/a", "ipc:///tmp/b"], "options": {"device": "cpu"}})
    assert (info.transport, info.addresses, info.options) == ("nccl", ["ipc:///tmp/a", "ipc:///tmp/b"], {"device": "cpu"})
    bad = [
        ([], "init_info must be a dict"),
        ({"transport": "zmq"}, "init_info lacks addresses"),
        ({"transport": "zmq", "addresses": [], "x": 1}, "init_info has no field 'x'"),
        ({"transport": "local", "addresses": ["ipc:///tmp/a"]}, "transport 'local' has no receiver half"),
        ({"transport": "zmq", "addresses": []}, "init_info.addresses must be a non-empty list"),
        ({"transport": "zmq", "addresses": ["localhost:5555"]}, "init_info.addresses holds 'localhost:5555'"),
        ({"transport": "zmq", "addresses": ["ipc:///tmp/a", "ipc:///tmp/a"]}, "repeats an address"),
        ({"transport": "zmq", "addresses": ["ipc:///tmp/a"], "options": {"address": "tcp://*:1"}}, "may not set address"),
        ({"transport": "cuda_ipc", "addresses": ["ipc:///tmp/a"], "options": {"backend": "gloo"}}, "no option 'backend'"),
    ]
    for data, expect in bad:
        with pytest.raises(RefitError, match=expect):
            RefitInitInfo.parse(data)


def test_update_info_parses_and_refuses_naming_the_field():
    from refit.adapters.vllm_transfer import RefitUpdateInfo

    assert (RefitUpdateInfo.parse({}).timeout, RefitUpdateInfo.parse({"timeout": 5, "push_timeout": 2}).push_timeout) == (120.0, 2.0)
    for data, expect in [
        ({"timeout": 0}, "update_info.timeout must be a positive"),
        ({"timeout": True}, "update_info.timeout must be a positive"),
        ({"push_timeout": float("inf")}, "update_info.push_timeout must be a positive"),
        ({"names": ["a"]}, "update_info has no field 'names'"),
    ]:
        with pytest.raises(RefitError, match=expect):
            RefitUpdateInfo.parse(data)


def test_trainer_init_info_refuses_naming_the_field():
    from refit.adapters.vllm import RefitTrainerInitInfo

    assert RefitTrainerInitInfo(rank=0).backend == "refit" and RefitTrainerInitInfo(rank=1).is_sender is False
    cases: list[tuple[dict[str, Any], str]] = [
        ({"rank": -1}, "rank must be"),
        ({"rank": 0, "transport": "ib"}, "unknown transport 'ib'"),
        ({"rank": 0, "workers": 0}, "workers must be"),
        ({"rank": 0, "timeout": -3}, "RefitTrainerInitInfo.timeout must be"),
        ({"rank": 0, "options": ["gloo"]}, "RefitTrainerInitInfo.options must be a dict"),
        ({"rank": 0, "addresses": ["ipc:///a", "ipc:///a"]}, "repeats an address"),
        ({"rank": 0, "receiver_options": {"events": 2}}, "no option 'events'"),  # zmq receivers take no events
        ({"rank": 0, "transport": "nccl", "options": {"backnd": "gloo"}}, "no option 'backnd'"),
        ({"rank": 0, "options": {"peers": ["ipc:///a"]}}, "may not set peers"),
    ]
    for kwargs, expect in cases:
        with pytest.raises(RefitError, match=expect):
            RefitTrainerInitInfo(**kwargs)


def test_registration_is_idempotent_and_an_entry_point():
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory, WeightTransferTrainerFactory

    from refit.adapters.vllm import RefitTrainerInitInfo, RefitTrainerWeightTransferEngine, register

    register()
    register()  # again: no error
    # the factory's trainer side dispatches on the init info's backend
    calls: list[str] = []

    class Client:  # records the control-plane calls; rank 1 must make none
        def init_weight_transfer_engine(self, init_info: dict) -> None:
            calls.append("init")

        def start_weight_update(self) -> None:
            calls.append("start")

        def update_weights(self, update_info: dict | list[dict]) -> None:
            calls.append("update")

        def finish_weight_update(self, weight_version: str | None = None) -> None:
            calls.append("finish")

    engine = WeightTransferTrainerFactory.trainer_init(RefitTrainerInitInfo(rank=1), client=Client())  # rank 1: no rendezvous
    assert isinstance(engine, RefitTrainerWeightTransferEngine) and engine.refitter is None and calls == []
    with pytest.raises(ValueError, match="already registered"):  # vLLM's own refusal is still in place for others
        WeightTransferEngineFactory.register_engine("refit", "x", "y")
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("refit") == "refit.adapters.vllm_transfer:register", plugins


def test_vllms_plugin_loader_registers_refit_in_a_fresh_process():
    """What vLLM's engine core and spawned workers run at start (``load_general_plugins``)
    makes ``refit`` known in a process that never imported refit itself."""
    code = (
        "import sys\n"
        "from vllm.plugins import load_general_plugins\n"
        "from vllm.distributed.weight_transfer import WeightTransferEngineFactory, WeightTransferTrainerFactory\n"
        "assert not any(m.startswith('refit') for m in sys.modules)\n"
        "load_general_plugins()\n"
        "try:\n"
        "    WeightTransferEngineFactory.register_engine('refit', 'x', 'y')\n"
        "except ValueError as exc:\n"
        "    print('worker:', exc)\n"
        "from refit.adapters.vllm_transfer_trainer import RefitTrainerInitInfo\n"
        "engine = WeightTransferTrainerFactory.trainer_init(RefitTrainerInitInfo(rank=1), client=None)\n"
        "print('trainer:', type(engine).__name__)\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.stdout.splitlines() == [
        "worker: Weight transfer engine 'refit' is already registered.",
        "trainer: RefitTrainerWeightTransferEngine",
    ], proc.stderr[-2000:]
