"""What every ``refit bench`` row is made of: timing (best of N after a warm-up, device work
included), the copy ceiling, the sender's peak memory, and the row itself with the push's stage
columns taken from its :class:`~refit.report.RefitReport`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from refit.api import Refitter
from refit.report import RefitReport

Row = dict[str, Any]
Configs = Sequence[tuple[int, int]]  # (bucket_bytes, num_buffers) of a sweep
Tick = Callable[[str], None]  # called when a row is done, with its label
BucketProgress = Callable[[int, int], None]


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


def best_of(fn: Callable[[], Any], repeat: int, device: torch.device) -> tuple[float, Any]:
    """Best wall seconds of ``repeat`` runs of ``fn`` after one warm-up (device work included),
    and what that run returned."""
    outs: list[Any] = []
    times = timings(lambda: outs.append(fn()), repeat, device)  # outs[0] is the warm-up's
    best = min(range(repeat), key=times.__getitem__)
    return times[best], outs[best + 1]


def copy_ceiling(nbytes: int, device: torch.device, repeat: int) -> float:
    """Best seconds of one large ``copy_`` of ``nbytes`` on ``device`` (the ceiling of any
    copy-based push); its memory is released afterwards."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)  # touched: untouched host pages read as free zero pages
    pair = [torch.zeros_like(src), src]
    del src
    best = best_of(lambda: pair[0].copy_(pair[1]), repeat, device)[0]
    pair.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return best


class PeakMemory:
    """The sender's peak memory while a block runs: host RSS (Linux ``VmHWM``, reset on entry
    through ``/proc/self/clear_refs``) and, on CUDA, the device's peak allocation."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rss_peak: int | None = None
        self.rss_added: int | None = None
        self.device_peak: int | None = None
        self.device_added: int | None = None
        self._dev0 = 0
        self._rss0: int | None = None

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def __enter__(self) -> PeakMemory:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self._rss0 = self._status("VmRSS")
        except OSError:  # not Linux, or not permitted: no per-row peak
            self._rss0 = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._dev0 = int(torch.cuda.memory_allocated(self.device))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rss0 is not None:
            self.rss_peak = self._status("VmHWM")
            self.rss_added = None if self.rss_peak is None else max(0, self.rss_peak - self._rss0)
        if self.device.type == "cuda":
            self.device_peak = int(torch.cuda.max_memory_allocated(self.device))
            self.device_added = self.device_peak - self._dev0

    def fields(self) -> dict[str, int | None]:
        """The peaks as row fields (bytes; None where not measured: no ``/proc``, or not CUDA)."""
        return {
            "rss_peak_bytes": self.rss_peak,
            "rss_added_bytes": self.rss_added,
            "device_peak_bytes": self.device_peak,
            "device_added_bytes": self.device_added,
        }


STAGES = ("plan", "handshake", "pack", "stream", "apply", "post_load")


def stages_of(sender: dict[str, float], receivers: Sequence[dict[str, float]]) -> dict[str, float]:
    """The six stage columns from a push's reports: the sender's ``plan``, ``handshake``, ``pack``
    and ``stream`` (what its stream stage spent beyond handshake and pack: waiting for free
    buffers and handing buckets over); the slowest receiver's ``apply`` and ``post_load`` (its
    ``finish``: the post-load hook and commit). Receiver stages overlap the sender's."""
    stream = sender.get("stream", 0.0) - sender.get("pack", 0.0) - sender.get("handshake", 0.0)
    return {
        "plan": sender.get("plan", 0.0),
        "handshake": sender.get("handshake", 0.0),
        "pack": sender.get("pack", 0.0),
        "stream": max(stream, 0.0),
        "apply": max((r.get("apply", 0.0) for r in receivers), default=0.0),
        "post_load": max((r.get("finish", 0.0) for r in receivers), default=0.0),
    }


def make_row(
    transport: str, shape: str, device: torch.device, nbytes: int, tensors: int, seconds: float, ceiling_s: float, ceiling: str, **extra: Any
) -> Row:
    """One measured push beside its ceiling (GB/s are 1e9 bytes per second)."""
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
        "ceiling_seconds": ceiling_s,
        "ceiling_gbps": ceiling_gbps,
        "ratio": gbps / ceiling_gbps,
        **extra,
    }


def report_fields(refitter: Refitter, report: RefitReport) -> dict[str, Any]:
    """A row's fields from one push: bucket options, per-stage seconds of the sender and each receiver, staging bytes."""
    sender, receivers = dict(report.seconds), [dict(r.seconds) for r in report.receivers]
    staging = sum(b.numel() * b.element_size() for b in refitter.sender.buffers(refitter.bucket_bytes, refitter.num_buffers))
    return {
        "bucket_bytes": refitter.bucket_bytes,
        "num_buffers": refitter.num_buffers,
        "buckets": report.buckets,
        "stages": stages_of(sender, receivers),
        "report": {"sender": sender, **{r.peer: dict(r.seconds) for r in report.receivers}},
        "staging_bytes": staging,
    }


def payload(state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Every tensor of a push, and their bytes."""
    both = {**state, **scales}
    return both, sum(v.numel() * v.element_size() for v in both.values())
