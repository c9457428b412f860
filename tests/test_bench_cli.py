"""`refit bench`: every transport pushed beside its own ceiling in one run; sweeps of bucket size
and buffer count; stage columns, staging memory, JSON and the PNG plot; the progress bar."""

from __future__ import annotations

import io
import json
import struct
import sys
from pathlib import Path

import pytest

from refit.bench_cmd import configs
from refit.bench_output import Bar
from refit.cli import main as cli
from refit.errors import RefitError

STAGES = {"plan", "handshake", "pack", "stream", "apply", "post_load"}


@pytest.mark.integration
def test_bench_all_transports_prints_every_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rows.json"
    assert cli(["bench", "--transport", "all", "--shape", "tiny", "--repeat", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [r["transport"] for r in rows] == ["local", "zmq", "cuda_ipc", "nccl/gloo"]
    assert all(r["gbps"] > 0 and r["ceiling_gbps"] > 0 and r["ratio"] > 0 for r in rows)
    assert {r["ceiling"] for r in rows} == {"copy_", "raw pyzmq zero-copy", "one copy_ (a push makes 2)", "raw broadcast, same buckets"}
    assert all(set(r["stages"]) == STAGES and r["stages"]["pack"] > 0 and r["stages"]["apply"] > 0 for r in rows)
    assert doc["meta"]["command"].startswith("refit bench --transport all --shape tiny") and doc["meta"]["cpus"] >= 1
    printed = capsys.readouterr().out
    assert all(f"{r['ratio']:.2f}" in printed for r in rows)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.integration
def test_sweep_rows_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    js, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    argv = ["bench", "--transport", "local", "--transport", "zmq", "--shape", "tiny", "--bucket-mb", "1", "--bucket-bytes", str(64 << 10)]
    argv += ["--num-buffers", "1", "--num-buffers", "2", "--repeat", "1", "--json", str(js), "--plot", str(png), "--quiet"]
    assert cli(argv) == 0
    rows = json.loads(js.read_text())["rows"]
    combos = [(t, b, n) for t in ("local", "zmq") for b in (1 << 20, 64 << 10) for n in (1, 2)]
    assert [(r["transport"], r["bucket_bytes"], r["num_buffers"]) for r in rows] == combos
    tiny_bytes = rows[0]["bytes"]
    for r in rows:
        assert r["staging_bytes"] == r["bucket_bytes"] * r["num_buffers"]  # the sender's buffers, allocated once
        assert r["buckets"] == -(-tiny_bytes // r["bucket_bytes"]) or r["buckets"] >= tiny_bytes // r["bucket_bytes"]
        assert set(r["stages"]) == STAGES and all(v >= 0 for v in r["stages"].values())
        assert r["ratio"] == pytest.approx(r["gbps"] / r["ceiling_gbps"])
        assert r["rss_peak_bytes"] is None or r["rss_peak_bytes"] > 0
    assert rows[0]["buckets"] == 1 and rows[2]["buckets"] > 1
    data = png.read_bytes()
    width, height = _png_size(data)
    assert len(data) > 10_000 and width >= 600 and height >= 300
    table = capsys.readouterr().out
    assert table.count("\nlocal ") == 4 and table.count("\nzmq ") == 4 and "post-load" in table


@pytest.mark.unit
def test_sweep_configs_and_their_errors() -> None:
    assert configs([1, 4], None, [1, 2]) == [(1 << 20, 1), (1 << 20, 2), (4 << 20, 1), (4 << 20, 2)]
    assert configs(None, [65536], None) == [(65536, 2)]
    assert configs([1], [1 << 20], [2, 2]) == [(1 << 20, 2)]  # duplicates measured once
    with pytest.raises(RefitError, match="--num-buffers must be positive"):
        configs([1], None, [0])
    with pytest.raises(RefitError, match="--bucket-mb / --bucket-bytes must be positive"):
        configs([-1], None, None)


@pytest.mark.unit
def test_bad_options_exit_2_naming_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["bench", "--shape", "llama-70b", "--repeat", "1"]) == 2
    assert "unknown shape 'llama-70b'" in capsys.readouterr().err
    assert cli(["bench", "--shape", "tiny", "--num-buffers", "0"]) == 2
    assert "--num-buffers must be positive" in capsys.readouterr().err
    assert cli(["bench", "--shape", str(tmp_path / "nope" / "config.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli(["bench", "--engine", "vllm", "--transport", "local", "--shape", "tiny"]) == 2
    assert "not ['local']" in capsys.readouterr().err


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.unit
def test_progress_bar_only_on_a_terminal_and_not_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tqdm")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert Bar(4)._bar is None  # not a terminal
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert Bar(4, quiet=True)._bar is None
    bar = Bar(4)
    assert bar._bar is not None
    bar.buckets(3, 8)
    bar.tick("zmq 1 MiB x 2")
    bar.close()
    shown = tty.getvalue()
    assert "zmq 1 MiB x 2" in shown and "1/4" in shown


@pytest.mark.unit
def test_a_state_that_does_not_fit_is_refused_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    from refit import bench
    from refit.shapes import SHAPES

    monkeypatch.setattr(bench, "_available_bytes", lambda _device: 24 << 30)
    with pytest.raises(RefitError, match=r"--shape qwen3-30b-a3b: needs about 122\.1 GB on cpu .* 25\.8 GB is free; choose a smaller shape"):
        bench.run("local", SHAPES["qwen3-30b-a3b"], "cpu", [(1 << 20, 2)], 1, label="qwen3-30b-a3b")
    bench.check_fits("local", SHAPES["tiny"], "tiny", __import__("torch").device("cpu"), [(1 << 20, 2)])  # fits: no error
