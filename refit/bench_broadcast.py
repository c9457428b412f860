"""The ``nccl`` transport's benchmark: a push against raw broadcasts of the same bytes.

One sender (this process, rank 0) and ``receivers`` receiver processes: one GPU each with NCCL
(the sender on ``cuda:0``, receiver ``r`` on ``cuda:r``), the CPU with gloo. In one run, for each
``(bucket_bytes, num_buffers)`` of the sweep:

* ``push``: ``Refitter("nccl").push(state, scales)`` into plain torch targets, which each
  receiver then compares with the state bit for bit;
* ``raw buckets``: the same bytes in buckets of the same sizes, ``num_buffers`` in flight, with
  no packing and no applying: the ceiling of a bucketed broadcast;

and once per run:

* ``link``: one broadcast of the whole state's bytes (the link's ceiling);
* ``per tensor``: one blocking broadcast per tensor (the baseline many RL frameworks use).

Every wait is bounded by ``timeout``; a receiver that fails or dies ends the run with an error
naming its rank and the phase, never a hang. Receivers rebuild the state from the same seed on
their own device (CUDA's generator gives the same numbers on GPUs of one model).
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import queue
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from refit.api import Refitter
from refit.errors import RefitError
from refit.report import RefitReport
from refit.shapes import ModelShape, make_state
from refit.transports.collective import (
    Backend,
    Communicator,
    Handle,
    Rendezvous,
    StoreServer,
    choose_backend,
    client_store,
    cupy_nccl,
    new_group_id,
)
from refit.transports.join import connect

Row = dict[str, Any]
_POLL = 1.0  # seconds between checks that the receivers are still alive


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def bucketed(comm: Communicator, bufs: list[torch.Tensor], sizes: Sequence[int]) -> None:
    """Broadcast buckets of ``sizes`` bytes through ``bufs`` (``len(bufs)`` in flight)."""
    nb, pending = len(bufs), dict[int, Handle]()
    for i, size in enumerate(sizes):
        if i - nb in pending:
            pending.pop(i - nb).wait()
        if size:
            pending[i] = comm.broadcast(bufs[i % nb][:size], f"raw bucket {i}")
    for h in pending.values():
        h.wait()


def whole(comm: Communicator, buf: torch.Tensor) -> None:
    """One broadcast of the whole state's bytes in ``buf``: the link's ceiling."""
    comm.broadcast(buf, "whole state").wait()


def per_tensor(comm: Communicator, tensors: list[torch.Tensor]) -> None:
    """One blocking broadcast per tensor, the baseline many RL frameworks use."""
    for i, t in enumerate(tensors):
        comm.broadcast(_raw(t), f"tensor {i}").wait()


def _receiver(shape: ModelShape, device: str, rank: int, timeout: float, cmds: Any, res: Any) -> None:
    from refit.receiver import RefitReceiver

    phase = "start"
    try:
        torch.set_num_threads(1)
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        state, scales = make_state(shape, device=device, seed=0)
        expected = {**state, **scales}
        target = {k: torch.empty_like(v) for k, v in expected.items()}
        tensors = [target[k] for k in sorted(target)]
        comm: Communicator | None = None
        with RefitReceiver(target, "nccl", name=f"rx{rank}", device=device, push_timeout=timeout) as rx:
            res.put(("ok", rank, "info", rx.info()))
            while True:
                cmd = cmds.get(timeout=timeout * 10)
                phase = cmd[0]
                if phase == "stop":
                    break
                if phase == "push":
                    for t in tensors:
                        _raw(t).zero_()
                    for _ in range(cmd[1]):
                        rx.receive(timeout=timeout)
                        res.put(("ok", rank, phase, None))
                    bad = [k for k in sorted(target) if not torch.equal(_raw(target[k]), _raw(expected[k]))]
                    if bad:
                        raise RefitError(f"{len(bad)} tensors arrived corrupted, e.g. {bad[:3]}")
                    res.put(("ok", rank, "check", None))
                    continue
                if phase == "join":
                    rdv = Rendezvous.decode(cmd[1])
                    comm = connect(rdv, client_store(rdv.host, rdv.port, rdv.timeout), rank, torch.device(device))
                    res.put(("ok", rank, phase, None))
                    continue
                if comm is None:
                    raise RefitError(f"no raw group for {phase!r}")
                run = _raw_step(cmd, comm, tensors, device)
                for _ in range(cmd[-1]):
                    run()
                    res.put(("ok", rank, phase, None))
        if comm is not None:
            comm.close()
    except BaseException:
        res.put(("error", rank, phase, traceback.format_exc()))


def _raw_step(cmd: tuple[Any, ...], comm: Communicator, tensors: list[torch.Tensor], device: str) -> Callable[[], None]:
    """One side of a raw measurement, buffers allocated once before timing (``tensors``: the
    per-tensor baseline's, in name order)."""
    if cmd[0] == "raw":
        sizes, nb = cmd[1], cmd[2]
        bufs = [torch.empty(max(sizes), dtype=torch.uint8, device=device) for _ in range(nb)]
        return lambda: bucketed(comm, bufs, sizes)
    if cmd[0] == "link":
        buf = torch.empty(cmd[1], dtype=torch.uint8, device=device)
        return lambda: whole(comm, buf)
    if cmd[0] == "per_tensor":
        return lambda: per_tensor(comm, tensors)
    raise RefitError(f"unknown command {cmd[0]!r}")


class _World:
    """The receiver processes and the bounded waits for their answers."""

    def __init__(self, shape: ModelShape, devices: list[str], timeout: float) -> None:
        ctx = mp.get_context("spawn")
        self.timeout = timeout
        self.res: Any = ctx.Queue()
        self._early: list[tuple[str, int, str, Any]] = []
        self.cmds: list[Any] = [ctx.Queue() for _ in devices]
        self.procs = [
            ctx.Process(target=_receiver, args=(shape, dev, r + 1, timeout, self.cmds[r], self.res), name=f"rx{r + 1}", daemon=True)
            for r, dev in enumerate(devices)
        ]
        for p in self.procs:
            p.start()

    def tell(self, *cmd: Any) -> None:
        for q in self.cmds:
            q.put(cmd)

    def answers(self, phase: str, limit: float | None = None) -> list[Any]:
        """One answer of ``phase`` from every receiver; raises naming the rank and phase.

        A rank that already answered may run ahead into its next phase before the others
        answer: its next messages are kept, in order, for the next call.
        """
        deadline = time.monotonic() + (limit or self.timeout)
        got: dict[int, Any] = {}
        early, self._early = self._early, []
        while len(got) < len(self.procs):
            try:
                kind, rank, what, payload = early.pop(0) if early else self.res.get(timeout=_POLL)
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    why = f"receiver(s) {dead} died" if dead else f"no answer within {limit or self.timeout} s"
                    raise RefitError(f"bench: {why} (phase {phase}; answered: ranks {sorted(got)})") from None
                continue
            if kind == "error":
                raise RefitError(f"bench: receiver rank {rank} failed in phase {what}:\n{payload}")
            if rank in got:
                self._early.append((kind, rank, what, payload))
                continue
            if what != phase:
                raise RefitError(f"bench: receiver rank {rank} answered {what!r}, expected {phase!r}")
            got[rank] = payload
        self._early += early  # not looked at yet: they follow what was kept above
        return [got[r] for r in sorted(got)]

    def close(self) -> None:
        self.tell("stop")
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def _timed(run: Callable[[], object], world: _World, phase: str, reps: int) -> list[float]:
    """Seconds of ``reps`` runs after one warm-up, each until every receiver reported done."""
    times = []
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        run()
        world.answers(phase)
        if rep:
            times.append(time.perf_counter() - t0)
    return times


def _ms(seconds: dict[str, float]) -> dict[str, float]:
    return {k: round(v * 1e3, 3) for k, v in seconds.items()}


def _row(method: str, nbytes: int, times: list[float], **extra: Any) -> Row:
    s = statistics.median(times)
    return {"method": method, "seconds": s, "best_s": min(times), "gbps": nbytes / s / 1e9, **extra}


def sweep(
    shape: ModelShape,
    configs: Sequence[tuple[int, int]],
    *,
    receivers: int = 1,
    device: str | None = None,
    backend: str = "auto",
    reps: int = 3,
    timeout: float = 120.0,
    baselines: bool = True,
    tails: Sequence[int | None] = (None,),
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure the push for each ``(bucket_bytes, num_buffers)`` and each ``tail_bytes`` of
    ``tails`` (``None``: the Refitter's default) beside its raw ceilings.

    Returns ``{"config": {...}, "rows": [...]}``: one ``push`` and one ``raw buckets`` row per
    config (``vs_raw``: raw seconds over push seconds, same bucket sizes), then ``link`` and
    ``per tensor`` rows when ``baselines``.

    Raises:
        RefitError: a receiver failed, died, answered late, or data arrived corrupted.
    """
    dev = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    chosen = choose_backend(backend, dev)
    if chosen is Backend.NCCL:
        if torch.cuda.device_count() < receivers + 1:
            raise RefitError(f"backend nccl needs one GPU per rank: {receivers} receivers + the sender > {torch.cuda.device_count()} GPUs")
        dev = torch.device("cuda", dev.index or 0)
        devices = [f"cuda:{(dev.index + r) % torch.cuda.device_count()}" for r in range(1, receivers + 1)]
    else:
        devices = [str(dev) if dev.type == "cuda" else "cpu"] * receivers
    say = log or (lambda _: None)
    state, scales = make_state(shape, device=dev, seed=0)
    tensors = {**state, **scales}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    world = _World(shape, devices, timeout)
    rows: list[Row] = []
    try:
        addresses = [a["address"] for a in world.answers("info", limit=timeout + 60)]  # CUDA init, state
        layouts: list[tuple[int, int, list[int]]] = []
        for (bucket_bytes, nb), tail in itertools.product(configs, tails):
            with Refitter(
                "nccl", peers=addresses, backend=str(chosen), device=dev, bucket_bytes=bucket_bytes, num_buffers=nb, tail_bytes=tail, timeout=timeout
            ) as r:
                world.tell("push", reps + 1)
                reports: list[RefitReport] = []
                times = _timed(lambda: reports.append(r.push(state, scales)), world, "push", reps)  # noqa: B023 (called at once)
                world.answers("check")
                sizes = list(r.manifest.bucket_sizes) if r.manifest is not None else []
                tail = r.tail_bytes
            layouts.append((bucket_bytes, nb, sizes))
            stages = {"sender": _ms(reports[-1].seconds)} | {x.peer: _ms(x.seconds) for x in reports[-1].receivers}
            rows.append(_row("push", nbytes, times, bucket_bytes=bucket_bytes, num_buffers=nb, tail_bytes=tail, buckets=len(sizes), stages_ms=stages))
            say(f"push {bucket_bytes >> 20} MiB x {nb}, tail {tail >> 20} MiB: {rows[-1]['gbps']:.1f} GB/s")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        comm, store = _raw_group(world, chosen, dev, timeout)
        try:
            for (bucket_bytes, nb, sizes), push in zip(layouts, [r for r in rows if r["method"] == "push"]):
                world.tell("raw", sizes, nb, reps + 1)
                run = _raw_step(("raw", sizes, nb), comm, [], str(dev))
                times = _timed(run, world, "raw", reps)
                raw = _row("raw buckets", nbytes, times, bucket_bytes=bucket_bytes, num_buffers=nb, tail_bytes=push["tail_bytes"], buckets=len(sizes))
                del run
                push["vs_raw"] = raw["seconds"] / push["seconds"]
                rows.append(raw)
                say(f"raw {bucket_bytes >> 20} MiB x {nb}: {raw['gbps']:.1f} GB/s (push/raw {push['vs_raw']:.3f})")
            if baselines:
                ordered = [tensors[k] for k in sorted(tensors)]
                for cmd, method, count in ((("link", nbytes), "link", 1), (("per_tensor",), "per tensor", len(ordered))):
                    world.tell(*cmd, reps + 1)
                    run = _raw_step(cmd, comm, ordered, str(dev))
                    rows.append(_row(method, nbytes, _timed(run, world, cmd[0], reps), buckets=count))
                    del run
        finally:
            comm.close()
            store.close()
    finally:
        world.close()
    config = {"backend": str(chosen), "device": str(dev), "receivers": receivers, "reps": reps}
    return {"config": {**config, "bytes": nbytes, "tensors": len(tensors), "scales": len(scales)}, "rows": rows}


def _raw_group(world: _World, backend: Backend, device: torch.device, timeout: float) -> tuple[Communicator, StoreServer]:
    """A private group of the same backend for the raw measurements (rank 0: this process)."""
    store = StoreServer("127.0.0.1", timeout)
    nccl = cupy_nccl() if backend is Backend.NCCL else None
    uid = bytes(b & 0xFF for b in nccl.get_unique_id()) if nccl is not None else b""
    n = len(world.procs) + 1
    me = Rendezvous(backend=backend, group=new_group_id(), rank=0, world=n, host="127.0.0.1", port=store.port, unique_id=uid, timeout=timeout)
    for rank, q in enumerate(world.cmds, start=1):
        q.put(("join", replace(me, rank=rank).encode()))
    if store.store is None:
        raise RefitError("bench: the rendezvous store is closed")
    comm = connect(me, store.store, 0, device)
    world.answers("join")
    return comm, store


def table(result: dict[str, Any]) -> str:
    """The rows as a text table, with the best push against its raw ceiling last."""
    c = result["config"]
    lines = [
        f"backend {c['backend']}, sender {c['device']}, {c['receivers']} receiver(s), {c['tensors']} tensors ({c['scales']} 0-d scales), "
        f"{c['bytes'] / 1e9:.3f} GB, median of {c['reps']} after a warm-up",
        f"{'method':<12}{'bucket MiB':>11}{'buffers':>8}{'tail MiB':>9}{'buckets':>8}{'seconds':>10}{'GB/s':>9}{'push/raw':>9}",
    ]
    for r in result["rows"]:
        mib = f"{r['bucket_bytes'] >> 20}" if "bucket_bytes" in r else "-"
        nb = str(r.get("num_buffers", "-"))
        tail = f"{r['tail_bytes'] >> 20}" if "tail_bytes" in r else "-"
        ratio = f"{r['vs_raw']:.3f}" if "vs_raw" in r else ""
        lines.append(f"{r['method']:<12}{mib:>11}{nb:>8}{tail:>9}{r['buckets']:>8}{r['seconds']:>10.4f}{r['gbps']:>9.2f}{ratio:>9}")
    pushes = [r for r in result["rows"] if "vs_raw" in r]
    if pushes:
        best = max(pushes, key=lambda r: r["gbps"])
        raw = max((r for r in result["rows"] if r["method"] == "raw buckets"), key=lambda r: r["gbps"])
        for peer, ms in best["stages_ms"].items():
            lines.append(f"  stages of its last push, {peer} (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))
        lines.append(
            f"best push {best['gbps']:.1f} GB/s ({best['bucket_bytes'] >> 20} MiB x {best['num_buffers']}, tail {best['tail_bytes'] >> 20} MiB): "
            f"{best['vs_raw']:.3f} of raw at its bucket size; {best['gbps'] / raw['gbps']:.3f} of the best raw ({raw['gbps']:.1f} GB/s)"
        )
    return "\n".join(lines)
