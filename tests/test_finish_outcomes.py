"""Several receivers, one failing at finish (issue 19): what each ends as, and what the sender says.

refit's finish is one phase per receiver: each verifies, runs its post-load step and commits on
its own. A receiver that fails there is torn at its old version; the others have committed the
push whole. The sender's error names the failing receiver and every other one's outcome, so the
caller knows exactly which engines serve the new version. (Why not a two-phase commit: by
finish every receiver already holds the new bytes, and there is no copy of the old ones to go
back to, so "the same for all" could only mean marking the healthy receivers torn as well,
taking every engine out of service for one engine's fault.) The next push repairs the torn one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from refit import Refitter, TransportError
from refit.receiver import RefitReceiver
from refit.resolve import TensorsResolver

pytestmark = pytest.mark.integration


class FailOnce:
    """A post-load hook that fails on its first call (a receiver's engine failing at finish)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("post-load failed on this engine")


@pytest.fixture
def three() -> Iterator[list[tuple[RefitReceiver, dict[str, torch.Tensor]]]]:
    out, threads = [], []
    for i in range(3):
        target = {"w": torch.zeros(256), "s": torch.tensor(1.0)}
        resolver = TensorsResolver(target, post_load=FailOnce() if i == 1 else None)
        rx = RefitReceiver(resolver, "zmq", name=f"rx{i}", push_timeout=10)
        t = threading.Thread(target=rx.serve, kwargs={"poll": 0.05}, daemon=True)
        t.start()
        out.append((rx, target))
        threads.append(t)
    try:
        yield out
    finally:
        for (rx, _), t in zip(out, threads):
            rx.stop()
            t.join(10)
            rx.close()


def test_one_receiver_failing_at_finish_is_torn_the_others_committed_and_the_error_says_so(
    three: list[tuple[RefitReceiver, dict[str, torch.Tensor]]],
) -> None:
    pushed = {"w": torch.arange(256, dtype=torch.float32)}, {"s": torch.tensor(0.5)}
    with Refitter("zmq", peers=[rx.info() for rx, _ in three], timeout=10) as r:
        with pytest.raises(TransportError) as info:
            r.push(*pushed)
        message = str(info.value)
        assert "post-load failed on this engine" in message and "phase finish" in message
        assert "the other receivers: rx0 committed version 1; rx2 committed version 1" in message
        (rx0, t0), (rx1, t1), (rx2, t2) = three
        assert [rx.version for rx, _ in three] == [1, 0, 1]
        assert [rx.torn for rx, _ in three] == [False, True, False]
        for t in (t0, t2):
            assert torch.equal(t["w"], pushed[0]["w"]) and torch.equal(t["s"], pushed[1]["s"])

        again = {"w": torch.arange(256, dtype=torch.float32) * 2}, {"s": torch.tensor(0.25)}
        report = r.push(*again)  # version 2: above every receiver's committed version
        assert report.version == 2 and [rep.peer for rep in report.receivers] == ["rx0", "rx1", "rx2"]
    assert [rx.version for rx, _ in three] == [2, 2, 2] and not any(rx.torn for rx, _ in three)
    assert all(torch.equal(t["w"], again[0]["w"]) and torch.equal(t["s"], again[1]["s"]) for _, t in three)
