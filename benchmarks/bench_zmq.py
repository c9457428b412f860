"""zmq push of a 2 GiB state over loopback tcp vs raw pyzmq zero-copy sends of the same bytes.

Both are measured in the same run, to the same receiving process: the raw ceiling sends the
bytes in the same bucket sizes with ``copy=False`` and waits for one acknowledgement; the refit
push packs, sends, and the receiver applies every tensor into its preallocated target.

    python benchmarks/bench_zmq.py [--gib 2] [--bucket-mib 64] [--num-buffers 2] [--frame-mib 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from refit.bench import bench_zmq_state
from refit.bench_output import table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0, help="state size in GiB (bf16 weights)")
    ap.add_argument("--bucket-mib", type=int, action="append", help="repeatable; default 64")
    ap.add_argument("--num-buffers", type=int, default=2)
    ap.add_argument("--frame-mib", type=float, action="append", help="repeatable: the zmq frame size (default: the transport's, 1 MiB)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where the trainer's tensors live (cpu or cuda)")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device(args.device)
    per = 32 << 20  # 32 Mi elements = 64 MiB per bf16 tensor
    n = max(1, int(args.gib * (1 << 30)) // (per * 2))
    state = {f"model.layers.{i}.mlp.weight": torch.full((per,), float(i % 5 + 1), dtype=torch.bfloat16, device=dev) for i in range(n)}
    scales = {f"model.layers.{i}.mlp.weight_scale": torch.tensor(0.5, device=dev) for i in range(n)}
    configs = [(mib << 20, args.num_buffers) for mib in (args.bucket_mib or [64])]
    rows = []
    for frame in args.frame_mib or [None]:
        frame_bytes = None if frame is None else int(frame * (1 << 20))
        label = f"{args.gib:g}GiB" + ("" if frame is None else f", {frame:g} MiB frames")
        for row in bench_zmq_state(label, state, scales, dev, configs, args.repeat, frame_bytes=frame_bytes):
            rows.append({**row, "frame_bytes": frame_bytes})
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
