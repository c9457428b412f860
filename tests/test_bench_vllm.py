"""`refit bench --engine vllm`: pushes into a real vLLM CPU engine beside vLLM's own reload of
the same tensors and the transport's raw ceiling (the run fails unless the engine holds the
pushed values afterwards: the bench reads them back)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from refit.cli import main as cli

pytestmark = pytest.mark.integration
pytest.importorskip("vllm")


@pytest.mark.parametrize(("shape", "transports"), [("tiny", ["zmq", "cuda_ipc"]), ("tiny-moe", ["zmq"])])
def test_bench_vllm_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str], shape: str, transports: list[str]) -> None:
    out, png = tmp_path / "vllm.json", tmp_path / "vllm.png"
    argv = ["bench", "--engine", "vllm", "--shape", shape, "--bucket-mb", "1", "--repeat", "1", "--json", str(out), "--plot", str(png), "--quiet"]
    for t in transports:
        argv += ["--transport", t]
    assert cli(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["transport"] for r in rows] == [f"vllm/{t}" for t in transports]
    for r in rows:
        assert r["reload_seconds"] > 0 and r["vs_reload"] == pytest.approx(r["reload_seconds"] / r["seconds"])
        assert r["ceiling_seconds"] > 0 and r["ratio"] == pytest.approx(r["ceiling_seconds"] / r["seconds"])
        assert r["overhead"] == pytest.approx(r["seconds"] / max(r["reload_seconds"], r["ceiling_seconds"]))
        assert r["stages"]["apply"] > 0 and r["buckets"] >= 1 and r["bucket_bytes"] == 1 << 20
        if r["transport"] == "vllm/zmq":  # the raw transport's CPU work: sender and receiver both spend some
            spare = max(len(os.sched_getaffinity(0)) - 1, 1)
            assert r["ceiling_cpu_seconds"] > 0
            assert r["cpu_floor"] == pytest.approx(r["ceiling_cpu_seconds"] / spare / max(r["reload_seconds"], r["ceiling_seconds"]))
        else:
            assert r["cpu_floor"] is None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "vLLM's own in-process reload of the same tensors" in printed and all(f"{r['vs_reload']:.2f}" in printed for r in rows)
