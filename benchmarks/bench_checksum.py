"""What per-bucket checksums cost: the same push with ``checksum=None`` and with checksums on,
alternated in the same run, per transport; beside it the bare algorithm over one bucket.

Each network transport's receiver runs in a process of its own (spawned), serving pushes into
a preallocated target; ``local`` applies in the sender's process. Every configuration is timed
``--repeat`` times after a warm-up, interleaved (off, on, off, on, ...) so drift in the machine
load hits both alike; the best of each is reported, and the ratio on/off. The bare algorithm
row (``xxh3`` / ``sum64`` over one bucket, no transport) is the ceiling of what a checksum can
add per byte on one side.

    python benchmarks/bench_checksum.py [--mib 512] [--bucket-mib 64] [--transport zmq ...] \
        [--checksum auto] [--device cpu] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import time
from typing import Any

import torch

from refit import Refitter
from refit.integrity import Checksum, bucket_checksum

TRANSPORTS = ("local", "zmq", "cuda_ipc", "nccl")


def make_state(mib: int, device: str) -> dict[str, torch.Tensor]:
    """bf16 weights of 16 MiB each (and one 0-d scale per weight), deterministic."""
    n = max(1, mib // 16)
    g = torch.Generator().manual_seed(0)
    state = {f"layers.{i}.w": torch.randn(8 << 20, generator=g).to(torch.bfloat16).to(device) for i in range(n)}
    state |= {f"layers.{i}.w_scale": torch.tensor(0.5 + i, device=device) for i in range(n)}
    return state


def receiver(transport: str, spec: dict[str, tuple[list[int], str]], device: str, pushes: int, conn: Any) -> None:
    from refit.meta import dtype_from_name
    from refit.receiver import RefitReceiver

    target = {k: torch.zeros(shape, dtype=dtype_from_name(dt), device=device) for k, (shape, dt) in spec.items()}
    opts: dict[str, Any] = {"device": device} if transport != "zmq" or device != "cpu" else {}
    with RefitReceiver(target, transport, name=f"{transport}-rx", **opts) as rx:
        conn.send(rx.info())
        rx.serve(max_pushes=pushes, poll=0.2)
        conn.send(rx.last_error and str(rx.last_error))


def time_push(r: Refitter, state: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    """Seconds of one push, and the checksum seconds on the sender and on the (first) receiver."""
    t0 = time.perf_counter()
    report = r.push(state)
    total = time.perf_counter() - t0
    rx = report.receivers[0].seconds.get("checksum", 0.0) if report.receivers else 0.0
    return total, report.seconds.get("checksum", 0.0), rx


def bench_transport(transport: str, state: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, Any]:
    pushes = 2 * (args.repeat + 1)
    spec = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}
    proc, conn = None, None
    opts: dict[str, Any] = {}
    if transport == "local":
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        opts["target"] = target
    else:
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=receiver, args=(transport, spec, args.device, pushes, child), daemon=True)
        proc.start()
        if not conn.poll(120):
            raise RuntimeError(f"{transport} receiver did not start")
        opts["peers"] = [conn.recv()]
        if transport != "zmq":
            opts["device"] = args.device
        opts["timeout"] = 120
    bucket = args.bucket_mib << 20
    r = Refitter(transport, bucket_bytes=bucket, checksum=args.checksum, **opts)
    algorithm = r.sender.checksum  # what "auto" means for this sender's staging buffers
    runs: dict[str, list[tuple[float, float, float]]] = {"off": [], "on": []}
    try:
        for i in range(args.repeat + 1):
            for mode in ("off", "on"):
                r.sender.checksum = algorithm if mode == "on" else None  # announced per push, in its Hello
                got = time_push(r, state)
                if i:  # the first round warms up
                    runs[mode].append(got)
    finally:
        r.close()
        if proc is not None:
            proc.join(60)
            if proc.is_alive():
                proc.kill()
    best_off = min(t for t, _, _ in runs["off"])
    best_on = min(runs["on"])
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    return {
        "transport": transport,
        "checksum": str(algorithm),
        "bytes": nbytes,
        "off_s": best_off,
        "on_s": best_on[0],
        "ratio": best_on[0] / best_off,
        "off_GBps": nbytes / best_off / 1e9,
        "on_GBps": nbytes / best_on[0] / 1e9,
        "sender_checksum_s": best_on[1],
        "receiver_checksum_s": best_on[2],
    }


def bare(algorithm: Checksum, bucket_mib: int, device: str, repeat: int) -> dict[str, Any]:
    data = torch.randint(0, 256, (bucket_mib << 20,), dtype=torch.uint8, device=device)
    bucket_checksum(algorithm, data)
    best = min(_timed(lambda: bucket_checksum(algorithm, data)) for _ in range(repeat))
    return {
        "transport": f"bare {algorithm} ({device})",
        "checksum": str(algorithm),
        "bytes": data.numel(),
        "on_s": best,
        "on_GBps": data.numel() / best / 1e9,
    }


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'transport':<22} {'checksum':<8} {'off s':>8} {'on s':>8} {'on/off':>7} {'off GB/s':>9} {'on GB/s':>8} {'tx sum s':>9} {'rx sum s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        off = f"{r['off_s']:8.3f}" if "off_s" in r else f"{'':>8}"
        ratio = f"{r['ratio']:7.3f}" if "ratio" in r else f"{'':>7}"
        off_gb = f"{r['off_GBps']:9.2f}" if "off_GBps" in r else f"{'':>9}"
        tx = f"{r['sender_checksum_s']:9.3f}" if "sender_checksum_s" in r else f"{'':>9}"
        rx = f"{r['receiver_checksum_s']:9.3f}" if "receiver_checksum_s" in r else f"{'':>9}"
        lines.append(f"{r['transport']:<22} {r['checksum']:<8} {off} {r['on_s']:8.3f} {ratio} {off_gb} {r['on_GBps']:8.2f} {tx} {rx}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512, help="state size in MiB (bf16 weights of 16 MiB, one 0-d scale each)")
    ap.add_argument("--bucket-mib", type=int, default=64)
    ap.add_argument("--transport", action="append", choices=TRANSPORTS, help=f"repeatable; default all of {', '.join(TRANSPORTS)}")
    ap.add_argument("--checksum", default="auto", choices=["auto", "xxh3", "sum64"])
    ap.add_argument("--device", default="cpu", help="where the state, staging and targets live (cpu or cuda)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    state = make_state(args.mib, args.device)
    rows = [bench_transport(t, state, args) for t in args.transport or TRANSPORTS]
    for algorithm in Checksum:
        rows.append(bare(algorithm, args.bucket_mib, "cpu", args.repeat))
        if args.device != "cpu":
            rows.append(bare(algorithm, args.bucket_mib, args.device, args.repeat))
    print(f"{args.mib} MiB state, {args.bucket_mib} MiB buckets, device {args.device}, {platform.node()}, torch {torch.__version__}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
