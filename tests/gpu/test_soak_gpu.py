"""Soak on the GPU (issue 19): 1,000 pushes of a small CUDA state over ``local`` and ``zmq``
(CUDA source, CUDA target: pinned staging both ways), sender and receiver in one process; from
push 100 to push 1,000 neither torch's reserved CUDA memory nor the device's free memory, file
descriptors or threads may grow, and the last push must land bit for bit. (``cuda_ipc`` cannot
open its own process's handles and ``nccl`` needs two GPUs: their soaks are in
``test_cuda_ipc_gpu.py`` and ``test_nccl_multi_gpu.py``.)"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from refit import Refitter
from refit.digest import digest
from refit.receiver import RefitReceiver
from tests.procs import open_fds
from tests.test_soak import MARK, PUSHES, threads

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def cuda_state(i: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    state = {"a.weight": torch.full((256, 128), float(i), device="cuda"), "b.weight": torch.arange(4096, dtype=torch.bfloat16, device="cuda") + i}
    return state, {"a.k_scale": torch.tensor(0.5 + i % 7, device="cuda")}


def marks() -> tuple[int, int, int, int]:
    torch.cuda.synchronize()
    return torch.cuda.memory_reserved(), torch.cuda.mem_get_info()[0], open_fds(), threads()


def soak(push: Callable[[int], None]) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    before = after = marks()
    for i in range(1, PUSHES + 1):
        push(i)
        if i == MARK:
            before = marks()
    after = marks()
    return before, after


def check(name: str, before: tuple[int, int, int, int], after: tuple[int, int, int, int]) -> None:
    print(f"{name}: reserved, free, fds, threads at push {MARK}: {before}, at {PUSHES}: {after}")
    assert after[0] <= before[0], f"{name}: torch's reserved CUDA memory grew from {before[0]} to {after[0]}"
    assert after[1] >= before[1] - (2 << 20), f"{name}: the device's free memory fell by {(before[1] - after[1]) >> 20} MiB"
    assert after[2] <= before[2] and after[3] <= before[3], f"{name}: fds or threads grew"


def test_a_thousand_local_pushes_on_the_gpu_leak_nothing() -> None:
    s0, c0 = cuda_state(0)
    target = {k: torch.zeros_like(v) for k, v in {**s0, **c0}.items()}
    with Refitter("local", target=target, bucket_bytes=1 << 16) as r:

        def push(i: int) -> None:
            assert r.push(*cuda_state(i)).version == i

        before, after = soak(push)
    assert digest(target) == digest({**cuda_state(PUSHES)[0], **cuda_state(PUSHES)[1]})
    check("local", before, after)


def test_a_thousand_zmq_pushes_between_gpu_tensors_leak_nothing() -> None:
    s0, c0 = cuda_state(0)
    target = {k: torch.zeros_like(v) for k, v in {**s0, **c0}.items()}
    rx = RefitReceiver(target, "zmq", name="rx")
    t = threading.Thread(target=rx.serve, kwargs={"max_pushes": PUSHES, "poll": 0.5}, daemon=True)
    t.start()
    try:
        with Refitter("zmq", peers=[rx.info()], timeout=30, bucket_bytes=1 << 16) as r:

            def push(i: int) -> None:
                assert r.push(*cuda_state(i)).version == i

            before, after = soak(push)
        t.join(30)
        assert not t.is_alive() and rx.last_error is None, rx.last_error
        assert rx.version == PUSHES and not rx.torn
        assert digest(target) == digest({**cuda_state(PUSHES)[0], **cuda_state(PUSHES)[1]})
    finally:
        rx.stop()
        t.join(10)
        rx.close()
    check("zmq", before, after)
