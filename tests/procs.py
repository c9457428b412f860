"""Process bodies for multi-process tests (module level, so ``spawn`` children can import them).

Receivers report back through a queue: their info, then per push either a report summary or
an error, and at the end a digest of every target tensor so the parent can compare bit for bit.
"""

from __future__ import annotations

import hashlib
import os
import queue
import socket
import traceback
from typing import Any

import torch


def digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """sha256 of each tensor's raw bytes (dtype and shape included)."""
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        raw = v.reshape(-1).view(torch.uint8) if v.numel() else torch.empty(0, dtype=torch.uint8)
        out[k] = hashlib.sha256(f"{v.dtype}{tuple(v.shape)}".encode() + raw.numpy().tobytes()).hexdigest()
    return out


def make_target(spec: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, torch.Tensor]:
    """Zero-filled (raw bytes) target tensors from ``name -> (shape, dtype name)``."""
    from refit.meta import dtype_from_name

    return {k: zeros_like(torch.empty(shape, dtype=dtype_from_name(dt))) for k, (shape, dt) in spec.items()}


def zeros_like(v: torch.Tensor) -> torch.Tensor:
    """zeros_like for every dtype (float4 / float8 have no fill kernel): zero the raw bytes."""
    z = torch.empty_like(v)
    if z.numel():
        z.reshape(-1).view(torch.uint8).zero_()
    return z


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    return rss_bytes() / 2**20


def free_port() -> int:
    """A free TCP port on loopback (for a collective's default process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def zmq_receiver(
    spec: dict[str, tuple[tuple[int, ...], str]],
    out: Any,
    control: Any,
    *,
    address: str = "tcp://127.0.0.1:*",
    name: str = "rx",
    pushes: int = 1,
    timeout: float = 20.0,
    require_complete: bool = False,
) -> None:
    """Serve ``pushes`` push attempts (each: report or error), then send digests and exit."""
    from refit.receiver import RefitReceiver

    try:
        target = make_target(spec)
        rx = RefitReceiver(target, "zmq", address=address, name=name, require_complete=require_complete)
        out.put(("info", rx.info()))
        stats = []
        for _ in range(pushes):
            try:
                rep = rx.receive(timeout=timeout)
                out.put(("report", rep.to_wire()))
            except Exception as exc:  # reported to the parent, which asserts on it
                out.put(("error", type(exc).__name__, str(exc), rx.torn, rx.version))
            stats.append((open_fds(), rss_mb()))
        out.put(("final", digests(target), rx.version, rx.torn, stats))
        try:
            control.get(timeout=timeout)  # wait until the parent is done with us
        except queue.Empty:
            pass
        rx.close()
    except Exception:
        out.put(("crash", traceback.format_exc()))


# ---------------------------------------------------------------- fault matrix (tests/test_fault_matrix.py)


def fault_state(seed: int) -> dict[str, torch.Tensor]:
    """A small deterministic push (6 x 4 KiB weights and a 0-d scale): several buckets of 4 KiB."""
    gen = torch.Generator().manual_seed(seed)
    state = {f"w{i}": torch.randn(1024, generator=gen) for i in range(6)}
    state["k_scale"] = torch.rand((), generator=gen) + 0.5
    return state


FAULT_SPEC = {**{f"w{i}": ((1024,), "float32") for i in range(6)}, "k_scale": ((), "float32")}


def fault_refitter(transport: str, peers: list[Any], timeout: float, **kw: Any) -> Any:
    """A Refitter for ``transport`` on the CPU (``cuda_ipc`` over shared memory, ``nccl`` over gloo)."""
    from refit.api import Refitter

    extra: dict[str, Any] = {"cuda_ipc": {"device": "cpu"}, "nccl": {"device": "cpu", "backend": "gloo"}}.get(transport, {})
    return Refitter(transport, peers=peers, bucket_bytes=4096, num_buffers=1, timeout=timeout, **extra, **kw)


def _stall(out: Any, role: str, point: str, release: str) -> None:
    """Tell the parent ``role`` reached ``point``, then wait until ``release`` exists (or a kill)."""
    import time

    out.send((role, "at", point, time.monotonic()))
    deadline = time.monotonic() + 120
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)


def fault_receiver(cfg: dict[str, Any], out: Any) -> None:
    """A receiver of ``cfg['transport']`` whose push ``cfg['stall_push']`` stalls at ``cfg['stall']``
    (``handshake``: in the loader's prepare; ``bucket``: after applying bucket 0; ``last_bucket``:
    after applying the last one; ``finish``: in the post-load hook) until ``cfg['release']`` exists.
    Serves pushes (start polled every 0.2 s, each wait inside bounded by ``push_timeout``) until
    ``cfg["pushes"]`` outcomes or ``cfg["stop"]`` exists; reports (on the pipe end ``out``) every outcome with the
    target's digest and the monotonic time it ended."""
    import time

    from refit.errors import RefitError
    from refit.receiver import RefitReceiver
    from refit.resolve import TensorsResolver

    role = cfg.get("role", "rx")
    try:
        torch.set_num_threads(1)
        stall, release, push = cfg.get("stall"), cfg.get("release", ""), [0]
        target = make_target(FAULT_SPEC)

        def post_load() -> None:
            if stall == "finish" and push[0] == cfg.get("stall_push", 0):
                _stall(out, role, "finish", release)

        extra: dict[str, Any] = {"cuda_ipc": {"device": "cpu"}, "nccl": {"device": "cpu"}}.get(cfg["transport"], {})
        if cfg.get("address"):
            extra["address"] = cfg["address"]
        rx = RefitReceiver(TensorsResolver(target, post_load=post_load), cfg["transport"], name="rx", push_timeout=cfg["timeout"], **extra)
        prepare, apply = rx.loader.prepare, rx.loader.apply

        def prepare_hook(*args: Any, **kw: Any) -> Any:
            if stall == "handshake" and push[0] == cfg.get("stall_push", 0):
                _stall(out, role, "handshake", release)
            return prepare(*args, **kw)

        def apply_hook(index: int, bucket: torch.Tensor, **kw: Any) -> None:
            apply(index, bucket, **kw)
            last = rx.loader._require_push().manifest.num_buckets - 1
            out.send((role, "applied", (index, last), time.monotonic()))
            if push[0] == cfg.get("stall_push", 0) and (stall, index) in (("bucket", 0), ("last_bucket", last)):
                _stall(out, role, str(stall), release)

        rx.loader.prepare, rx.loader.apply = prepare_hook, apply_hook  # type: ignore[method-assign]
        out.send((role, "info", rx.info(), time.monotonic()))
        deadline = time.monotonic() + cfg.get("life", 120)
        while push[0] < cfg["pushes"] and time.monotonic() < deadline and not os.path.exists(cfg.get("stop", "/nonexistent")):
            try:
                report = rx.transport.receive(rx.loader, 0.2, push_timeout=cfg["timeout"])
                if report is None:
                    continue
                out.send((role, "result", ("ok", report.version, rx.torn, digests(target)), time.monotonic()))
            except RefitError as exc:
                kind = next(c.__name__ for c in type(exc).__mro__ if c.__module__ == "refit.errors")
                out.send((role, "result", (kind, str(exc)[:1000], rx.version, rx.torn, digests(target)), time.monotonic()))
            push[0] += 1
        rx.close()  # right after the last Done: close must still deliver it
        out.send((role, "done", None, time.monotonic()))
        while time.monotonic() < deadline and not os.path.exists(cfg.get("stop", "/nonexistent")):
            time.sleep(0.05)  # stay up (as an engine does) until the parent is done
    except BaseException:
        out.send((role, "crash", traceback.format_exc(), 0.0))


def fault_sender(cfg: dict[str, Any], peers: list[Any], out: Any) -> None:
    """One push of ``fault_state(cfg['seed'])`` as ``cfg['version']`` (None: the Refitter's
    numbering), stalled at ``cfg['stall']`` (``bucket``: after sending bucket 0; ``before_finish``:
    every bucket sent, Finish not yet) until ``cfg['release']`` exists; reports the outcome."""
    import time

    from refit.errors import RefitError

    role = cfg.get("role", "tx")
    try:
        torch.set_num_threads(1)
        stall, release = cfg.get("stall"), cfg.get("release", "")

        def progress(done: int, total: int) -> None:
            if stall == "bucket" and done == 1:
                _stall(out, role, "bucket", release)

        with fault_refitter(cfg["transport"], peers, cfg["timeout"], progress=progress) as r:
            if stall == "before_finish":
                finish = r.sender.finish

                def finish_hook() -> Any:
                    _stall(out, role, "before_finish", release)
                    return finish()

                r.sender.finish = finish_hook
            out.send((role, "started", None, time.monotonic()))
            try:
                rep = r.push(fault_state(cfg["seed"]), version=cfg.get("version"))
                out.send((role, "result", ("ok", rep.version), time.monotonic()))
            except RefitError as exc:
                kind = next(c.__name__ for c in type(exc).__mro__ if c.__module__ == "refit.errors")
                out.send((role, "result", (kind, str(exc)[:1000]), time.monotonic()))
    except BaseException:
        out.send((role, "crash", traceback.format_exc(), 0.0))
