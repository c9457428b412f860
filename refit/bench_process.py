"""``refit bench`` for the transports that push into another process on this host: ``zmq``
(beside raw pyzmq zero-copy sends of the same bytes in the same bucket sizes to the same
process) and ``cuda_ipc`` (beside one ``copy_`` of the bytes; shared memory on the CPU). One
receiver process serves every config of a sweep."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from refit.api import Refitter
from refit.bench_measure import BucketProgress, Configs, PeakMemory, Row, Tick, best_of, copy_ceiling, make_row, payload, report_fields
from refit.errors import RefitError
from refit.pack import host_bytes
from refit.shapes import ModelShape, make_state


def _sink(transport: str, spec: dict[str, tuple[tuple[int, ...], str]], device: str, cmds: Any, out: Any) -> None:
    """Receiver process: a raw pyzmq sink (the ceiling) and a refit receiver over ``transport``
    into targets on ``device``; ``cmds`` says what comes next: ``("raw", rounds)``,
    ``("push", pushes)`` or ``("stop",)``."""
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
    while (cmd := cmds.get(timeout=900))[0] != "stop":
        for _ in range(cmd[1]):
            if cmd[0] == "push":
                rx.receive(timeout=600)
                continue
            while True:  # a raw round: messages until an empty one, then ack
                ident, *data = raw.recv_multipart(copy=False)
                if len(data[0].buffer) == 0:
                    raw.send_multipart([ident.bytes, b"ok"])
                    break
    rx.close()
    raw.close()


def raw_zmq_seconds(address: str, buckets: list[memoryview], rounds: int, frame_bytes: int | None = None) -> float:
    """Best time to send ``buckets`` zero-copy over one socket, each one message in the frames
    refit's ``zmq`` transport would send it in (``frame_bytes``: its default), and get one ack back."""
    import zmq

    from refit.transports.zmq import DEFAULT_FRAME_BYTES, split_frames

    sock: Any = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for b in buckets:
            sock.send_multipart(split_frames(b, frame_bytes or DEFAULT_FRAME_BYTES), copy=False)
        sock.send(b"")
        sock.recv()
        times.append(time.perf_counter() - t0)
    sock.close()
    return min(times[1:]) if len(times) > 1 else times[0]


def bench_zmq(label: str, shape: ModelShape, device: torch.device, configs: Configs, repeat: int, tick: Tick, bucket: BucketProgress) -> list[Row]:
    """``zmq`` pushes to a receiver process over loopback tcp, each beside raw pyzmq zero-copy
    sends of the same bytes in the same bucket sizes to the same process."""
    state, scales = make_state(shape, device=device)
    return bench_zmq_state(label, state, scales, device, configs, repeat, tick, bucket)


def bench_zmq_state(
    label: str,
    state: dict[str, torch.Tensor],
    scales: dict[str, torch.Tensor],
    device: torch.device,
    configs: Configs,
    repeat: int,
    tick: Tick | None = None,
    bucket: BucketProgress | None = None,
    frame_bytes: int | None = None,
) -> list[Row]:
    """:func:`bench_zmq` of a given state (``frame_bytes``: the zmq transport's frame size, for
    both the push and the ceiling; default: the transport's)."""
    both, nbytes = payload(state, scales)

    def ceiling(raw_addr: str, size: int) -> float:
        view = host_bytes(torch.ones(size, dtype=torch.uint8))
        full, rest = divmod(nbytes, size)
        return raw_zmq_seconds(raw_addr, [view] * full + ([view[:rest]] if rest else []), repeat + 1, frame_bytes)

    options = {} if frame_bytes is None else {"frame_bytes": frame_bytes}
    measured = _push_to_process("zmq", state, scales, device, configs, repeat, ceiling, True, tick, bucket, options)
    return [make_row("zmq", label, device, nbytes, len(both), s, c, "raw pyzmq zero-copy", **f) for s, c, f in measured]


def bench_cuda_ipc(
    label: str, shape: ModelShape, device: torch.device, configs: Configs, repeat: int, tick: Tick, bucket: BucketProgress
) -> list[Row]:
    """``cuda_ipc`` pushes to a receiver process on the same device (shared memory on the CPU)
    beside one copy of the same bytes on that device (a push makes two: pack and apply)."""
    state, scales = make_state(shape, device=device)
    both, nbytes = payload(state, scales)

    def one_copy(_addr: str, _size: int) -> float:
        return copy_ceiling(nbytes, device, repeat)

    measured = _push_to_process("cuda_ipc", state, scales, device, configs, repeat, one_copy, False, tick, bucket)
    return [make_row("cuda_ipc", label, device, nbytes, len(both), s, c, "one copy_ (a push makes 2)", **f) for s, c, f in measured]


def _ready(proc: Any, out: Any, transport: str, limit: float = 300.0) -> tuple[str, dict[str, Any]]:
    """The receiver process's raw address and receiver info, once it is up; an error naming
    its exit code if it dies first (its traceback is on stderr), or after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            return out.get(timeout=1.0)
        except queue.Empty:
            if not proc.is_alive():
                raise RefitError(
                    f"bench: the {transport} receiver process exited with code {proc.exitcode} before it was ready (its error is above)"
                ) from None
    raise RefitError(f"bench: the {transport} receiver process was not ready within {limit:.0f} s")


def _push_to_process(
    transport: str,
    state: dict[str, torch.Tensor],
    scales: dict[str, torch.Tensor],
    device: torch.device,
    configs: Configs,
    repeat: int,
    ceiling: Callable[[str, int], float],
    raw: bool,
    tick: Tick | None,
    bucket: BucketProgress | None,
    options: dict[str, Any] | None = None,
) -> list[tuple[float, float, dict[str, Any]]]:
    """Per config: best push seconds of ``state`` + ``scales`` into one receiver process, the
    ceiling at its bucket size measured just before it (``ceiling(raw pyzmq address of that
    process, bucket_bytes)``; ``raw``: it sends ``repeat + 1`` raw rounds there), its report fields."""
    from refit.meta import dtype_name

    spec = {k: (tuple(v.shape), dtype_name(v.dtype)) for k, v in {**state, **scales}.items()}
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    cmds: Any = ctx.Queue()
    proc = ctx.Process(target=_sink, args=(transport, spec, str(device), cmds, out), daemon=True)
    proc.start()
    measured = []
    try:
        raw_addr, info = _ready(proc, out, transport)
        for bucket_bytes, nb in configs:
            if raw:
                cmds.put(("raw", repeat + 1))
            ceiling_s = ceiling(raw_addr, bucket_bytes)
            cmds.put(("push", repeat + 1))
            with Refitter(transport, peers=[info], bucket_bytes=bucket_bytes, num_buffers=nb, timeout=600, progress=bucket, **(options or {})) as r:
                with PeakMemory(device) as mem:
                    seconds, report = best_of(partial(r.push, state, scales), repeat, device)
                measured.append((seconds, ceiling_s, {**report_fields(r, report), **mem.fields()}))
            if tick is not None:
                tick(f"{transport} {bucket_bytes >> 20} MiB x {nb}")
    finally:
        cmds.put(("stop",))
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    return measured
