"""What does quantizing to FP8 on push cost? (issue 18: FP8 quantize-on-push against a plain push)

Pushes one state shaped like a named model (default Llama-8B, bfloat16) through
``Refitter("local")`` into targets on the same device, in one run:

  - **plain**: the bfloat16 weights as they are (2 bytes per element moved);
  - **fp8 tensor**: every q/k/v/o/gate/up/down weight quantized on push by
    :func:`refit.fp8.fp8_stream` (one float32 ``weight_scale`` per weight; the quantizer writes
    float8_e4m3fn straight into the bucket), everything else as it is;
  - **fp8 block**: the same with 128x128 block scales (``weight_scale_inv``);

beside, in the same run, the ceiling of any push (one ``copy_`` of the plain push's bytes) and
the naive baseline: :func:`refit.fp8.quantize` of every selected weight into new tensors, no push. Every push is
checked bit for bit against the quantizer's output on a sample of weights. Seconds are the
median of ``--repeat`` pushes after a warm-up; GB/s are of the bfloat16 state read.

    python benchmarks/bench_fp8.py [--shape llama-8b] [--device cuda] [--bucket-mb 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from refit import Refitter
from refit.bench import copy_ceiling, sync, timings
from refit.fp8 import Scheme, fp8_stream, is_linear_weight, quantize
from refit.shapes import get_shape


def median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


def make_state(shape_name: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Random bfloat16 weights (``randn``: realistic amax per tensor), generated on ``device``."""
    g = torch.Generator(device=device).manual_seed(0)
    return {name: torch.randn(shp, generator=g, device=device, dtype=torch.bfloat16) for name, shp in get_shape(shape_name).weights()}


def fp8_targets(state: dict[str, torch.Tensor], scheme: Scheme) -> dict[str, torch.Tensor]:
    """Empty targets of what ``fp8_stream(state, scheme)`` produces (fp8 weights and their scales)."""
    return {name: torch.empty(v.shape, dtype=v.dtype, device=next(iter(state.values())).device) for name, v in fp8_stream(state.items(), scheme=scheme)}


def check_sample(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], scheme: Scheme, every: int = 17) -> int:
    """Compare every ``every``-th quantized weight and its scale with :func:`quantize`, bit for bit."""
    checked = 0
    for i, (name, w) in enumerate(n for n in state.items() if is_linear_weight(n[0], tuple(n[1].shape))):
        if i % every:
            continue
        q, s = quantize(w, scheme)
        scale_name = name + ("_scale" if scheme is Scheme.TENSOR else "_scale_inv")
        if not torch.equal(target[name].view(torch.uint8), q.view(torch.uint8)) or not torch.equal(target[scale_name], s):
            raise SystemExit(f"bench_fp8: {name} ({scheme}) differs from refit.fp8.quantize")
        checked += 1
    return checked


def timed(fn: Callable[[], object], repeat: int, device: torch.device) -> float:
    return median(timings(fn, repeat, device))


def bench_scheme(
    state: dict[str, torch.Tensor], selected: list[torch.Tensor], scheme: Scheme, bucket: int, repeat: int, device: torch.device, row: Callable[..., None]
) -> None:
    """The FP8 push of one scheme (checked on a sample) and the naive per-weight baseline."""
    target = fp8_targets(state, scheme)
    moved = sum(v.numel() * v.element_size() for v in target.values())
    with Refitter("local", target=target, bucket_bytes=bucket) as r:
        seconds = timed(lambda: r.push(fp8_stream(state.items(), scheme=scheme)), repeat, device)
    row(f"fp8 push ({scheme})", seconds, moved, checked=check_sample(state, target, scheme))
    del target
    if device.type == "cuda":
        torch.cuda.empty_cache()

    def quantize_all() -> None:
        for w in selected:
            quantize(w, scheme)

    row(f"baseline: quantize() per weight ({scheme})", timed(quantize_all, repeat, device), 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bucket-mb", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    device = torch.device(args.device)
    bucket = args.bucket_mb << 20
    state = make_state(args.shape, device)
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    selected = [v for n, v in state.items() if is_linear_weight(n, tuple(v.shape))]
    print(f"{args.shape} on {device}: {len(state)} tensors, {nbytes / 1e9:.2f} GB bfloat16, {len(selected)} linear weights quantized; buckets {args.bucket_mb} MiB")

    rows: list[dict[str, Any]] = []

    def row(label: str, seconds: float, moved: int, **extra: object) -> None:
        rows.append({"what": label, "seconds": seconds, "bytes_moved": moved, "gbps_of_state": nbytes / seconds / 1e9, **extra})

    plain_target = {k: torch.empty_like(v) for k, v in state.items()}
    with Refitter("local", target=plain_target, bucket_bytes=bucket) as r:
        row("plain push (bfloat16)", timed(lambda: r.push(state), args.repeat, device), nbytes)
    if not all(torch.equal(plain_target[k], v) for k, v in state.items()):
        raise SystemExit("bench_fp8: the plain push arrived corrupted")
    del plain_target
    for scheme in (Scheme.TENSOR, Scheme.BLOCK):
        bench_scheme(state, selected, scheme, bucket, args.repeat, device, row)
    row("ceiling: one copy_ of the plain bytes", copy_ceiling(nbytes, device, args.repeat), nbytes)

    plain = float(rows[0]["seconds"])
    print(f"{'what':44} {'seconds':>8} {'GB/s':>7} {'x plain':>8} {'bytes moved':>12}")
    for r_ in rows:
        s, moved = float(r_["seconds"]), int(r_["bytes_moved"])
        r_["ratio_to_plain"] = s / plain
        print(f"{r_['what']:44} {s:8.3f} {nbytes / s / 1e9:7.1f} {s / plain:8.2f} {moved / 1e9:11.2f}G")
    if args.json:
        meta = {"shape": args.shape, "device": str(device), "bucket_mb": args.bucket_mb, "repeat": args.repeat, "state_bytes": nbytes, "date": time.strftime("%Y-%m-%d")}
        if device.type == "cuda":
            meta["gpu"] = torch.cuda.get_device_name(device)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    sync(device)


if __name__ == "__main__":
    main()
