"""The ``refit bench`` command: turn its options into a sweep, run it (every transport, or a
real vLLM engine), print the table, write the JSON and the plot."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from refit.errors import RefitError
from refit.plan import DEFAULT_BUCKET_BYTES
from refit.shapes import get_shape

DEFAULT_NUM_BUFFERS = 2


def configs(bucket_mb: Sequence[int] | None, bucket_bytes: Sequence[int] | None, num_buffers: Sequence[int] | None) -> list[tuple[int, int]]:
    """Every ``(bucket_bytes, num_buffers)`` of the sweep, sizes in the order given (MiB first).

    Raises:
        RefitError: a size or count that is not positive.
    """
    sizes = [mb << 20 for mb in bucket_mb or []] + list(bucket_bytes or [])
    counts = list(num_buffers or [DEFAULT_NUM_BUFFERS])
    for name, values in (("--bucket-mb / --bucket-bytes", sizes), ("--num-buffers", counts)):
        bad = [v for v in values if v <= 0]
        if bad:
            raise RefitError(f"{name} must be positive, got {bad}")
    sizes = list(dict.fromkeys(sizes or [DEFAULT_BUCKET_BYTES]))
    return [(b, n) for b in sizes for n in dict.fromkeys(counts)]


def _command_line(args: argparse.Namespace) -> list[str]:
    """The options as given (for the JSON's ``meta.command``)."""
    out = ["bench"]
    if args.engine:
        out += ["--engine", args.engine]
    for t in args.transport or []:
        out += ["--transport", t]
    out += ["--shape", args.shape, "--device", args.device, "--repeat", str(args.repeat)]
    for mb in args.bucket_mb or []:
        out += ["--bucket-mb", str(mb)]
    for b in args.bucket_bytes or []:
        out += ["--bucket-bytes", str(b)]
    for n in args.num_buffers or []:
        out += ["--num-buffers", str(n)]
    return out


def command(args: argparse.Namespace) -> int:
    """Run ``refit bench`` with parsed ``args``; returns the exit code.

    Raises:
        RefitError: an invalid option (unknown shape, bad config.json, bad sweep) or a failed run.
    """
    from refit import bench, bench_output

    load_before = bench_output.meta([], args.repeat)["loadavg"]
    shape = get_shape(args.shape)
    sweep = configs(args.bucket_mb, args.bucket_bytes, args.num_buffers)
    if args.engine == "vllm":
        from refit import bench_vllm

        asked = args.transport or ["zmq"]
        transports = list(bench_vllm.TRANSPORTS) if "all" in asked else list(dict.fromkeys(asked))
        if args.device != "cpu":
            raise RefitError("refit bench --engine vllm runs a CPU engine here; drop --device")
    else:
        asked = args.transport or ["local"]
        transports = list(dict.fromkeys(asked))
        if "all" in transports:  # every transport this machine can run; say which were left out
            transports = [t for t in bench.BENCHES if not bench.unavailable(t, args.device)]
    bar = bench_output.Bar(len(transports) * len(sweep), quiet=args.quiet)
    rows = []
    try:
        if args.engine == "vllm":
            rows = bench_vllm.run(args.shape, shape, transports, sweep, args.repeat, tick=bar.tick, bucket=bar.buckets)
        else:
            if "all" in asked:
                for t in bench.BENCHES:
                    if why := bench.unavailable(t, args.device):
                        bar.write(f"refit bench: skipping {t}: {why}")
            for t in transports:
                rows += bench.run(t, shape, args.device, sweep, args.repeat, label=args.shape, tick=bar.tick, bucket=bar.buckets)
    finally:
        bar.close()
    info = bench_output.meta(_command_line(args), args.repeat) | {"loadavg_before": load_before}
    print(bench_vllm.table(rows) if args.engine == "vllm" else bench_output.table(rows))
    gpus = ", " + ", ".join(info["gpus"]) if info["gpus"] else ""
    load = f"load average {load_before} before, {info['loadavg']} after"
    print(f"# {info['date']}, {info['cpus']} CPUs{gpus}, torch {info['torch']}; {info['timing']}; {load}")
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(bench_output.document(rows, info), f, indent=2)
        except OSError as exc:
            raise RefitError(f"--json {args.json}: cannot write ({exc})") from None
    if args.plot:
        title = f"refit bench, shape {args.shape}, {rows[0]['device'] if rows else args.device}, {info['date']}"
        bench_output.plot(rows, args.plot, title=title)
    return 0
