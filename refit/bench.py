"""``refit bench``: push a synthetic model-shaped state and measure it against its ceiling.

Each transport is measured beside the raw ceiling of its data path, in the same run, for every
``(bucket_bytes, num_buffers)`` of the sweep: ``local`` against one large ``copy_`` of the same
bytes on the same device; ``zmq`` against raw pyzmq zero-copy sends of the same bytes in the
same bucket sizes to a receiving process; ``cuda_ipc`` against one ``copy_`` (a push makes two);
``nccl`` against the raw broadcast of the same bytes in the same buckets to a receiver process
(NCCL to the next GPU, or gloo on the CPU). Each row also holds the push's stages (from its
:class:`~refit.report.RefitReport`), its staging bytes and the sender's peak memory. Output
(table, JSON, plot, progress bar) is :mod:`refit.bench_output`; rows are built by
:mod:`refit.bench_measure`; the transports into another process are :mod:`refit.bench_process`.
"""

from __future__ import annotations

from functools import partial

import torch

from refit.api import Refitter
from refit.bench_measure import (
    STAGES,
    BucketProgress,
    Configs,
    PeakMemory,
    Row,
    Tick,
    best_of,
    copy_ceiling,
    make_row,
    payload,
    report_fields,
    stages_of,
    sync,
    timings,
)
from refit.bench_process import bench_cuda_ipc, bench_zmq, bench_zmq_state
from refit.errors import RefitError
from refit.shapes import ModelShape, make_state

__all__ = ["BENCHES", "STAGES", "Row", "bench_zmq_state", "copy_ceiling", "run", "stages_of", "sync", "timings", "unavailable"]


def bench_local(label: str, shape: ModelShape, device: torch.device, configs: Configs, repeat: int, tick: Tick, bucket: BucketProgress) -> list[Row]:
    """``local`` pushes into plain targets in this process, beside one ``copy_`` of the bytes."""
    state, scales = make_state(shape, device=device)
    both, nbytes = payload(state, scales)
    rows = []
    for bucket_bytes, nb in configs:
        ceiling = copy_ceiling(nbytes, device, repeat)  # just before the row: the same moment of a drifting machine
        target = {k: torch.zeros_like(v) for k, v in both.items()}  # touched: its pages are not the push's memory
        refitter = Refitter("local", target=target, bucket_bytes=bucket_bytes, num_buffers=nb, progress=bucket)
        with PeakMemory(device) as mem:
            seconds, report = best_of(partial(refitter.push, state, scales), repeat, device)
        for k, v in both.items():
            if not torch.equal(target[k].view(-1).view(torch.uint8), v.view(-1).view(torch.uint8)):
                raise RefitError(f"bench: {k} arrived corrupted")
        rows.append(make_row("local", label, device, nbytes, len(both), seconds, ceiling, "copy_", **report_fields(refitter, report), **mem.fields()))
        refitter.close()
        del target, refitter
        tick(f"local {bucket_bytes >> 20} MiB x {nb}")
    return rows


def bench_nccl(label: str, shape: ModelShape, device: torch.device, configs: Configs, repeat: int, tick: Tick, bucket: BucketProgress) -> list[Row]:
    """Pushes to one receiver process (the next GPU with NCCL; gloo on the CPU), each beside the
    raw broadcast of the same bytes in the same buckets (``refit.bench_broadcast`` sweeps more)."""
    from refit.bench_broadcast import sweep

    def say(line: str) -> None:
        if line.startswith("push"):
            tick(f"nccl {line.split(':')[0].removeprefix('push ')}")

    out = sweep(shape, list(configs), device=str(device), reps=repeat, baselines=False, log=say)
    c = out["config"]
    pushes = [r for r in out["rows"] if r["method"] == "push"]
    raws = [r for r in out["rows"] if r["method"] == "raw buckets"]
    rows = []
    for push, raw in zip(pushes, raws):
        secs = {peer: {k: v / 1e3 for k, v in ms.items()} for peer, ms in push["stages_ms"].items()}
        extra = {
            "bucket_bytes": push["bucket_bytes"],
            "num_buffers": push["num_buffers"],
            "buckets": push["buckets"],
            "stages": stages_of(secs["sender"], [v for k, v in secs.items() if k != "sender"]),
            "report": secs,
            "staging_bytes": push["bucket_bytes"] * push["num_buffers"],  # the sender's buffers
            "rss_peak_bytes": None,  # one sweep for every config: no per-row peak
            "rss_added_bytes": None,
            "device_peak_bytes": None,
        }
        rows.append(
            make_row(
                f"nccl/{c['backend']}", label, device, c["bytes"], c["tensors"], push["best_s"], raw["best_s"], "raw broadcast, same buckets", **extra
            )
        )
    return rows


BENCHES = {"local": bench_local, "zmq": bench_zmq, "cuda_ipc": bench_cuda_ipc, "nccl": bench_nccl}
_COPIES = {"local": 2, "zmq": 2, "cuda_ipc": 2, "nccl": 3}  # copies of the state alive at once (nccl's receiver rebuilds it)


def unavailable(transport: str, device: str) -> str:
    """Why ``transport`` cannot be measured on ``device`` here ("" if it can)."""
    if transport == "nccl" and torch.device(device).type == "cuda" and torch.cuda.device_count() < 2:
        return f"nccl on CUDA needs 2 GPUs (one per rank), found {torch.cuda.device_count()}"
    return ""


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(transport: str, shape: ModelShape, label: str, device: torch.device, configs: Configs) -> None:
    """Raise before anything is allocated when ``transport``'s copies of the state and its
    staging buffers would not fit ``device``'s free memory."""
    need = _COPIES.get(transport, 2) * shape.nbytes() + max(b * n for b, n in configs) * 2
    free = _available_bytes(device)
    if free is not None and need > free:
        raise RefitError(
            f"refit bench --transport {transport} --shape {label}: needs about {need / 1e9:.1f} GB on {device} "
            f"({_COPIES.get(transport, 2)} copies of the {shape.nbytes() / 1e9:.1f} GB state plus staging), {free / 1e9:.1f} GB is free; "
            "choose a smaller shape or fewer layers in the config"
        )


def run(
    transport: str,
    shape: ModelShape,
    device: str,
    configs: Configs,
    repeat: int,
    *,
    label: str = "",
    tick: Tick | None = None,
    bucket: BucketProgress | None = None,
) -> list[Row]:
    """Measure ``transport`` for every ``(bucket_bytes, num_buffers)`` of ``configs``: one row each.

    Raises:
        RefitError: an unknown transport, no GPU for ``--device cuda``, not enough memory, or a
            push whose data arrived corrupted.
    """
    if transport not in BENCHES:
        raise RefitError(f"refit bench supports {sorted(BENCHES)}; see benchmarks/ for the other transports")
    if not configs or any(b <= 0 or n <= 0 for b, n in configs):
        raise RefitError(f"refit bench: bucket sizes and buffer counts must be positive, got {list(configs)}")
    if repeat < 1:
        raise RefitError(f"--repeat must be at least 1, got {repeat}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RefitError("--device cuda needs a GPU; use --device cpu")
    check_fits(transport, shape, label, dev, configs)
    return BENCHES[transport](label, shape, dev, configs, repeat, tick or (lambda _: None), bucket or (lambda _d, _t: None))
