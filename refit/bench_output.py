"""What ``refit bench`` shows of its rows: the text table, the JSON document, the PNG plot of
throughput against bucket size (ceilings drawn), and the progress bar while it runs."""

from __future__ import annotations

import os
import platform
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any

import torch

from refit.bench_measure import STAGES, Row
from refit.errors import RefitError


def _mib(n: int | None, digits: str = ".4g") -> str:
    return "-" if n is None else f"{n / (1 << 20):{digits}}"


def table(rows: Sequence[Row]) -> str:
    """The rows as text: one line per (transport, bucket size, buffer count) with GB/s, the
    ceiling and the ratio, the stage seconds (ms), staging and the sender's added peak RSS (MiB)."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        r0 = next(r for r in rows if r["shape"] == shape)
        lines.append(f"shape {shape}: {r0['tensors']} tensors, {r0['bytes'] / 1e9:.3f} GB on {r0['device']}")
    stage_head = " ".join(f"{s.replace('handshake', 'hshake').replace('post_load', 'post-load'):>9}" for s in STAGES)
    head = (
        f"{'transport':<10} {'bucket MiB':>10} {'bufs':>4} {'buckets':>7} {'s':>8} {'GB/s':>7} {'ceil GB/s':>9} {'ratio':>5}  "
        f"{stage_head}  {'staging MiB':>11} {'RSS+ MiB':>8}"
    )
    on_device = any(r.get("device_added_bytes") is not None for r in rows)
    head += f" {'dev+ MiB':>8}  ceiling" if on_device else "  ceiling"
    lines += [
        "stage ms: sender plan, handshake, pack, stream; slowest receiver apply, post-load; "
        "RSS+ (dev+): the sender's peak RSS (CUDA allocation) over its start",
        head,
    ]
    lines.append("-" * len(head))
    for r in rows:
        st = r.get("stages", {})
        stages = " ".join(f"{st[s] * 1e3:>9.1f}" if s in st else f"{'-':>9}" for s in STAGES)
        lines.append(
            f"{r['transport']:<10} {_mib(r.get('bucket_bytes')):>10} {r.get('num_buffers', '-'):>4} {r.get('buckets', '-'):>7} "
            f"{r['seconds']:>8.4f} {r['gbps']:>7.2f} {r['ceiling_gbps']:>9.2f} {r['ratio']:>5.2f}  {stages}  "
            f"{_mib(r.get('staging_bytes'), '.0f'):>11} {_mib(r.get('rss_added_bytes'), '.0f'):>8}"
            + (f" {_mib(r.get('device_added_bytes'), '.0f'):>8}" if on_device else "")
            + f"  {r['ceiling']}"
        )
    return "\n".join(lines)


def meta(argv: Sequence[str], repeat: int) -> dict[str, Any]:
    """Where and when the rows were measured (for the JSON document and the docs)."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["refit", *argv]),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "repeat": repeat,
        "timing": f"best of {repeat} after one warm-up",
        "loadavg": load,
    }


def document(rows: Sequence[Row], info: dict[str, Any]) -> dict[str, Any]:
    """The ``--json`` document: ``{"meta": ..., "rows": [...]}`` (seconds, bytes, GB/s)."""
    return {"meta": info, "rows": list(rows)}


def plot(rows: Sequence[Row], path: str, title: str = "") -> None:
    """Write a PNG of push GB/s against bucket size, one line per transport and buffer count,
    each transport's ceiling dashed in the same colour.

    Raises:
        RefitError: matplotlib is missing, or ``path`` cannot be written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RefitError("--plot needs matplotlib: pip install 'refit-stream[bench]' (or pip install matplotlib)") from None
    if not rows:
        raise RefitError("--plot: nothing was measured, no plot written")
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    colours = plt.get_cmap("tab10")
    transports = list(dict.fromkeys(r["transport"] for r in rows))
    sizes = sorted({r["bucket_bytes"] / (1 << 20) for r in rows})
    for i, t in enumerate(transports):
        mine = [r for r in rows if r["transport"] == t]
        colour = colours(i % 10)
        markers = "osD^v<>"
        for j, nb in enumerate(sorted({r["num_buffers"] for r in mine})):
            pts = sorted((r["bucket_bytes"] / (1 << 20), r["gbps"]) for r in mine if r["num_buffers"] == nb)
            ax.plot(
                [x for x, _ in pts], [y for _, y in pts], marker=markers[j % len(markers)], color=colour, label=f"{t}, {nb} buffer{'s' * (nb > 1)}"
            )
        by_size: dict[float, list[float]] = {}
        for r in mine:
            if r.get("ceiling_gbps"):  # a vLLM row over gloo has none
                by_size.setdefault(r["bucket_bytes"] / (1 << 20), []).append(r["ceiling_gbps"])
        if not by_size:
            continue
        cx = sorted(by_size)
        cy = [max(by_size[x]) for x in cx]
        label = f"{t} ceiling: {mine[0]['ceiling']}"
        if len(cx) == 1 or len(set(cy)) == 1:
            ax.axhline(cy[0], color=colour, linestyle="--", linewidth=1.2, label=label)
        else:
            ax.plot(cx, cy, color=colour, linestyle="--", linewidth=1.2, label=label)
    reloads = [r["bytes"] / r["reload_seconds"] / 1e9 for r in rows if r.get("reload_seconds")]
    if reloads:  # refit bench --engine vllm: vLLM loading the same tensors in-process
        ax.axhline(max(reloads), color="black", linestyle=":", linewidth=1.4, label="vLLM's own reload (in-process, one load_weights)")
    if len(sizes) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"{x:g}" for x in sizes])
    ax.set_xlabel("bucket size (MiB)")
    ax.set_ylabel("GB/s (1e9 bytes/s)")
    values = [v for r in rows for v in (r["gbps"], r.get("ceiling_gbps")) if v] + reloads
    if max(values) > 20 * min(values):  # transports an order of magnitude apart: log scale shows both
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title("\n".join(textwrap.wrap(title or "refit push vs ceiling", 90)), fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise RefitError(f"--plot {path}: cannot write the PNG ({exc})") from None
    finally:
        plt.close(fig)


class Bar:
    """A tqdm progress bar on stderr over the rows of a run; silent when stderr is not a
    terminal, with ``quiet``, or without tqdm."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self._bar: Any = None
        self._last = 0.0
        if quiet or not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, file=sys.stderr, unit="row", dynamic_ncols=True, leave=False)

    def tick(self, label: str) -> None:
        """One row is measured."""
        if self._bar is not None:
            self._bar.set_description_str(f"done {label}", refresh=False)
            self._bar.update(1)
            self._bar.refresh()  # rows are seconds apart: show each at once

    def buckets(self, done: int, total: int) -> None:
        """Progress of the push in flight (a Refitter ``progress`` callback), redrawn at most 5 times a second."""
        now = time.monotonic()
        if self._bar is not None and (now - self._last > 0.2 or done == total):
            self._last = now
            self._bar.set_postfix_str(f"bucket {done}/{total}")

    def write(self, line: str) -> None:
        """A message on stderr that does not break the bar."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def close(self) -> None:
        """Close the bar (if one is shown)."""
        if self._bar is not None:
            self._bar.close()
