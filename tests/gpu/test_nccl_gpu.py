"""``nccl`` on the accelerator machine: what one GPU can run, and more where more GPUs exist.

NCCL wants one GPU per rank (two ranks of one communicator on the same device fail at init), so
on one GPU this file checks: the CuPy communicator's set-up, broadcast and teardown in a world
of one; that work runs on the communicator's own stream, ordered after the caller's stream;
that the watchdog aborts a broadcast that passes its timeout (in a child process, since an
aborted communicator may leave the device unusable); ``backend="auto"`` choosing NCCL; and the
whole transport with CUDA buffers on both sides over gloo (device pack / unpack, two processes
on one GPU). With two or more GPUs the full NCCL push runs too.

Run: ``pytest -m gpu tests/gpu/test_nccl_gpu.py`` (needs CUDA and cupy-cuda12x or -13x).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback
from typing import Any

import pytest
import torch

from refit.demo import digest
from refit.errors import TransportError
from refit.transports.collective import Backend, Rendezvous, StoreServer, choose_backend, connect, cupy_nccl, new_group_id
from tests.procs import zeros_like
from tests.test_nccl_gloo import expected_target, make_state

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


def _receiver(cfg: dict[str, Any], q: Any) -> None:
    from refit.receiver import RefitReceiver

    try:
        torch.cuda.set_device(cfg["device"])
        state, scales = make_state("mixed", 0)
        target = {k: zeros_like(v).to(cfg["device"]) for k, v in {**state, **scales}.items()}
        with RefitReceiver(target, "nccl", name=cfg["name"], device=cfg["device"]) as rx:
            q.put(("info", cfg["name"], rx.info()))
            out = []
            for _ in range(cfg["pushes"]):
                report = rx.receive(timeout=120)
                out.append((report.version, digest(target)))
            q.put(("done", cfg["name"], out))
    except BaseException:
        q.put(("done", cfg["name"], traceback.format_exc()))


def _sender(cfg: dict[str, Any], addresses: list[str], q: Any) -> None:
    from refit.api import Refitter

    try:
        torch.cuda.set_device(cfg["device"])
        out = []
        with Refitter("nccl", peers=addresses, backend=cfg["backend"], device=cfg["device"], bucket_bytes=BUCKET, timeout=60) as r:
            for seed in range(1, cfg["pushes"] + 1):
                state, scales = make_state("mixed", seed)
                state = {k: v.to(cfg["device"]) for k, v in state.items()}
                scales = {k: v.to(cfg["device"]) for k, v in scales.items()}
                out.append(r.push(state, scales).version)
        q.put(("done", "sender", out))
    except BaseException:
        q.put(("done", "sender", traceback.format_exc()))


def run_push_world(backend: str, sender_device: str, rx_devices: list[str], pushes: int = 3) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = []
    try:
        for i, dev in enumerate(rx_devices):
            p = ctx.Process(target=_receiver, args=({"name": f"rx{i}", "device": dev, "pushes": pushes}, q), daemon=True)
            p.start()
            procs.append(p)
        infos: dict[str, Any] = {}
        while len(infos) < len(rx_devices):
            kind, name, payload = q.get(timeout=120)
            if kind == "done":
                pytest.fail(f"{name}: {payload}")
            infos[name] = payload
        addresses = [infos[f"rx{i}"]["address"] for i in range(len(rx_devices))]
        cfg = {"backend": backend, "device": sender_device, "pushes": pushes}
        sp = ctx.Process(target=_sender, args=(cfg, addresses, q), daemon=True)
        sp.start()
        procs.append(sp)
        done: dict[str, Any] = {}
        while len(done) < len(rx_devices) + 1:
            try:
                kind, name, payload = q.get(timeout=180)
            except queue.Empty:
                pytest.fail(f"timed out; reports from {sorted(done)}")
            done[name] = payload
        for name, payload in done.items():
            if isinstance(payload, str):
                pytest.fail(f"{name} failed:\n{payload}")
        return done
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def test_gloo_backend_with_cuda_buffers_on_one_gpu() -> None:
    """Pack on the device, broadcast (gloo stages through the host), unpack on the device."""
    out = run_push_world("gloo", "cuda:0", ["cuda:0"])
    assert out["sender"] == [1, 2, 3]
    assert out["rx0"] == [(v, expected_target("mixed", v)) for v in (1, 2, 3)]


@needs_cupy
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a NCCL push needs one GPU per rank")
def test_nccl_push_one_receiver_per_gpu() -> None:
    n = min(torch.cuda.device_count(), 4)
    out = run_push_world("nccl", "cuda:0", [f"cuda:{i}" for i in range(1, n)])
    assert out["sender"] == [1, 2, 3]
    for i in range(n - 1):
        assert out[f"rx{i}"] == [(v, expected_target("mixed", v)) for v in (1, 2, 3)]
