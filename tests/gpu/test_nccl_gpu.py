"""``nccl`` on the accelerator machine: what one GPU can run, and more where more GPUs exist.

NCCL wants one GPU per rank (two ranks of one communicator on the same device fail at init), so
on one GPU this file checks: the CuPy communicator's set-up, broadcast and teardown in a world
of one; that work runs on the communicator's own stream, ordered after the caller's stream;
that the watchdog aborts a broadcast that passes its timeout (in a child process, since an
aborted communicator may leave the device unusable); ``backend="auto"`` choosing NCCL; and the
whole transport with CUDA buffers on both sides over gloo (device pack / unpack, two processes
on one GPU). The NCCL push between GPUs is ``test_nccl_multi_gpu.py``.

Run: ``pytest -m gpu tests/gpu/test_nccl_gpu.py`` (needs CUDA and cupy-cuda12x or -13x).
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from typing import Any

import pytest
import torch

from refit.errors import TransportError
from refit.transports.collective import Backend, Rendezvous, StoreServer, choose_backend, cupy_nccl, new_group_id
from refit.transports.join import connect
from tests.test_nccl_gloo import expected_target, run_world

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

needs_cupy = pytest.mark.skipif(cupy_nccl() is None, reason="needs CuPy with NCCL (cupy-cuda12x or cupy-cuda13x)")
BUCKET = 1 << 20


def world_of_one(timeout: float = 30.0) -> tuple[StoreServer, Any]:
    """A one-rank NCCL communicator on the current device."""
    nccl = cupy_nccl()
    store = StoreServer("127.0.0.1", timeout)
    uid = bytes(b & 0xFF for b in nccl.get_unique_id())  # type: ignore[union-attr]
    rdv = Rendezvous(backend=Backend.NCCL, group=new_group_id(), rank=0, world=1, host="127.0.0.1", port=store.port, unique_id=uid, timeout=timeout)
    assert store.store is not None  # set until close()
    return store, connect(rdv, store.store, 0, torch.device("cuda", torch.cuda.current_device()))


def test_auto_picks_nccl_for_cuda_buffers_when_cupy_present() -> None:
    expected = Backend.NCCL if cupy_nccl() is not None else Backend.GLOO
    assert choose_backend("auto", torch.device("cuda")) is expected
    assert choose_backend("auto", torch.device("cpu")) is Backend.GLOO


@needs_cupy
def test_nccl_world_of_one_setup_broadcast_teardown() -> None:
    for _ in range(3):  # set-up and teardown repeat cleanly
        store, comm = world_of_one()
        try:
            assert comm.stream.cuda_stream != torch.cuda.default_stream().cuda_stream  # never the legacy stream
            buf = torch.arange(1 << 20, device="cuda", dtype=torch.int32).view(torch.uint8)
            want = buf.clone()
            # a producer on the caller's stream must finish before the broadcast reads the buffer
            buf.add_(0)
            comm.broadcast(buf, "bucket 0 of 1").wait()
            assert torch.equal(buf, want)
            assert comm.failure is None
        finally:
            comm.close()
            store.close()
        assert comm.comm is None


def _watchdog_child(q: Any) -> None:
    try:
        store, comm = world_of_one(timeout=0.5)
        buf = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda")
        torch.cuda._sleep(int(4e9))  # keeps the caller's stream busy ~2 s: the broadcast waits behind it
        t0 = time.monotonic()
        try:
            comm.broadcast(buf, "bucket 7 of 9").wait()
            q.put(("no error", time.monotonic() - t0))
        except TransportError as exc:
            q.put(("TransportError", str(exc), time.monotonic() - t0))
    except BaseException:
        q.put(("crash", traceback.format_exc()))


@needs_cupy
def test_nccl_watchdog_aborts_a_late_broadcast() -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_watchdog_child, args=(q,), daemon=True)
    p.start()
    try:
        got = q.get(timeout=90)
    finally:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    assert got[0] == "TransportError", got
    assert "bucket 7 of 9" in got[1] and "0.5 s" in got[1], got[1]


def test_gloo_backend_with_cuda_buffers_on_one_gpu() -> None:
    """Pack on the device, broadcast (gloo stages through the host), unpack on the device."""
    rxs = [{"name": "rx0", "kind": "mixed", "pushes": 3, "device": "cuda:0"}]
    out = run_world(rxs, {"pushes": [("mixed", v, ()) for v in (1, 2, 3)], "timeout": 60.0, "device": "cuda:0"}, deadline_s=180.0)
    assert [r[:2] for r in out["sender"]["results"]] == [("ok", v) for v in (1, 2, 3)]
    assert [r[3] for r in out["rx0"]["results"]] == [expected_target("mixed", v) for v in (1, 2, 3)]
