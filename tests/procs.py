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
