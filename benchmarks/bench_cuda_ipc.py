"""Acceptance benchmark of the ``cuda_ipc`` transport: one process pushes into another's buffers.

Measured in the same run, on the same device and bytes:
  * ceiling: one large ``copy_`` of the payload (a push needs two copies: pack and unpack, so
    half of it is the ceiling of any bucketed push);
  * refit ``cuda_ipc``: ``Refitter.push`` wall time (plan, handshake, stream, receiver verify
    and commit) of a model-shaped state with its 0-d scales into a receiver process;
  * baseline (a): one CUDA IPC handle per tensor (torch.multiprocessing reductions, pickled over
    a pipe, as colocated RL frameworks commonly do); the receiver opens each and copies;
  * baseline (b): a fresh ``torch.cat`` bucket and IPC handle per bucket;
  * ``refit.Lazy`` producers that compute each tensor into its bucket view, against computing
    the same tensors first and then pushing them.

The defaults (one 4 GiB bucket) are the fastest setting measured on one H100: the two
processes share the GPU, so a second buffer buys no concurrency, only time-slicing between
their contexts whenever both have copies queued; with one buffer they strictly take turns.

Without CUDA the transport runs over shared memory and baselines (a)/(b) are skipped, so
``--shape tiny --device cpu`` smoke-tests the script anywhere.

    python benchmarks/bench_cuda_ipc.py                      # llama-8b on the current GPU
    python benchmarks/bench_cuda_ipc.py --shape tiny --device cpu --json /tmp/b.json
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refit import Lazy, Refitter
from refit.bench import copy_ceiling, sync, timings
from refit.meta import dtype_from_name, dtype_name
from refit.pack import raw
from refit.shapes import get_shape, make_state

Spec = dict[str, tuple[list[int], str]]


def fingerprint(tensors: dict[str, torch.Tensor]) -> int:
    """Order-sensitive checksum of every tensor's raw bits (to verify what arrived)."""
    total = 0
    for i, name in enumerate(sorted(tensors)):
        t = tensors[name]
        if t.numel():
            total += (i + 1) * int(raw(t.reshape(-1)).sum(dtype=torch.int64))
    return total


# ---------------------------------------------------------------- receiver process


def _receiver(conn: Any, spec: Spec, mode: str, device: str) -> None:
    """Preallocated targets on ``device``; serve ``mode`` until told to stop; report a checksum."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    targets = {k: torch.empty(s, dtype=dtype_from_name(d), device=dev) for k, (s, d) in spec.items()}
    sync(dev)
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if mode == "refit":
        from refit.receiver import RefitReceiver

        rx = RefitReceiver(targets, "cuda_ipc", device=device, name="bench-rx")
        conn.send_bytes(msgpack.packb(rx.info()))
        # poll also bounds every wait inside a push: generous, so a slow first push is not cut off
        worker = threading.Thread(target=rx.serve, kwargs={"poll": 2.0}, daemon=True)
        worker.start()
        conn.recv_bytes()  # stop
        rx.stop()
        worker.join()
        rx.close()
        error = repr(rx.last_error) if rx.last_error else ""
    else:
        conn.send_bytes(msgpack.packb({}))
        error = ""
        while True:
            msg = conn.recv()  # baselines: torch IPC reductions, pickled (this is what they cost)
            if msg is None:
                break
            try:
                if isinstance(msg, dict):  # (b): one raw CUDA IPC handle of a whole bucket
                    copy_out_of_bucket(msg, targets, dev)  # synchronizes before closing the handle
                else:  # (a): torch reductions, one per tensor
                    for name, (rebuild, args), off, n in msg:
                        src = rebuild(*args)
                        dst = raw(targets[name].reshape(-1)).view(torch.uint8)
                        dst.copy_(src[off : off + n] if n >= 0 else src.reshape(-1).view(torch.uint8))
                        del src
                    sync(dev)
                conn.send(True)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                conn.send(False)
    extra = (torch.cuda.max_memory_allocated(dev) - base) if dev.type == "cuda" else 0
    conn.send_bytes(msgpack.packb({"fp": str(fingerprint(targets)), "extra_bytes": extra, "error": error}))


class Peer:
    def __init__(self, spec: Spec, mode: str, device: torch.device) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_receiver, args=(child, spec, mode, str(device)), daemon=True)
        self.proc.start()
        if not self.conn.poll(300):
            self.proc.kill()
            raise RuntimeError(f"receiver ({mode}) did not start")
        self.info = msgpack.unpackb(self.conn.recv_bytes())

    def stop(self, baseline: bool) -> dict[str, Any]:
        if baseline:
            self.conn.send(None)
        else:
            self.conn.send_bytes(b"stop")
        out: dict[str, Any] = msgpack.unpackb(self.conn.recv_bytes())
        self.proc.join(60)
        return out


# ---------------------------------------------------------------- baselines (GPU only)


def push_per_tensor(peer: Peer, tensors: dict[str, torch.Tensor]) -> None:
    from torch.multiprocessing.reductions import reduce_tensor

    peer.conn.send([(k, reduce_tensor(v), 0, -1) for k, v in tensors.items()])
    if not peer.conn.recv():
        raise RuntimeError("receiver failed")


def allocation_base(ptr: int) -> int:
    """Base address of the CUDA allocation holding ``ptr`` (an IPC handle maps a whole one)."""
    import ctypes

    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    rc = ctypes.CDLL("libcuda.so.1").cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    if rc != 0:
        raise RuntimeError(f"cuMemGetAddressRange failed: CUresult {rc}")
    return base.value


def push_cat_buckets(peer: Peer, tensors: dict[str, torch.Tensor], bucket_bytes: int) -> None:
    """Baseline (b): per bucket, ``torch.cat`` its tensors into a fresh buffer, export a CUDA IPC
    handle of it; the receiver opens the handle, copies out, closes it and acks; the buffer is
    then freed (torch's caching allocator hands the memory to the next bucket's ``cat``).

    The handle is the CUDA runtime's own (through CuPy), not torch's reductions: those keep
    every shared buffer alive in the sender until the receiver's reference count reaches it,
    and with a 16 GB state the run ran out of the H100's 80 GB.
    """
    from cupy.cuda import runtime as rt

    groups: list[list[str]] = [[]]
    size = 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if groups[-1] and size + n > bucket_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    for names in groups:
        flat = torch.cat([tensors[k].reshape(-1).view(torch.uint8) for k in names])
        torch.cuda.current_stream().synchronize()  # the handle carries no stream order
        base = allocation_base(flat.data_ptr())
        items, off = [], 0
        for k in names:
            n = tensors[k].numel() * tensors[k].element_size()
            items.append((k, off, n))
            off += n
        peer.conn.send({"handle": bytes(rt.ipcGetMemHandle(base)), "offset": flat.data_ptr() - base, "nbytes": off, "items": items})
        if not peer.conn.recv():
            raise RuntimeError("receiver failed")
        del flat


def copy_out_of_bucket(msg: dict[str, Any], targets: dict[str, torch.Tensor], dev: torch.device) -> None:
    """Receiver of baseline (b): open the bucket's handle, copy every tensor out, close it."""
    from cupy.cuda import runtime as rt

    from refit.transports.shared_buffers import device_tensor

    ptr = rt.ipcOpenMemHandle(msg["handle"], rt.cudaIpcMemLazyEnablePeerAccess)
    try:
        src = device_tensor(ptr + msg["offset"], msg["nbytes"], dev)
        for name, off, n in msg["items"]:
            raw(targets[name].reshape(-1)).view(torch.uint8).copy_(src[off : off + n])
        sync(dev)
    finally:
        rt.ipcCloseMemHandle(ptr)


# ---------------------------------------------------------------- main


def times_one(v: torch.Tensor) -> Callable[[torch.Tensor], object]:
    """A Lazy producer writing ``v * 1.0`` into its output (a compute kernel reading v, writing out)."""
    return lambda out: torch.mul(v, 1.0, out=out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-8b", help="tiny, llama-1b or llama-8b (refit.shapes)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cuda[:N] or cpu (shared memory)")
    p.add_argument("--bucket-mb", type=int, default=4096)
    p.add_argument("--num-buffers", type=int, default=1)
    p.add_argument("--sync", default="auto", choices=["auto", "event", "stream"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--baseline-repeat", type=int, default=2)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--baselines", default="ab", help="which baselines: a, b or ab (each holds device memory until the process exits)")
    p.add_argument(
        "--only-baselines",
        action="store_true",
        help="ceiling and baselines only: torch's IPC path keeps shared blocks alive in the sender, so run the push in another process",
    )
    p.add_argument("--no-lazy", action="store_true")
    p.add_argument("--json", help="write results here")
    a = p.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    bucket_bytes = a.bucket_mb << 20
    shape = get_shape(a.shape)
    state, scales = make_state(shape, device=device)
    both = {**state, **scales}
    nbytes = sum(v.numel() * v.element_size() for v in both.values())
    expected_fp = str(fingerprint(both))  # what every receiver must hold at the end
    spec: Spec = {k: (list(v.shape), dtype_name(v.dtype)) for k, v in both.items()}
    results: dict[str, Any] = {
        "shape": a.shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "bytes": nbytes,
        "tensors": len(both),
        "scales": len(scales),
        "bucket_bytes": bucket_bytes,
        "num_buffers": a.num_buffers,
        "torch": torch.__version__,
    }
    rows: list[tuple[str, float, str]] = []  # (what, GB/s or seconds, note)

    # Ceiling first, before anything else holds memory.
    ceiling = copy_ceiling(nbytes, device, a.repeat)
    results["ceiling_gbps"] = nbytes / ceiling / 1e9
    rows.append(("device copy ceiling (one copy_)", results["ceiling_gbps"], "GB/s"))
    rows.append(("push ceiling (pack + unpack = 2 copies)", results["ceiling_gbps"] / 2, "GB/s"))

    # baselines first, while nothing else holds device memory
    if device.type == "cuda" and not a.no_baselines:
        for name, fn in (
            ("baseline (a): IPC handle per tensor", lambda pr: push_per_tensor(pr, both)),
            ("baseline (b): torch.cat bucket + handle per bucket", lambda pr: push_cat_buckets(pr, both, bucket_bytes)),
        ):
            key = "per_tensor" if "(a)" in name else "cat_bucket"
            if name[10] not in a.baselines:
                continue
            bpeer = Peer(spec, key, device)
            try:
                first = time.perf_counter()
                fn(bpeer)
                first = time.perf_counter() - first
                note = ""
                try:
                    t = timings(functools.partial(fn, bpeer), a.baseline_repeat, device)
                except torch.cuda.OutOfMemoryError:
                    t, note = [first], "; later pushes ran out of device memory"
                out = bpeer.stop(baseline=True)
                results[key] = {"first_s": first, "best_s": min(t), "gbps": nbytes / min(t) / 1e9, "verified": out["fp"] == expected_fp}
                rows.append((name, results[key]["gbps"], f"GB/s best (first push {first:.3f} s{note})"))
            except Exception as exc:  # e.g. expandable segments: torch's IPC path refuses
                results[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                rows.append((name, float("nan"), results[key]["error"][:80]))
                bpeer.proc.kill()

    if a.only_baselines:
        for what, value, unit in rows:
            print(f"{what:<52}  {value:>10.4g}  {unit}")
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2, default=str))
        return 0

    # refit cuda_ipc
    peer = Peer(spec, "refit", device)
    from refit.transports.cuda_ipc import CudaIpcSender

    sender = CudaIpcSender.for_receivers([peer.info], timeout=600, sync=a.sync, num_buffers=a.num_buffers)
    assert isinstance(sender, CudaIpcSender)  # for_receivers is typed as returning the base Sender
    reports: list[Any] = []
    with Refitter(sender, bucket_bytes=bucket_bytes, num_buffers=a.num_buffers, timeout=600) as r:
        times = timings(lambda: reports.append(r.push(state, scales)), a.repeat, device)
        results["refit"] = {
            "best_s": min(times),
            "median_s": statistics.median(times),
            "gbps": nbytes / min(times) / 1e9,
            "median_gbps": nbytes / statistics.median(times) / 1e9,
            "sync": sender.sync.value,
            "buckets": reports[-1].buckets,
            "stages_s": reports[-1].seconds,
            "receiver_stages_s": reports[-1].receivers[0].seconds if reports[-1].receivers else {},
            "staging_bytes": sender.staging_bytes,
            "staging_bound": a.num_buffers * bucket_bytes,
        }
        rows.append(
            (f"refit cuda_ipc push ({sender.sync.value} sync)", results["refit"]["gbps"], f"GB/s best, {results['refit']['median_gbps']:.4g} median")
        )
        if not a.no_lazy:  # producers: y = x * 1.0 (a compute kernel reading x, writing y)
            eager = timings(lambda: r.push({k: torch.mul(v, 1.0) for k, v in state.items()}, scales), a.repeat, device)
            lazy_state = {k: Lazy(tuple(v.shape), v.dtype, times_one(v)) for k, v in state.items()}
            lazy = timings(lambda: r.push(lazy_state, scales), a.repeat, device)
            results["lazy"] = {"eager_s": min(eager), "lazy_s": min(lazy), "saved_s": min(eager) - min(lazy)}
            rows.append(("compute, then push (eager)", min(eager), "s"))
            rows.append(("refit.Lazy: compute into the bucket", min(lazy), f"s (saves {min(eager) - min(lazy):.4f} s)"))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    got = peer.stop(baseline=False)
    results["refit"]["verified"] = got["fp"] == expected_fp and not got["error"]
    results["refit"]["receiver_extra_bytes"] = got["extra_bytes"]
    rows.append(("  staging per side (sender / receiver extra)", results["refit"]["staging_bytes"] / 1e9, f"GB / {got['extra_bytes'] / 1e9:.3f} GB"))

    width = max(len(w) for w, _, _ in rows)
    print(f"cuda_ipc push of {a.shape} ({nbytes / 1e9:.2f} GB, {len(both)} tensors of which {len(scales)} scales) on {results['device']}")
    print(f"bucket {a.bucket_mb} MiB x {a.num_buffers}, verified: {results['refit']['verified']}")
    print("-" * (width + 30))
    for what, value, unit in rows:
        print(f"{what:<{width}}  {value:>10.4g}  {unit}")
    stages = results["refit"]["stages_s"]
    print("refit stages (s): " + ", ".join(f"{k} {v:.4f}" for k, v in stages.items()))
    print(f"target >= 600 GB/s end to end: {'met' if results['refit']['gbps'] >= 600 else 'not met'}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2, default=str))
    return 0 if results["refit"]["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
