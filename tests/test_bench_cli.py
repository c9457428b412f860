"""`refit bench --transport all`: every transport pushed beside its own ceiling, in one run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refit.cli import main as cli

pytestmark = pytest.mark.integration


def test_bench_all_transports_prints_every_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rows.json"
    assert cli(["bench", "--transport", "all", "--shape", "tiny", "--repeat", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["transport"] for r in rows] == ["local", "zmq", "cuda_ipc", "nccl/gloo"]
    assert all(r["gbps"] > 0 and r["ceiling_gbps"] > 0 and r["ratio"] > 0 for r in rows)
    assert {r["ceiling"] for r in rows} == {"copy_", "raw pyzmq zero-copy", "one copy_ (a push makes 2)", "raw broadcast, same buckets"}
    printed = capsys.readouterr().out
    assert all(f"{r['ratio']:.2f}" in printed for r in rows)
