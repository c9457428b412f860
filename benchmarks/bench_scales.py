"""What do 10,000 0-d scales add to a push? (issue: < 5 ms of plan + pack + unpack on CPU)

Measures, in one run, a push of the same weights without scales, with N 0-d float32 scales
updated in place (quantizer buffers), with N new scale tensors every push (``amax / 448``
computed at refit time), and with the in-place scales carried inside the state (a QAT or
ModelOpt ``state_dict()``: found by name); the four alternate, so the scales are not warm in the
CPU caches from the push before, as in training. Every push compares each scale's dtype, type,
bits, shape and address with the cached layout's and checks every value:
  - sender: input validation + plan (layout cached between pushes, as in training) + pack,
  - receiver: unpack and validate, as strided views of the runs of scales (what the loader
    validates) and, on top, as one 0-d view per scale (what a non-persistent receiver
    creates to copy them into their targets),
  - receiver: apply into N separate 0-d target buffers (reported separately: it is bounded by
    one tensor write per scale, which no layout can avoid),
and the ceiling: one copy of the same scale bytes packed densely.

    python benchmarks/bench_scales.py --scales 10000 [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from refit import Refitter
from refit.bench import sync, timings
from refit.collect import Collector
from refit.load import Loader
from refit.meta import Manifest
from refit.plan import plan
from refit.report import RefitReport
from refit.resolve import TensorsResolver
from refit.scales import run_problems, run_view
from refit.transports.base import Sender


class PackOnly(Sender):
    """A sender that only packs (no receiver), to time the sender's side alone."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._bufs: list[torch.Tensor] = []

    def handshake(self, manifest: Manifest, version: int) -> None:
        pass

    def buffers(self, bucket_bytes: int, num_buffers: int) -> list[torch.Tensor]:
        if not self._bufs:
            self._bufs = [torch.empty(bucket_bytes, dtype=torch.uint8, device=self.device) for _ in range(num_buffers)]
        return self._bufs

    def wait_reusable(self, slot: int) -> None:
        pass

    def send(self, index: int, slot: int, nbytes: int) -> None:
        pass

    def finish(self) -> list[RefitReport]:
        return []

    def abort(self, reason: str) -> None:
        pass


def median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


def best(fn: Callable[[], object], repeat: int, device: torch.device) -> float:
    """Median seconds of ``repeat`` runs after a warm-up (median: this box is noisy)."""
    return median(timings(fn, repeat, device))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", type=int, default=10_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device(args.device)
    weights = {f"w{i}": torch.randn(256, 256, device=dev) for i in range(8)}
    scales = {f"model.layers.{i // 4}.proj{i % 4}.weight_scale": torch.tensor(0.5 + i % 3, device=dev) for i in range(args.scales)}
    bucket = 64 << 20

    # Sender: the pushes alternate, so drift in the machine's speed hits them alike.
    # "in_state": the same scales updated in place, carried inside the state (a QAT / ModelOpt
    # state_dict()): found by name, then read and checked as in "in_place".
    kinds = ("without", "in_place", "new_tensors", "in_state")
    senders = {kind: PackOnly(dev) for kind in kinds}
    refitters = {kind: Refitter(senders[kind], bucket_bytes=bucket, num_buffers=1) for kind in kinds}  # the real path
    given: dict[str, dict[str, torch.Tensor] | None] = {"without": None, "in_place": scales, "new_tensors": None, "in_state": None}
    states = {kind: weights for kind in kinds}
    states["in_state"] = {**weights, **scales}
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for i in range(args.repeat + 1):  # the first round warms up
        for kind in kinds:
            if kind == "new_tensors":  # made (and the last ones dropped) outside the timing
                given[kind] = None
                given[kind] = {k: v * 1.0 for k, v in scales.items()}
            sync(dev)
            t0 = time.perf_counter()
            refitters[kind].push(states[kind], given[kind])
            sync(dev)
            if i:
                times[kind].append(time.perf_counter() - t0)
    s_without, s_with, s_new, s_state = (median(times[kind]) for kind in kinds)
    snd = senders["in_place"]

    # receiver side, on the bucket the sender packed: unpack + validate every scale
    got = Collector()(weights, scales)
    manifest = plan(got.entries, bucket_bytes=bucket)
    buf = snd._bufs[0]
    metas0 = manifest.by_bucket[0]
    runs = [(i, j) for i, j, is_run in manifest.segments[0] if is_run]

    def unpack_runs() -> None:  # the received scales as strided views of the bucket, validated
        for i, j in runs:
            run_problems((), run_view(buf, metas0[i:j]), None)

    def unpack_each() -> None:  # ... and one 0-d view per scale on top
        for i, j in runs:
            v = run_view(buf, metas0[i:j])
            run_problems((), v, None)
            v.unbind()

    r_runs = best(unpack_runs, args.repeat, dev)
    r_each = best(unpack_each, args.repeat, dev)
    targets = {k: torch.empty_like(v) for k, v in got.sources.items() if isinstance(v, torch.Tensor)}  # all are tensors here
    loader = Loader(TensorsResolver(targets))

    def apply_all() -> None:
        loader.prepare(manifest, 1)
        for b in range(manifest.num_buckets):
            loader.apply(b, buf)
        loader.abort("bench")

    r_apply = best(apply_all, args.repeat, dev)
    dense = torch.stack(list(scales.values()))
    out = torch.empty_like(dense)
    ceiling = best(lambda: out.copy_(dense), args.repeat, dev)
    sender_extra = s_with - s_without
    rows = {
        "device": str(dev),
        "scales": args.scales,
        "sender_push_without_scales_ms": s_without * 1e3,
        "sender_push_with_scales_ms": s_with * 1e3,
        "sender_push_with_new_scale_tensors_ms": s_new * 1e3,
        "sender_push_scales_in_state_ms": s_state * 1e3,
        "receiver_unpack_runs_validate_ms": r_runs * 1e3,
        "receiver_unpack_per_scale_views_ms": r_each * 1e3,
        "extra_with_run_views_ms": (sender_extra + r_runs) * 1e3,
        "extra_in_state_with_run_views_ms": (s_state - s_without + r_runs) * 1e3,
        "extra_with_per_scale_views_ms": (sender_extra + r_each) * 1e3,
        "extra_new_tensors_with_run_views_ms": (s_new - s_without + r_runs) * 1e3,
        "receiver_apply_all_ms": r_apply * 1e3,
        "ceiling_dense_copy_ms": ceiling * 1e3,
    }
    for k, v in rows.items():
        print(f"{k:<34} {v:.3f}" if isinstance(v, float) else f"{k:<34} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
