"""``cuda_ipc`` on a GPU: two processes on one device, bit-exact, allocator-independent, leak-free.

Sender and receiver each run in a spawned process whose ``PYTORCH_CUDA_ALLOC_CONF`` is set
before torch is imported there (expandable segments on and off). Every push changes every
tensor (float8, 0-d bf16/fp32 scales, tensors chunked over several buckets included) and the
receiver checks each one bit for bit; 100 pushes must not grow device memory on either side
nor the number of open IPC handles.

Run: ``pytest -m gpu tests/gpu/test_cuda_ipc_gpu.py`` (needs CUDA and CuPy).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import pytest
import torch

from tests.conftest import random_tensor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BUCKET = 4 << 20  # small enough that "big" spans several buckets
PUSHES = 100
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.int32, torch.uint8]


def base_state(device: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(DTYPES):
        for j, shape in enumerate([(), (7,), (33, 129), (256, 1024)]):
            state[f"w{i}.{j}"] = random_tensor(shape, dtype, gen)
    state["big.bf16"] = torch.randn(3000, 4096, generator=gen).to(torch.bfloat16)  # 24 MiB: 6+ chunks
    state["big.fp8"] = torch.randn(5000, 1024, generator=gen).to(torch.float8_e4m3fn)
    scales = {
        "s.bf16": torch.tensor(0.75, dtype=torch.bfloat16),
        "s.fp32": torch.tensor(1.25, dtype=torch.float32),
        "layer.k_scale": torch.tensor(0.5, dtype=torch.float32),
        "layer.v_scale": torch.tensor(0.5, dtype=torch.float32),
        "s.vec": torch.rand(16, generator=gen) + 0.5,
    }
    return {k: v.to(device) for k, v in state.items()}, {k: v.to(device) for k, v in scales.items()}


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def version_of(base: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], v: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every byte of every weight shifted by ``v`` (mod 256), every scale grown by v / 1000."""
    state = {k: (_raw(t) + v).view(t.dtype).reshape(t.shape) for k, t in base.items()}
    sc = {k: (t.float() * (1 + v / 1000)).to(t.dtype) for k, t in scales.items()}
    return state, sc


def _memory(device: torch.device) -> dict[str, int]:
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    return {"reserved": torch.cuda.memory_reserved(device), "free": free}


def _legacy_ipc_works(device: str) -> bool:
    """Whether torch's own CUDA IPC reduction works under this allocator config (information)."""
    from torch.multiprocessing.reductions import reduce_tensor

    try:
        reduce_tensor(torch.ones(1024, device=device))
        return True
    except Exception:
        return False


def _receiver_main(conn: Any, pushes: int, fake_uuid: bool) -> None:
    from refit.receiver import RefitReceiver

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    base, base_scales = base_state("cuda:0")
    dst = {k: torch.zeros_like(v) for k, v in {**base, **base_scales}.items()}
    with RefitReceiver(dst, "cuda_ipc", device="cuda:0", name="gpu-rx") as rx:
        conn.send_bytes(msgpack.packb(rx.info()))
        if fake_uuid:  # after info(): the sender's early check passes, the handshake must refuse
            rx.transport.place = "GPU-00000000-0000-0000-0000-000000000000"  # type: ignore[attr-defined]
        bad: list[str] = []
        mem: list[dict[str, int]] = []
        handles: list[int] = []
        errors: list[str] = []
        done = 0
        while done < pushes:
            try:
                report = rx.transport.receive(rx.loader, 120)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                done += 1
                continue
            if report is None:
                continue
            done += 1
            state, scales = version_of(base, base_scales, report.version)
            bad += [f"v{report.version}:{k}" for k, v in {**state, **scales}.items() if not torch.equal(_raw(dst[k]), _raw(v))]
            handles.append(rx.transport.open_handles)  # type: ignore[attr-defined]
            if done in (1, 10, pushes):
                mem.append(_memory(device))
        result = {
            "bad": bad[:20],
            "nbad": len(bad),
            "mem": mem,
            "handles": handles,
            "errors": errors,
            "conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            "legacy_ipc": _legacy_ipc_works("cuda:0"),
        }
    result["handles_after_close"] = rx.transport.open_handles  # type: ignore[attr-defined]
    conn.send_bytes(msgpack.packb(result))


def _sender_main(conn: Any, info: dict[str, Any], pushes: int, sync: str, num_buffers: int) -> None:
    from refit import Refitter
    from refit.transports.cuda_ipc import CudaIpcSender

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    base, base_scales = base_state("cuda:0")
    errors: list[str] = []
    mem: list[dict[str, int]] = []
    sender = CudaIpcSender.for_receivers([info], timeout=120, sync=sync, num_buffers=num_buffers)
    assert isinstance(sender, CudaIpcSender)  # for_receivers is typed as returning the base Sender
    result: dict[str, Any] = {"sync": sender.sync.value}
    with Refitter(sender, bucket_bytes=BUCKET, num_buffers=num_buffers) as r:
        for v in range(1, pushes + 1):
            state, scales = version_of(base, base_scales, v)
            try:
                report = r.push(state, scales, version=v)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            del state, scales
            if v in (1, 10, pushes):
                mem.append(_memory(device))
        result["staging"] = sender.staging_bytes
        result["buckets"] = report.buckets if not errors else 0
        before_close = _memory(device)["free"]
    result.update(mem=mem, errors=errors, freed=_memory(device)["free"] - before_close, legacy_ipc=_legacy_ipc_works("cuda:0"))
    conn.send_bytes(msgpack.packb(result))


@contextmanager
def alloc_conf(conf: str) -> Iterator[None]:
    """Children spawned inside see ``conf`` from their first import of torch."""
    old = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = conf
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        else:
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = old


def run_pair(conf: str, pushes: int, sync: str = "auto", num_buffers: int = 2, fake_uuid: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    pytest.importorskip("cupy")
    ctx = mp.get_context("spawn")
    rx_conn, rx_child = ctx.Pipe()
    tx_conn, tx_child = ctx.Pipe()
    with alloc_conf(conf):
        rx = ctx.Process(target=_receiver_main, args=(rx_child, pushes, fake_uuid), daemon=True)
        rx.start()
        try:
            if not rx_conn.poll(180):
                pytest.fail(f"receiver did not start (exit code {rx.exitcode})")
            info = msgpack.unpackb(rx_conn.recv_bytes())
            tx = ctx.Process(target=_sender_main, args=(tx_child, info, pushes, sync, num_buffers), daemon=True)
            tx.start()
            try:
                if not tx_conn.poll(600):
                    pytest.fail(f"sender did not finish (exit code {tx.exitcode})")
                sent = msgpack.unpackb(tx_conn.recv_bytes())
                if not rx_conn.poll(120):
                    pytest.fail(f"receiver did not finish (exit code {rx.exitcode})")
                got = msgpack.unpackb(rx_conn.recv_bytes())
                tx.join(60)
                rx.join(60)
                assert tx.exitcode == 0 and rx.exitcode == 0
                return sent, got
            finally:
                tx.kill()
        finally:
            rx.kill()


@pytest.mark.parametrize(
    ("conf", "sync", "num_buffers"),
    [("expandable_segments:True", "auto", 2), ("expandable_segments:False", "auto", 3), ("expandable_segments:True", "stream", 2)],
)
def test_hundred_pushes_bit_exact_no_growth(conf: str, sync: str, num_buffers: int) -> None:
    sent, got = run_pair(conf, PUSHES, sync, num_buffers)
    assert got["conf"] == conf
    assert sent["errors"] == [] and got["errors"] == []
    assert sent["sync"] == ("event" if sync == "auto" else sync)
    assert got["nbad"] == 0, got["bad"]
    assert sent["buckets"] > 6
    assert sent["staging"] <= num_buffers * BUCKET
    # the set is opened once and stays open: exactly num_buffers handles, then none after close
    assert got["handles"] == [num_buffers] * PUSHES
    assert got["handles_after_close"] == 0
    for side in (sent, got):
        first, tenth, last = side["mem"]
        assert last["reserved"] == tenth["reserved"], side["mem"]  # no growth of torch's pool
        assert abs(last["free"] - tenth["free"]) <= 32 << 20, side["mem"]  # nor outside it (IPC maps)


def test_other_gpu_is_refused_with_a_clear_error() -> None:
    sent, got = run_pair("expandable_segments:False", 1, fake_uuid=True)
    assert len(sent["errors"]) == 1 and "same GPU" in sent["errors"][0], sent["errors"]
    assert "ResolveError" in sent["errors"][0]
    assert len(got["errors"]) == 1 and "same GPU" in got["errors"][0]
    assert got["handles"] == []


def test_one_process_borrows_its_own_buckets() -> None:
    pytest.importorskip("cupy")
    import threading

    from refit import Refitter
    from refit.errors import TransportError
    from refit.receiver import RefitReceiver
    from refit.transports.cuda_ipc import CudaIpcSender

    base, scales = base_state("cuda:0")
    dst = {k: torch.zeros_like(v) for k, v in {**base, **scales}.items()}
    with pytest.raises(TransportError, match="on this GPU"):  # refused before connecting
        CudaIpcSender([{"address": "ipc:///tmp/refit-nowhere.sock", "uuid": "GPU-elsewhere"}])
    with RefitReceiver(dst, "cuda_ipc", device="cuda:0") as rx:
        t = threading.Thread(target=rx.receive, kwargs={"timeout": 60}, daemon=True)
        t.start()
        sender = CudaIpcSender([rx.info()])
        assert sender.sync.value == "stream"  # same process: no IPC events
        with Refitter(sender, bucket_bytes=BUCKET) as r:
            r.push(base, scales, version=3)
        t.join(60)
        assert rx.version == 3 and rx.transport.open_handles == 0  # type: ignore[attr-defined]
    assert all(torch.equal(_raw(dst[k]), _raw(v)) for k, v in {**base, **scales}.items())
