"""Versions only increase on a receiver unless it is reset explicitly: a stale version is
refused at the handshake (nothing loaded) naming both versions and the fix; a Refitter that
numbers its pushes asks the receivers where they are first, so a restarted trainer just works
while two trainers fighting over one engine are caught."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from refit import RefitError, Refitter, ResolveError
from refit.load import Loader
from refit.receiver import RefitReceiver
from refit.resolve import TensorsResolver

TRANSPORTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # receiver and sender options
    "zmq": ({}, {}),
    "cuda_ipc": ({"device": "cpu"}, {"device": "cpu"}),
    "nccl": ({"device": "cpu"}, {"device": "cpu", "backend": "gloo"}),
}


@pytest.mark.unit
def test_a_stale_version_is_refused_before_anything_loads_until_reset() -> None:
    target = {"a": torch.zeros(4)}
    loader = Loader(TensorsResolver(target), name="rx")
    Refitter("local", target=loader).push({"a": torch.ones(4)}, version=5)
    with pytest.raises(ResolveError) as err:
        Refitter("local", target=loader).push({"a": torch.full((4,), 2.0)}, version=3)
    text = str(err.value)
    assert "version 3 is not greater than rx's committed version 5" in text
    assert "omit version=" in text and "reset_version()" in text
    assert torch.equal(target["a"], torch.ones(4)) and loader.version == 5 and not loader.torn
    with pytest.raises(ResolveError, match="committed version 5"):  # equal is stale too
        Refitter("local", target=loader).push({"a": torch.full((4,), 2.0)}, version=5)
    loader.reset_version()
    Refitter("local", target=loader).push({"a": torch.full((4,), 3.0)}, version=3)
    assert torch.equal(target["a"], torch.full((4,), 3.0)) and loader.version == 3


@pytest.mark.unit
def test_version_options_are_checked() -> None:
    loader = Loader(TensorsResolver({"a": torch.zeros(1)}))
    for bad in (0, -1, True, 1.5, 2**63):
        with pytest.raises(RefitError, match=r"first_version must be an int in \[1, 2\*\*63\)"):
            Refitter("local", target=loader, first_version=bad)  # type: ignore[arg-type]  # 1.5 on purpose: refused
        with pytest.raises(RefitError, match=r"version must be an int in \[1, 2\*\*63\)"):
            Refitter("local", target=loader).push({"a": torch.ones(1)}, version=bad)  # type: ignore[arg-type]  # likewise
    with pytest.raises(RefitError, match="reset_version takes an int"):
        loader.reset_version(-1)


@pytest.mark.unit
def test_first_version_numbers_from_there_and_explicit_versions_move_the_count_on() -> None:
    loader = Loader(TensorsResolver({"a": torch.zeros(1)}))
    with Refitter("local", target=loader, first_version=10) as r:
        assert [r.push({"a": torch.ones(1)}).version for _ in range(2)] == [10, 11]
        assert r.push({"a": torch.ones(1)}, version=20).version == 20
        assert r.push({"a": torch.ones(1)}).version == 21


@contextmanager
def serving(transport: str, target: dict[str, torch.Tensor]) -> Iterator[RefitReceiver]:
    rx = RefitReceiver(target, transport, name="rx", **TRANSPORTS[transport][0])
    t = threading.Thread(target=rx.serve, kwargs={"poll": 0.2}, daemon=True)
    t.start()
    try:
        yield rx
    finally:
        rx.stop()
        t.join(10)
        rx.close()


def refitter(transport: str, rx: RefitReceiver, **kw: Any) -> Refitter:
    return Refitter(transport, peers=[rx.info()], timeout=20, **TRANSPORTS[transport][1], **kw)


@pytest.mark.integration
@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_a_restarted_trainer_continues_and_two_trainers_are_caught(transport: str) -> None:
    target = {"w": torch.zeros(64)}
    with serving(transport, target) as rx:
        with refitter(transport, rx) as first:
            assert [first.push({"w": torch.full((64,), float(i))}).version for i in (1, 2, 3)] == [1, 2, 3]
            # a restarted trainer: a new Refitter, no version= given, numbers after the receiver
            with refitter(transport, rx) as second:
                assert second.push({"w": torch.full((64,), 4.0)}).version == 4
            assert rx.version == 4 and torch.equal(target["w"], torch.full((64,), 4.0))
            # the first trainer is still at 4 in its own count: it is caught, nothing loads (on
            # nccl the second trainer's group replaced the first's, which is refused first)
            caught = "version 4 is not greater than rx's committed version 4.*second trainer"
            if transport == "nccl":
                caught = f"{caught}|rx is not a member of group"
            with pytest.raises(ResolveError, match=caught):
                first.push({"w": torch.full((64,), -1.0)})
        assert rx.version == 4 and not rx.torn and torch.equal(target["w"], torch.full((64,), 4.0))
        # an explicit older version is refused until the receiver is reset on purpose
        with refitter(transport, rx) as third:
            with pytest.raises(ResolveError, match="version 2 is not greater than rx's committed version 4"):
                third.push({"w": torch.full((64,), 5.0)}, version=2)
            rx.reset_version()
            assert third.push({"w": torch.full((64,), 6.0)}, version=2).version == 2
        assert rx.version == 2 and torch.equal(target["w"], torch.full((64,), 6.0))
