"""``examples/ray_refit.py`` runs as the README says: its own Ray cluster, three pushes into two
engine actors, each engine checked bit for bit (sha256) against the trainer by the example."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ray_refit.py"


@pytest.mark.integration
def test_example_runs_three_pushes() -> None:
    """As the README runs it (zmq, chosen on CPU); tests/test_ray.py runs the same flow over the
    gloo stream in-process."""
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=300, cwd=EXAMPLE.parent.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "transport zmq, bind loopback" in out
    for version in (1, 2, 3):
        assert f"push {version}: both engines hold the trainer's weights bit for bit" in out
        assert f"[engine-a] version {version}" in out and f"[engine-b] version {version}" in out
