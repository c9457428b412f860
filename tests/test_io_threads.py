"""Where a receiver's ZMQ I/O thread runs (refit/transports/io_threads.py): off the CPUs its
creating thread is pinned to (a vLLM CPU worker's compute core), so receiving overlaps applying."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("zmq")

import zmq

from refit import Refitter, TransportError
from refit.receiver import RefitReceiver
from refit.transports.io_threads import io_context, io_cpus, parse_cpu_list, usable_cpus

TWO_CPUS = pytest.mark.skipif(len(usable_cpus()) < 2 or not hasattr(os, "sched_setaffinity"), reason="needs 2 usable CPUs and sched_setaffinity")


def tasks() -> dict[int, tuple[str, set[int]]]:
    """This process's threads: id -> (name, CPUs it may run on)."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:  # the name first: libzmq places its thread before naming it, so a named one is placed
            name = (task / "comm").read_text().strip()
            status = (task / "status").read_text()
        except OSError:
            continue
        cpus = next(line.split(":", 1)[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
        out[int(task.name)] = (name, parse_cpu_list(cpus))
    return out


def pinned(cpus: set[int], fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a new thread pinned to ``cpus`` (as vLLM's CPU backend pins a worker)."""
    box: dict[str, Any] = {}

    def run() -> None:
        os.sched_setaffinity(0, cpus)
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    if "error" in box:
        raise box["error"]
    return box["value"]


def new_io_threads(make: Callable[[], Any]) -> tuple[Any, list[tuple[str, set[int]]]]:
    """What ``make()`` returns and the ZMQ I/O threads it started."""
    before = tasks()
    made = make()
    deadline = time.monotonic() + 5  # a new thread names itself once it runs
    while not (new := [t for tid, t in tasks().items() if tid not in before and t[0].startswith("ZMQbg/IO")]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return made, new


@pytest.mark.unit
def test_parse_cpu_list() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpu_list("5") == {5}
    assert parse_cpu_list("") == set()


@pytest.mark.unit
def test_policies() -> None:
    usable = usable_cpus()
    assert usable and usable <= set(range(os.cpu_count() or 1))
    assert io_cpus("inherit") is None
    assert io_cpus(sorted(usable)[:1]) == frozenset(sorted(usable)[:1])
    if os.sched_getaffinity(0) >= usable:
        assert io_cpus("auto") is None  # not pinned: nothing to change
    for bad, match in [("fast", "use 'auto', 'inherit'"), ([], r"\(none given\)"), ([10_000], "CPUs \\[10000\\] are not ones this process may use"), ([object()], "use 'auto'")]:
        with pytest.raises(TransportError, match=match):
            io_cpus(bad)  # type: ignore[arg-type]


def around() -> set[int]:
    """The CPUs ``"auto"`` draws from: the parent process's, within this process's cpuset."""
    return os.sched_getaffinity(os.getppid()) & usable_cpus()


@TWO_CPUS
@pytest.mark.integration
def test_auto_gives_a_pinned_thread_s_io_thread_the_other_cpus() -> None:
    first = min(usable_cpus())
    if around() - {first} != usable_cpus() - {first}:
        pytest.skip(f"this test's parent process is pinned ({sorted(around())})")
    assert pinned({first}, lambda: io_cpus("auto")) == frozenset(usable_cpus() - {first})

    def make() -> tuple[Any, Any]:
        cpus = io_cpus("auto")
        assert cpus is not None
        ctx = io_context(cpus)
        return ctx, ctx.socket(zmq.PAIR)

    (ctx, sock), threads = pinned({first}, lambda: new_io_threads(make))
    try:
        assert threads and all(cpus == usable_cpus() - {first} for _, cpus in threads), threads
    finally:
        sock.close()
        ctx.term()


@TWO_CPUS
@pytest.mark.integration
def test_a_zmq_receiver_made_on_a_pinned_thread_receives_off_that_cpu() -> None:
    """The receiver a vLLM worker opens on its pinned thread: its I/O thread runs elsewhere, and
    a push lands bit for bit (also with ``io_cpus="inherit"``: the process-wide context)."""
    first = min(usable_cpus())
    if around() - {first} != usable_cpus() - {first}:
        pytest.skip(f"this test's parent process is pinned ({sorted(around())})")
    target = {"w": torch.zeros(1 << 16), "b": torch.zeros(3)}
    for policy in ["auto", "inherit"]:
        make = partial(RefitReceiver, target, "zmq", io_cpus=policy, push_timeout=20)
        if policy == "auto":
            rx, threads = pinned({first}, partial(new_io_threads, make))
        else:
            rx, threads = pinned({first}, make), None
        try:
            if threads is not None:
                assert threads and all(cpus == usable_cpus() - {first} for _, cpus in threads), threads
            served = threading.Thread(target=rx.receive, kwargs={"timeout": 20})
            served.start()
            state = {"w": torch.arange(1 << 16, dtype=torch.float32), "b": torch.ones(3)}
            with Refitter("zmq", peers=[rx.info()], bucket_bytes=1 << 16, frame_bytes=4096, timeout=20) as r:
                r.push(state)
            served.join(20)
            assert all(torch.equal(target[k], v) for k, v in state.items()) and rx.version >= 1
        finally:
            rx.close()


@TWO_CPUS
@pytest.mark.integration
def test_auto_stays_inside_a_binding_around_the_whole_job() -> None:
    """A job started under ``taskset -c <one CPU>``: its processes inherit the binding, and
    ``"auto"`` in a grandchild finds no other CPU to use (it does not widen the user's binding)."""
    first = min(usable_cpus())
    probe = "from refit.transports.io_threads import io_cpus; print(io_cpus('auto'))"
    chain = f"import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', {probe!r}]))"
    out = subprocess.run(
        [sys.executable, "-c", chain], preexec_fn=lambda: os.sched_setaffinity(0, {first}), capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "None", out
