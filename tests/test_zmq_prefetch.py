"""The zmq receiver receives the next bucket and copies it into its staging slot on a thread of its
own while the bucket before it is applied (refit/transports/receive_ahead.py), and hands the
socket back whatever happens: a fault on either thread ends the push with its reason, nothing hangs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

pytest.importorskip("zmq")

from refit import Refitter
from refit.digest import digest
from refit.errors import TornStateError, TransportError, WireError
from refit.load import Loader
from refit.receiver import RefitReceiver
from refit.transports.zmq import ZmqReceiver

BUCKET = 64 << 10


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.w": torch.randn(96, 128, generator=g).to(torch.bfloat16) for i in range(12)}  # 24 KiB each


@contextmanager
def slow_receiver(monkeypatch: pytest.MonkeyPatch, fail: int | None = None) -> Iterator[tuple[RefitReceiver, dict[str, torch.Tensor], list[tuple[int, str]]]]:
    """A zmq receiver whose applies take 30 ms each (so buckets queue behind them), recording
    which thread got each bucket's bytes; with ``fail``, getting bucket ``fail`` off the applying
    thread raises a WireError, once."""
    calls: list[tuple[int, str]] = []
    failed: list[int] = []
    get_bucket, apply = ZmqReceiver._bucket, Loader.apply

    def spy(self: ZmqReceiver, msg: Any, frames: Any) -> tuple[torch.Tensor, bool]:
        calls.append((msg.index, threading.current_thread().name))
        if msg.index == fail and threading.current_thread() is not threading.main_thread() and not failed:
            failed.append(msg.index)
            raise WireError(f"bucket {msg.index}: injected")
        return get_bucket(self, msg, frames)

    def slow(self: Loader, *args: Any, **kw: Any) -> None:
        time.sleep(0.03)
        apply(self, *args, **kw)

    monkeypatch.setattr(ZmqReceiver, "_bucket", spy)
    monkeypatch.setattr(Loader, "apply", slow)
    target = {k: torch.zeros_like(v) for k, v in state(0).items()}
    rx = RefitReceiver(target, "zmq", name="rx")
    t = threading.Thread(target=rx.serve, kwargs={"poll": 0.2}, daemon=True)
    t.start()
    try:
        yield rx, target, calls
    finally:
        rx.stop()
        t.join(30)
        rx.close()
    assert not t.is_alive()


@pytest.mark.integration
@pytest.mark.parametrize("num_buffers", [2, 3])
def test_buckets_are_staged_off_the_applying_thread_bit_for_bit(monkeypatch: pytest.MonkeyPatch, num_buffers: int) -> None:
    with slow_receiver(monkeypatch) as (rx, target, calls), Refitter("zmq", peers=[rx.info()], bucket_bytes=BUCKET, num_buffers=num_buffers, frame_bytes=4096, timeout=30) as r:
        for seed in (1, 2):
            calls.clear()
            report = r.push(state(seed))
            assert digest(target) == digest(state(seed)) and not rx.torn
            assert sorted(i for i, _ in calls) == list(range(report.buckets))  # each bucket's bytes got once
            assert sum(name.startswith("refit-staging-rx") for _, name in calls) >= report.buckets // 2  # most off the applying thread


@pytest.mark.integration
def test_a_bucket_that_fails_while_staged_ahead_ends_the_push_at_its_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    with slow_receiver(monkeypatch, fail=2) as (rx, target, calls), Refitter("zmq", peers=[rx.info()], bucket_bytes=BUCKET, num_buffers=3, frame_bytes=4096, timeout=30) as r:
        with pytest.raises(TransportError, match="bucket 2: injected"):
            r.push(state(1))
        assert rx.torn  # buckets 0 and 1 were applied, nothing of bucket 2 or later
        assert all(torch.equal(target[f"layers.{i}.w"], state(1)[f"layers.{i}.w"]) for i in range(4))
        assert not any(target[f"layers.{i}.w"].any() for i in range(4, 12))
        with pytest.raises(TornStateError):
            rx.check_serving()
        # the fault was once: the next push heals
        r.push(state(2))
        assert digest(target) == digest(state(2)) and not rx.torn


@pytest.mark.integration
def test_one_buffer_wakes_the_helper_every_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    # with one buffer the next bucket cannot come before this one is acknowledged: the helper
    # waits for nothing and must hand the socket back at once, every bucket
    with slow_receiver(monkeypatch) as (rx, target, calls), Refitter("zmq", peers=[rx.info()], bucket_bytes=BUCKET, num_buffers=1, frame_bytes=4096, timeout=30) as r:
        t0 = time.monotonic()
        report = r.push(state(1))
        assert time.monotonic() - t0 < 20  # far below a 30 s timeout per bucket: nothing waited it out
        assert digest(target) == digest(state(1)) and not rx.torn
        assert len(calls) == report.buckets and not any(name.startswith("refit-staging") for _, name in calls)  # nothing could come ahead


@pytest.mark.integration
def test_a_fault_of_the_helper_while_it_waits_ends_the_push_and_the_next_heals(monkeypatch: pytest.MonkeyPatch) -> None:
    from refit.transports.control import ControlServer

    faults: list[str] = []
    nxt = ControlServer.next_message

    def garbled(self: ControlServer, deadline: Any, wake: Any = None) -> Any:
        if wake is not None and not faults:  # on the helper's thread, once
            faults.append(threading.current_thread().name)
            raise WireError("rx: injected garbled message")
        return nxt(self, deadline, wake)

    monkeypatch.setattr(ControlServer, "next_message", garbled)
    with slow_receiver(monkeypatch) as (rx, target, calls), Refitter("zmq", peers=[rx.info()], bucket_bytes=BUCKET, num_buffers=2, frame_bytes=4096, timeout=30) as r:
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="injected garbled message"):
            r.push(state(1))
        assert time.monotonic() - t0 < 20 and faults[0].startswith("refit-staging-rx")
        assert rx.torn  # bucket 0 was applied before the fault
        r.push(state(2))
        assert digest(target) == digest(state(2)) and not rx.torn


@pytest.mark.integration
def test_an_apply_that_fails_while_the_helper_waits_is_what_the_sender_hears(monkeypatch: pytest.MonkeyPatch) -> None:
    apply = Loader.apply
    failed: list[int] = []

    def failing(self: Loader, index: int, *args: Any, **kw: Any) -> None:
        if index == 1 and not failed:
            failed.append(index)
            raise RuntimeError("injected apply failure")
        apply(self, index, *args, **kw)

    with slow_receiver(monkeypatch) as (rx, target, calls), Refitter("zmq", peers=[rx.info()], bucket_bytes=BUCKET, num_buffers=2, frame_bytes=4096, timeout=30) as r:
        monkeypatch.setattr(Loader, "apply", failing)  # inside the receiver's slow apply
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="injected apply failure"):
            r.push(state(1))
        assert time.monotonic() - t0 < 20 and rx.torn
        r.push(state(2))
        assert digest(target) == digest(state(2)) and not rx.torn
