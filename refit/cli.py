"""The ``refit`` command: ``refit demo`` (the main job), ``refit bench`` and ``refit verify``."""

from __future__ import annotations

import argparse
import sys

from refit.errors import RefitError
from refit.plan import DEFAULT_BUCKET_BYTES
from refit.shapes import SHAPES


def _bench(args: argparse.Namespace) -> int:
    from refit.bench_cmd import command

    return command(args)


def _demo(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        from refit.demos.vllm_demo import main as vllm_demo

        return vllm_demo(transport=args.transport, shape=args.shape)
    from refit.demos.torch_engine import main as torch_demo

    return torch_demo(transport=args.transport, shape=args.shape, pushes=args.pushes)


def parser() -> argparse.ArgumentParser:
    """The ``refit`` argument parser: subcommands ``demo``, ``bench`` and ``verify``."""
    p = argparse.ArgumentParser(prog="refit", description="Move trainer weights and quantization scales into inference engines.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="a real refit end to end: a trainer process pushes into an engine process")
    d.add_argument("--engine", choices=["torch", "vllm"], default="torch", help="engine process: a torch model, or a tiny vLLM engine")
    d.add_argument("--transport", default="zmq", help="transport (default zmq)")
    d.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="model shape (default tiny)")
    d.add_argument("--pushes", type=int, default=3, help="consecutive pushes (default 3)")
    d.set_defaults(func=_demo)

    b = sub.add_parser("bench", help="measure a push of a synthetic model-shaped state against its ceiling")
    b.add_argument(
        "--transport",
        action="append",
        choices=["local", "zmq", "cuda_ipc", "nccl", "all"],
        help="repeatable, or all; default local (zmq with --engine vllm)",
    )
    b.add_argument("--engine", choices=["vllm"], help="push into a real vLLM engine (CPU) beside vLLM's own reload of the same tensors")
    b.add_argument("--shape", default="llama-1b", help=f"a named shape ({', '.join(sorted(SHAPES))}) or the path of an HF config.json")
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    default_mib = DEFAULT_BUCKET_BYTES >> 20
    b.add_argument("--bucket-mb", type=int, action="append", metavar="MIB", help=f"bucket size in MiB, repeatable (default {default_mib})")
    b.add_argument("--bucket-bytes", type=int, action="append", metavar="BYTES", help="bucket size in bytes, repeatable")
    b.add_argument("--num-buffers", type=int, action="append", metavar="N", help="staging buffers in flight, repeatable (default 2)")
    b.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up; the best is reported")
    b.add_argument("--json", metavar="PATH", help="write the rows (stages, memory, ratios) and where they were measured as JSON")
    b.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s against bucket size with the ceilings (needs matplotlib)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_bench)

    from refit.verify_cmd import add_parser as add_verify

    add_verify(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the ``refit`` command with ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status: the subcommand's, or 2 after a :class:`~refit.errors.RefitError` (printed on stderr).
    """
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except RefitError as exc:
        print(f"refit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
