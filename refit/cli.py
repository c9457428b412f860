"""The ``refit`` command: ``refit demo`` (the main job) and ``refit bench``."""

from __future__ import annotations

import argparse
import json
import sys

from refit.errors import RefitError
from refit.plan import DEFAULT_BUCKET_BYTES
from refit.shapes import SHAPES


def _bench(args: argparse.Namespace) -> int:
    from refit import bench

    transports = args.transport
    if "all" in transports:  # every transport this machine can run; say which were left out
        transports = [t for t in bench.BENCHES if not bench.unavailable(t, args.device)]
        for t in bench.BENCHES:
            if why := bench.unavailable(t, args.device):
                print(f"refit bench: skipping {t}: {why}", file=sys.stderr)
    rows = [bench.run(t, args.shape, args.device, args.bucket_bytes, args.num_buffers, args.repeat) for t in transports]
    print(bench.table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.plot:
        bench.plot(rows, args.plot)
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        from refit.demos.vllm_demo import main as vllm_demo

        return vllm_demo(transport=args.transport, shape=args.shape)
    from refit.demos.torch_engine import main as torch_demo

    return torch_demo(transport=args.transport, shape=args.shape, pushes=args.pushes)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refit", description="Move trainer weights and quantization scales into inference engines.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="a real refit end to end: a trainer process pushes into an engine process")
    d.add_argument("--engine", choices=["torch", "vllm"], default="torch", help="engine process: a torch model, or a tiny vLLM engine")
    d.add_argument("--transport", default="zmq", help="transport (default zmq)")
    d.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="model shape (default tiny)")
    d.add_argument("--pushes", type=int, default=3, help="consecutive pushes (default 3)")
    d.set_defaults(func=_demo)

    b = sub.add_parser("bench", help="measure a push of a synthetic model-shaped state against its ceiling")
    b.add_argument("--transport", action="append", choices=["local", "zmq", "cuda_ipc", "nccl", "all"], help="repeatable, or all; default local")
    b.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    b.add_argument("--bucket-bytes", type=int, default=DEFAULT_BUCKET_BYTES)
    b.add_argument("--num-buffers", type=int, default=2)
    b.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up; the best is reported")
    b.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    b.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "transport", None) is None:
        args.transport = ["local"]
    try:
        return int(args.func(args))
    except RefitError as exc:
        print(f"refit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
