"""Soak: 1,000 pushes of a small state over ``zmq``, ``cuda_ipc`` (shared memory) and the
``nccl`` stream (gloo), sender and receiver in one process, every push checked bit for bit at
the end and its version counted; between push 100 and push 1,000 the process may not gain file
descriptors, threads (native ones included) or more than a few MiB of RSS."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
import torch

from refit import Refitter
from refit.digest import digest
from refit.receiver import RefitReceiver
from tests.procs import open_fds, rss_bytes

pytestmark = pytest.mark.integration

PUSHES, MARK = 1000, 100
TRANSPORTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # receiver and sender options
    "zmq": ({}, {}),
    "cuda_ipc": ({"device": "cpu"}, {"device": "cpu"}),
    "nccl": ({"device": "cpu"}, {"device": "cpu", "backend": "gloo"}),
}


def threads() -> int:
    """Native threads of this process (gloo's and libzmq's included)."""
    return len(os.listdir("/proc/self/task"))


def small_state(i: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    state = {"a.weight": torch.full((64, 32), float(i)), "b.weight": torch.arange(256, dtype=torch.bfloat16) + i, "step": torch.tensor(i)}
    return state, {"a.k_scale": torch.tensor(0.5 + i % 7)}


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_a_thousand_pushes_leak_nothing(transport: str) -> None:
    rx_opts, tx_opts = TRANSPORTS[transport]
    s0, c0 = small_state(0)
    target = {k: torch.zeros_like(v) for k, v in {**s0, **c0}.items()}
    rx = RefitReceiver(target, transport, name="rx", **rx_opts)
    t = threading.Thread(target=rx.serve, kwargs={"max_pushes": PUSHES, "poll": 0.5}, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        with Refitter(transport, peers=[rx.info()], timeout=30, bucket_bytes=1 << 14, **tx_opts) as r:
            for i in range(1, PUSHES + 1):
                state, scales = small_state(i)
                assert r.push(state, scales).version == i
                if i == MARK:
                    before = (open_fds(), threads(), rss_bytes())
            after = (open_fds(), threads(), rss_bytes())
        t.join(30)
        assert not t.is_alive() and rx.last_error is None, rx.last_error
        assert rx.version == PUSHES and not rx.torn and digest(target) == digest({**state, **scales})
    finally:
        rx.stop()
        t.join(10)
        rx.close()
    took = time.monotonic() - t0
    print(f"{transport}: {PUSHES} pushes in {took:.1f} s; fds, threads, rss at push {MARK}: {before}, at {PUSHES}: {after}")
    assert after[0] <= before[0], f"{transport}: file descriptors grew from {before[0]} to {after[0]}"
    assert after[1] <= before[1], f"{transport}: threads grew from {before[1]} to {after[1]}"
    assert after[2] - before[2] < 8 << 20, f"{transport}: RSS grew by {(after[2] - before[2]) >> 20} MiB"
