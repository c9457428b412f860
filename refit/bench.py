"""``refit bench``: push a synthetic model-shaped state and measure it against its ceiling.

Each transport is measured beside the raw ceiling of its data path, in the same run:
``local`` against one large ``copy_`` of the same bytes on the same device; ``zmq`` against
raw pyzmq zero-copy sends of the same bytes in the same bucket sizes to a receiving process;
``nccl`` against the raw broadcast of the same bytes in the same buckets to a receiver process
(NCCL to the next GPU, or gloo on the CPU).
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from refit.api import Refitter
from refit.errors import RefitError
from refit.pack import host_bytes
from refit.shapes import get_shape, make_state

Row = dict[str, Any]


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timings(fn: Callable[[], object], repeat: int, device: torch.device) -> list[float]:
    """Wall times of ``repeat`` runs of ``fn`` after one warm-up, device work included."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _best(fn: Callable[[], object], repeat: int, device: torch.device) -> float:
    return min(timings(fn, repeat, device))


def copy_ceiling(nbytes: int, device: torch.device, repeat: int) -> float:
    """Best seconds of one large ``copy_`` of ``nbytes`` on ``device`` (the ceiling of any
    copy-based push); its memory is released afterwards."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)  # touched: untouched host pages read as free zero pages
    pair = [torch.zeros_like(src), src]
    del src
    best = _best(lambda: pair[0].copy_(pair[1]), repeat, device)
    pair.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return best


def progress_printer(label: str) -> Callable[[int, int], None]:
    """A progress callback that redraws one stderr line (only on a terminal, for long pushes)."""
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if sys.stderr.isatty() and (now - last[0] > 0.2 or done == total):
            last[0] = now
            end = "\n" if done == total else ""
            print(f"\r{label}: bucket {done}/{total}", end=end, file=sys.stderr, flush=True)

    return show


def bench_local(shape_name: str, device: torch.device, bucket_bytes: int, num_buffers: int, repeat: int) -> Row:
    shape = get_shape(shape_name)
    state, scales = make_state(shape, device=device)
    target = {k: torch.empty_like(v) for k, v in {**state, **scales}.items()}
    refitter = Refitter("local", target=target, bucket_bytes=bucket_bytes, num_buffers=num_buffers, progress=progress_printer("local push"))
    seconds = _best(lambda: refitter.push(state, scales), repeat, device)
    for k, v in {**state, **scales}.items():
        if not torch.equal(target[k].view(-1).view(torch.uint8), v.view(-1).view(torch.uint8)):
            raise RefitError(f"bench: {k} arrived corrupted")
    nbytes = sum(v.numel() * v.element_size() for v in {**state, **scales}.values())
    ceiling = copy_ceiling(nbytes, device, repeat)
    return _row("local", shape_name, device, nbytes, len(target), seconds, ceiling, "copy_")


def _row(transport: str, shape: str, device: torch.device, nbytes: int, tensors: int, seconds: float, ceiling_s: float, ceiling: str) -> Row:
    gbps, ceiling_gbps = nbytes / seconds / 1e9, nbytes / ceiling_s / 1e9
    return {
        "transport": transport,
        "shape": shape,
        "device": str(device),
        "bytes": nbytes,
        "tensors": tensors,
        "seconds": seconds,
        "gbps": gbps,
        "ceiling": ceiling,
        "ceiling_gbps": ceiling_gbps,
        "ratio": gbps / ceiling_gbps,
    }


# ---------------------------------------------------------------- zmq


def _sink(transport: str, spec: dict[str, tuple[tuple[int, ...], str]], device: str, out: Any, pushes: int, raw_rounds: int) -> None:
    """Receiver process: first a raw pyzmq sink (the ceiling, ``raw_rounds`` > 0), then
    ``pushes`` refit pushes over ``transport`` into targets on ``device``."""
    import zmq

    from refit.meta import dtype_from_name
    from refit.receiver import RefitReceiver

    ctx: Any = zmq.Context.instance()
    raw = ctx.socket(zmq.ROUTER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.bind("tcp://127.0.0.1:*")
    target = {k: torch.empty(s, dtype=dtype_from_name(d), device=device) for k, (s, d) in spec.items()}
    rx = RefitReceiver(target, transport)
    out.put((raw.getsockopt_string(zmq.LAST_ENDPOINT), rx.info()))
    for _ in range(raw_rounds):  # each round: frames until an empty one, then ack
        while True:
            ident, data = raw.recv_multipart(copy=False)
            if len(data.buffer) == 0:
                raw.send_multipart([ident.bytes, b"ok"])
                break
    for _ in range(pushes):
        rx.receive(timeout=600)
    rx.close()
    raw.close()


def raw_zmq_seconds(address: str, buckets: list[memoryview], rounds: int) -> float:
    """Best time to send ``buckets`` zero-copy over one socket and get one ack back."""
    import zmq

    sock: Any = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for b in buckets:
            sock.send(b, copy=False)
        sock.send(b"")
        sock.recv()
        times.append(time.perf_counter() - t0)
    sock.close()
    return min(times[1:]) if len(times) > 1 else times[0]


def bench_zmq(shape_name: str, device: torch.device, bucket_bytes: int, num_buffers: int, repeat: int) -> Row:
    state, scales = make_state(get_shape(shape_name), device=device)
    return bench_zmq_state(shape_name, state, scales, device, bucket_bytes, num_buffers, repeat)


def bench_zmq_state(
    label: str,
    state: dict[str, torch.Tensor],
    scales: dict[str, torch.Tensor],
    device: torch.device,
    bucket_bytes: int,
    num_buffers: int,
    repeat: int,
) -> Row:
    """A zmq push of ``state`` + ``scales`` to a receiver process over loopback tcp, beside raw
    pyzmq zero-copy sends of the same bytes in the same bucket sizes to the same process."""

    both, nbytes = _payload(state, scales)

    def ceiling(raw_addr: str) -> float:
        flat = torch.ones(bucket_bytes, dtype=torch.uint8)
        view = host_bytes(flat)
        full, rest = divmod(nbytes, bucket_bytes)
        return raw_zmq_seconds(raw_addr, [view] * full + ([view[:rest]] if rest else []), repeat + 1)

    seconds, ceiling_s = _push_to_process("zmq", state, scales, device, bucket_bytes, num_buffers, repeat, ceiling)
    return _row("zmq", label, device, nbytes, len(both), seconds, ceiling_s, "raw pyzmq zero-copy")


def bench_cuda_ipc(shape_name: str, device: torch.device, bucket_bytes: int, num_buffers: int, repeat: int) -> Row:
    """A ``cuda_ipc`` push to a receiver process on the same device (shared memory on the CPU)
    beside one copy of the same bytes on that device (a push makes two: pack and apply)."""
    state, scales = make_state(get_shape(shape_name), device=device)
    both, nbytes = _payload(state, scales)
    one_copy = lambda _: copy_ceiling(nbytes, device, repeat)  # noqa: E731
    seconds, ceiling_s = _push_to_process("cuda_ipc", state, scales, device, bucket_bytes, num_buffers, repeat, one_copy)
    return _row("cuda_ipc", shape_name, device, nbytes, len(both), seconds, ceiling_s, "one copy_ (a push makes 2)")


def _payload(state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Every tensor of a push, and their bytes."""
    both = {**state, **scales}
    return both, sum(v.numel() * v.element_size() for v in both.values())


def _push_to_process(
    transport: str,
    state: dict[str, torch.Tensor],
    scales: dict[str, torch.Tensor],
    device: torch.device,
    bucket_bytes: int,
    num_buffers: int,
    repeat: int,
    ceiling: Callable[[str], float],
) -> tuple[float, float]:
    """Best push time of ``state`` + ``scales`` into a receiver process, and ``ceiling(raw
    pyzmq address of that process)`` measured in the same run."""
    from refit.meta import dtype_name

    spec = {k: (tuple(v.shape), dtype_name(v.dtype)) for k, v in {**state, **scales}.items()}
    raw_rounds = repeat + 1 if transport == "zmq" else 0
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    proc = ctx.Process(target=_sink, args=(transport, spec, str(device), out, repeat + 1, raw_rounds), daemon=True)
    proc.start()
    try:
        raw_addr, info = out.get(timeout=120)
        ceiling_s = ceiling(raw_addr)
        progress = progress_printer(f"{transport} push")
        with Refitter(transport, peers=[info], bucket_bytes=bucket_bytes, num_buffers=num_buffers, timeout=600, progress=progress) as r:
            seconds = _best(lambda: r.push(state, scales), repeat, device)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    return seconds, ceiling_s


def bench_nccl(shape_name: str, device: torch.device, bucket_bytes: int, num_buffers: int, repeat: int) -> Row:
    """A push to one receiver process (the next GPU with NCCL; gloo on the CPU) beside the raw
    broadcast of the same bytes in the same buckets (``refit.bench_broadcast`` sweeps more)."""
    from refit.bench_broadcast import sweep

    out = sweep(get_shape(shape_name), [(bucket_bytes, num_buffers)], device=str(device), reps=repeat, baselines=False)
    push, raw = out["rows"]
    c = out["config"]
    return _row(f"nccl/{c['backend']}", shape_name, device, c["bytes"], c["tensors"], push["best_s"], raw["best_s"], "raw broadcast, same buckets")


BENCHES = {"local": bench_local, "zmq": bench_zmq, "cuda_ipc": bench_cuda_ipc, "nccl": bench_nccl}


def unavailable(transport: str, device: str) -> str:
    """Why ``transport`` cannot be measured on ``device`` here ("" if it can)."""
    if transport == "nccl" and torch.device(device).type == "cuda" and torch.cuda.device_count() < 2:
        return f"nccl on CUDA needs 2 GPUs (one per rank), found {torch.cuda.device_count()}"
    return ""


def run(transport: str, shape: str, device: str, bucket_bytes: int, num_buffers: int, repeat: int) -> Row:
    if transport not in BENCHES:
        raise RefitError(f"refit bench supports {sorted(BENCHES)}; see benchmarks/ for the other transports")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RefitError("--device cuda needs a GPU; use --device cpu")
    return BENCHES[transport](shape, dev, bucket_bytes, num_buffers, repeat)


def table(rows: list[Row]) -> str:
    head = f"{'transport':<10} {'shape':<9} {'device':<7} {'GB':>7} {'tensors':>7} {'s':>8} {'GB/s':>8} {'ceiling GB/s':>13} {'ratio':>6}  ceiling"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['transport']:<10} {r['shape']:<9} {r['device']:<7} {r['bytes'] / 1e9:>7.3f} {r['tensors']:>7} "
            f"{r['seconds']:>8.4f} {r['gbps']:>8.2f} {r['ceiling_gbps']:>13.2f} {r['ratio']:>6.2f}  {r['ceiling']}"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RefitError("--plot needs matplotlib: pip install matplotlib") from None
    labels = [f"{r['transport']}\n{r['shape']}\n{r['device']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(4, 2 * len(rows)), 4))
    ax.bar([x - 0.2 for x in xs], [r["gbps"] for r in rows], width=0.4, label="refit push")
    ax.bar([x + 0.2 for x in xs], [r["ceiling_gbps"] for r in rows], width=0.4, label="ceiling")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("GB/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
