"""What a caller can get wrong at the public entry points: each is a RefitError naming the
option or tensor and the fix, raised before anything is sent or joined."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from refit import PlanError, RefitError, Refitter, TransportError
from refit.receiver import RefitReceiver

pytestmark = pytest.mark.integration  # sockets and threads for some cases


@pytest.mark.parametrize("bad", [None, "5", 0, -1, float("nan"), float("inf"), True])
def test_refitter_timeout_must_be_positive_seconds(bad: object) -> None:
    with pytest.raises(RefitError, match="timeout must be a positive number of seconds"):
        Refitter("zmq", peers=["tcp://127.0.0.1:1"], timeout=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["5", 0, -2.0])
def test_receiver_timeouts_must_be_positive_seconds(bad: object) -> None:
    with pytest.raises(RefitError, match="push_timeout must be"):
        RefitReceiver({"a": torch.zeros(1)}, "zmq", push_timeout=bad)  # type: ignore[arg-type]
    with RefitReceiver({"a": torch.zeros(1)}, "zmq") as rx:
        with pytest.raises(RefitError, match="timeout must be a positive number of seconds \\(or None"):
            rx.receive(timeout=bad)  # type: ignore[arg-type]
        with pytest.raises(RefitError, match="poll must be"):
            rx.serve(poll=bad)  # type: ignore[arg-type]


def test_unknown_options_name_the_option_and_list_the_known_ones() -> None:
    with pytest.raises(RefitError, match="transport 'zmq' takes no option 'bogus'; its options: peers, timeout"):
        Refitter("zmq", peers=["tcp://127.0.0.1:1"], bogus=1)
    with pytest.raises(RefitError, match="the 'nccl' receiver takes no option 'bogus'; its options: address, name, device, host"):
        RefitReceiver({"a": torch.zeros(1)}, "nccl", bogus=1)
    with pytest.raises(RefitError, match="num_buffers must be an int"):
        Refitter("local", target={}, num_buffers=True)


def test_empty_push_is_refused() -> None:
    target = {"a": torch.zeros(2)}
    with Refitter("local", target=target) as r, pytest.raises(PlanError, match="nothing to push"):
        r.push({})


@pytest.mark.parametrize("name", ["w" * 4097, "a\x00b"])
def test_names_too_long_or_with_nul_are_refused_on_the_sender(name: str) -> None:
    with Refitter("local", target={name: torch.zeros(2)}) as r, pytest.raises(PlanError, match="at most 4096 characters and no NUL"):
        r.push({name: torch.ones(2)})


def test_a_name_of_exactly_the_limit_travels() -> None:
    name = "w" * 4096
    target = {name: torch.zeros(2)}
    with RefitReceiver(target, "zmq") as rx:
        t = threading.Thread(target=rx.receive, kwargs={"timeout": 20}, daemon=True)
        t.start()
        with Refitter("zmq", peers=[rx.info()], timeout=20) as r:  # an info() dict is a peer too
            r.push({name: torch.ones(2)})
        t.join(20)
    assert torch.equal(target[name], torch.ones(2))


@pytest.mark.parametrize("transport", ["zmq", "nccl", "cuda_ipc"])
def test_peers_in_any_accepted_form_or_a_clear_error(transport: str) -> None:
    opts: dict[str, Any] = {"device": "cpu"} if transport != "zmq" else {}
    for bad in ([{"nope": 1}], [3], 5):
        with pytest.raises(TransportError, match="each peer is a receiver's address or its info|peers must be a list"):
            Refitter(transport, peers=bad, **opts)


def test_bind_to_an_address_not_of_this_host_is_a_transport_error() -> None:
    with pytest.raises(TransportError, match="cannot bind 'tcp://192.0.2.1:\\*'"):
        RefitReceiver({"a": torch.zeros(1)}, "zmq", address="tcp://192.0.2.1:*")


def test_serve_after_stop_serves_again_and_after_close_raises() -> None:
    target = {"a": torch.zeros(2)}
    rx = RefitReceiver(target, "zmq")
    rx.stop()
    t = threading.Thread(target=rx.serve, kwargs={"max_pushes": 1, "poll": 0.2}, daemon=True)
    t.start()
    with Refitter("zmq", peers=[rx.info()["address"]], timeout=20) as r:
        r.push({"a": torch.ones(2)})
    t.join(20)
    assert not t.is_alive() and torch.equal(target["a"], torch.ones(2))
    rx.close()
    with pytest.raises(RefitError, match="is closed"):
        rx.serve()


class _Engine:
    """An engine handle that records whether its workers were told to join."""

    def __init__(self) -> None:
        self.opened = False

    def open(self, transport: str, options: object) -> list[dict[str, object]]:
        self.opened = True
        return [{"address": "tcp://127.0.0.1:1"}]

    def begin_receive(self, timeout: float) -> object:
        raise AssertionError("no push expected")

    def close(self) -> None:
        pass


def test_transport_seam_errors_name_what_is_available() -> None:
    with pytest.raises(RefitError, match="unknown transport 'zmqq'; available: local, zmq, cuda_ipc, nccl"):
        Refitter("zmqq")
    with pytest.raises(RefitError, match="transport 'local' has no receiver half .*receivers use: zmq, cuda_ipc, nccl"):
        RefitReceiver({"a": torch.zeros(1)}, "local")
    engine = _Engine()
    with pytest.raises(RefitError, match="transport 'zmq' takes no option 'bogus'"):
        Refitter("zmq", engine=engine, bogus=1)  # type: ignore[arg-type]
    with pytest.raises(RefitError, match="the 'zmq' receiver \\(receiver_options\\) takes no option 'bogus'"):
        Refitter("zmq", engine=engine, receiver_options={"bogus": 1})  # type: ignore[arg-type]
    assert not engine.opened  # refused before any worker was told to join
