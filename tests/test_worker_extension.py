"""The vLLM worker extension's RPC methods return failures as plain values (no vLLM needed)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from refit import ResolveError, TransportError
from refit.adapters.vllm import RefitWorkerExtension, raise_errors
from refit.load import Loader
from refit.meta import Role
from refit.plan import PlanEntry, plan
from refit.resolve import TensorsResolver
from refit.wire import manifest_to_wire

pytestmark = pytest.mark.unit


def worker(target: dict[str, torch.Tensor], rank: int = 1) -> RefitWorkerExtension:
    ext = RefitWorkerExtension()
    ext.rank = rank  # type: ignore[attr-defined]
    ext._refit_loader_obj = Loader(TensorsResolver(target), name=f"vllm-worker-{rank}")
    return ext


def test_failures_come_back_as_values_naming_the_worker() -> None:
    reply = worker({}).refit_receive(1.0)
    assert reply["error"]["kind"] == "TransportError" and reply["error"]["worker"] == "vllm-worker-1"
    assert "call refit_open first" in reply["error"]["message"]
    with pytest.raises(TransportError, match=r"\[vllm-worker-1\] TransportError: .*call refit_open first"):
        raise_errors([{}, reply])


def test_refusal_is_a_resolve_error_listing_the_problems() -> None:
    m = plan([PlanEntry("missing", (2,), torch.float32, Role.WEIGHT)], bucket_bytes=1 << 20)
    reply = worker({}).refit_prepare(manifest_to_wire(m), 1)
    assert reply["error"]["kind"] == "ResolveError" and any("missing" in p for p in reply["error"]["problems"])
    with pytest.raises(ResolveError) as info:
        raise_errors([reply])
    assert info.value.problems and "missing" in info.value.problems[0]


def test_failed_apply_aborts_the_prepared_push() -> None:
    target = {"w": torch.zeros(4)}
    ext = worker(target)
    m = plan([PlanEntry("w", (4,), torch.float32, Role.WEIGHT)], bucket_bytes=1 << 20)
    assert ext.refit_prepare(manifest_to_wire(m), 1) == {}
    reply: dict[str, Any] = ext.refit_apply([b"\x00"])  # one byte: not the bucket the manifest announced
    assert "error" in reply and not ext._refit_loader_obj.active
    assert torch.equal(target["w"], torch.zeros(4))
