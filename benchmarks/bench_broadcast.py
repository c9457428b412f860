"""Broadcast benchmark of the ``nccl`` transport: a sweep of bucket sizes and buffer counts.

In one run (see ``refit/bench_broadcast.py``): for each bucket size and ``num_buffers``, our push
into receiver processes (checked bit for bit) beside the raw broadcast of the same bytes in the
same buckets; then one broadcast of the whole state (the link's ceiling) and one blocking
broadcast per tensor (the naive baseline). NCCL with one GPU per rank on GPU hosts, gloo over
loopback on CPU hosts. Each figure is the median of ``--reps`` after one warm-up. Every wait is
bounded by ``--timeout``: a hang ends in an error naming the rank and the phase.

Examples::

    python benchmarks/bench_broadcast.py --shape llama-8b --bucket-mb 64 --bucket-mb 256 --bucket-mb 1024 \\
        --num-buffers 1 --num-buffers 2 --num-buffers 3 --json out.json        # 2 x H200
    python benchmarks/bench_broadcast.py --layers 2 --vocab 32000 --bucket-mb 16    # CPU, gloo
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refit.bench_broadcast import sweep, table
from refit.shapes import SHAPES


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b", help="named shape; the flags below override its fields")
    for name in ("layers", "hidden", "intermediate", "vocab"):
        ap.add_argument(f"--{name}", type=int, default=None)
    ap.add_argument("--receivers", type=int, default=1, help="receiver processes (NCCL: one GPU each)")
    ap.add_argument("--bucket-mb", type=int, action="append", help="repeatable (default 256)")
    ap.add_argument("--num-buffers", type=int, action="append", help="repeatable (default 2)")
    ap.add_argument("--tail-mib", type=int, action="append", help="repeatable: Refitter's tail_bytes in MiB (default: its default)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    ap.add_argument("--device", default=None, help="sender device (default cuda:0 if available)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds any wait may take")
    ap.add_argument("--no-baselines", action="store_true", help="skip the whole-state and per-tensor broadcasts")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    shape = SHAPES[args.shape]
    overrides = {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "vocab") if getattr(args, k) is not None}
    if "hidden" in overrides:  # Llama proportions: head_dim 128 (64 below 2048), 4 query heads per KV head
        head_dim = 128 if overrides["hidden"] >= 2048 else 64
        heads = overrides["hidden"] // head_dim
        overrides |= {"head_dim": head_dim, "heads": heads, "kv_heads": max(1, heads // 4)}
    shape = replace(shape, **overrides)
    configs = [(mb << 20, nb) for mb, nb in itertools.product(args.bucket_mb or [256], args.num_buffers or [2])]
    result = sweep(
        shape,
        configs,
        receivers=args.receivers,
        device=args.device,
        backend=args.backend,
        reps=args.reps,
        timeout=args.timeout,
        baselines=not args.no_baselines,
        tails=[t << 20 for t in args.tail_mib] if args.tail_mib else (None,),
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    result["config"]["shape"] = {"name": args.shape, **vars(shape)}
    print(table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
