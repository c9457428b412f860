"""A push in progress hears only its sender: stray or hostile traffic to a receiver's control
socket (garbage, a pickle, a well-formed Hello of another sender) is answered and dropped, on
every transport that has a control socket, and the push lands bit for bit. One of the pickles
is live (unpickling it creates a directory): it must never be unpickled."""

from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import zmq

from refit import Refitter
from refit.digest import digest
from refit.receiver import RefitReceiver

pytestmark = pytest.mark.integration

JUNK = [
    [b"\x00garbage"],
    [pickle.dumps({"type": "finish", "push_id": 1})],
    [msgpack.packb({"type": "abort", "push_id": 0, "reason": "forged"})],
    [b""],
]

TRANSPORTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # receiver and sender options
    "zmq": ({}, {}),
    "cuda_ipc": ({"device": "cpu"}, {"device": "cpu"}),
    "nccl": ({"device": "cpu"}, {"device": "cpu", "backend": "gloo"}),
}


class _Trap:
    """Unpickling this runs ``os.mkdir(path)``: what an attacker's pickle would do, harmlessly."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (self.path,))


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.w": torch.randn(64, 256, generator=g) for i in range(12)}  # 12 buckets of 64 KiB


def forged_hello(push_id: int) -> bytes:
    return msgpack.packb({"type": "hello", "push_id": push_id, "version": 99, "digest": "0" * 64, "manifest": None, "num_buffers": 2, "extra": b""})


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_stray_traffic_neither_ends_nor_disturbs_a_push(transport: str, tmp_path: Path) -> None:
    rx_opts, tx_opts = TRANSPORTS[transport]
    pickle.loads(pickle.dumps(_Trap(str(tmp_path / "proof"))))
    assert (tmp_path / "proof").is_dir(), "the trap pickle is live"
    junk = [*JUNK, [pickle.dumps(_Trap(str(tmp_path / "pwned")))]]
    target = {k: torch.zeros_like(v) for k, v in state(0).items()}
    rx = RefitReceiver(target, transport, name="rx", **rx_opts)
    address = rx.info()["address"]
    # serve() goes on after a failed push attempt: a stray Hello read while no push is in
    # progress (nccl reads its control socket only between pushes) is such an attempt
    t = threading.Thread(target=rx.serve, kwargs={"max_pushes": 2, "poll": 0.2}, daemon=True)
    t.start()
    stray: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    stray.setsockopt(zmq.LINGER, 0)
    stray.connect(address)
    for frames in junk:  # while the receiver waits for a push
        stray.send_multipart(frames)
    answers = 0

    def meddle(done: int, total: int) -> None:  # while buckets stream
        nonlocal answers
        if done in (3, 7):
            for frames in [*junk, [forged_hello(12345)]]:
                stray.send_multipart(frames)
            while stray.poll(50):
                stray.recv()
                answers += 1

    try:
        with Refitter(transport, peers=[address], bucket_bytes=64 << 10, timeout=30, progress=meddle, **tx_opts) as r:
            for seed in (1, 2):
                pushed = state(seed)
                report = r.push(pushed)
                assert report.version == seed and report.buckets == 12
                assert digest(target) == digest(pushed), f"{transport}: push {seed} not bit-exact"
        t.join(30)
        assert not t.is_alive() and rx.version == 2 and not rx.torn
        assert answers >= 2, "the stray sender should hear why it was dropped"
        assert not (tmp_path / "pwned").exists(), f"{transport}: a receiver unpickled a stray message"
    finally:
        stray.close()
        rx.close()
