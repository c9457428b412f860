"""The broadcast benchmark on CPU (gloo): the sweep runs, checks what arrived, and never hangs."""

from __future__ import annotations

import time

import pytest

from refit.bench_broadcast import _World, sweep, table
from refit.cli import main as cli
from refit.errors import RefitError
from refit.shapes import get_shape

pytestmark = pytest.mark.integration


def test_sweep_rows_and_table() -> None:
    out = sweep(get_shape("tiny"), [(1 << 20, 1), (256 << 10, 2)], receivers=2, device="cpu", reps=1, timeout=30, tails=(0, 64 << 10))
    methods = [r["method"] for r in out["rows"]]
    assert methods == ["push"] * 4 + ["raw buckets"] * 4 + ["link", "per tensor"]
    pushes = [r for r in out["rows"] if r["method"] == "push"]
    assert [(r["bucket_bytes"], r["num_buffers"], r["tail_bytes"]) for r in pushes] == [(b, n, t) for b, n in [(1 << 20, 1), (256 << 10, 2)] for t in (0, 64 << 10)]
    assert pushes[2]["buckets"] > pushes[0]["buckets"] >= 1
    assert pushes[1]["buckets"] > pushes[0]["buckets"]  # the tail cut off the end of the one bucket
    assert all(r["vs_raw"] > 0 and r["gbps"] > 0 for r in pushes)
    assert out["config"]["backend"] == "gloo" and out["config"]["tensors"] == 39
    text = table(out)
    assert "best push" in text and "per tensor" in text


def test_a_dead_receiver_ends_the_wait_at_once_naming_the_phase() -> None:
    world = _World(get_shape("tiny"), ["cpu"], timeout=60)
    try:
        world.answers("info", limit=120)
        world.procs[0].kill()
        t0 = time.monotonic()
        with pytest.raises(RefitError, match=r"receiver\(s\) \['rx1'\] died \(phase push"):
            world.answers("push")
        assert time.monotonic() - t0 < 10
    finally:
        world.close()


def test_cli_bench_nccl_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["bench", "--transport", "nccl", "--shape", "tiny", "--bucket-bytes", str(1 << 20), "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "nccl/gloo" in out and "raw broadcast, same buckets" in out
