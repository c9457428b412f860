"""Where a receiver's ZMQ I/O thread runs.

ZMQ moves a socket's bytes on a background I/O thread, and a new thread inherits the CPU
affinity of the thread that started it. vLLM's CPU backend pins each worker's thread to its own
compute cores (``VLLM_CPU_OMP_THREADS_BIND``), so a ``zmq`` receiver opened inside a worker would
receive every bucket on the very core that applies the previous one: receiving and applying
take turns instead of overlapping (measured in docs/benchmarks.md, issue 14). A receiver
therefore gives its own ZMQ context's I/O thread the CPUs this process may use *besides* the
pinned ones, through libzmq's ``ZMQ_THREAD_AFFINITY_CPU_ADD``.

Policies (``ZmqReceiver(io_cpus=...)``):

* ``"inherit"`` (the default of a plain receiver): the I/O thread inherits the calling thread's
  affinity (ZMQ's own behaviour; a process the user pinned stays where it was pinned).
* ``"auto"`` (what refit's vLLM worker extension asks for): the CPUs the parent process may
  use (so a ``taskset`` or cpuset around the whole job still holds), within this process's
  cpuset, minus the ones the calling thread is pinned to; no change when that leaves none.
* a collection of CPU ids: exactly those (each must be one this process may use).
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

import zmq

from refit.errors import TransportError

IoCpus = Literal["auto", "inherit"] | Collection[int]


def parse_cpu_list(text: str) -> set[int]:
    """``"0-3,8,10-11"`` (the kernel's list format) as a set of CPU ids."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def usable_cpus() -> set[int]:
    """The CPUs this process may run on: its cgroup's effective cpuset, else every online CPU.

    A thread's own affinity may be narrower: that is what it was pinned to.
    """
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            if hierarchy == "0":  # cgroup v2
                candidates = [Path("/sys/fs/cgroup") / path.lstrip("/") / "cpuset.cpus.effective"]
            elif "cpuset" in controllers.split(","):
                candidates = [Path("/sys/fs/cgroup/cpuset") / path.lstrip("/") / "cpuset.effective_cpus"]
            else:
                continue
            for candidate in candidates:
                if candidate.is_file() and (cpus := parse_cpu_list(candidate.read_text())):
                    return cpus
    except (OSError, ValueError):
        pass
    return set(range(os.cpu_count() or 1))


def io_cpus(policy: IoCpus) -> frozenset[int] | None:
    """The CPUs ``policy`` gives the I/O thread; ``None``: inherit the calling thread's."""
    if isinstance(policy, str):
        if policy == "inherit":
            return None
        if policy != "auto":
            raise TransportError(f"io_cpus={policy!r}: use 'auto', 'inherit' or a collection of CPU ids")
        if not hasattr(os, "sched_getaffinity"):
            return None
        try:
            around = os.sched_getaffinity(os.getppid())
        except OSError:  # no parent to ask (reaped, or another user's)
            around = usable_cpus()
        others = (around & usable_cpus()) - os.sched_getaffinity(0)
        return frozenset(others) if others else None
    try:
        cpus = frozenset(int(c) for c in policy)
    except (TypeError, ValueError):
        raise TransportError(f"io_cpus={policy!r}: use 'auto', 'inherit' or a collection of CPU ids") from None
    unusable = sorted(cpus - usable_cpus())
    if not cpus or unusable:
        raise TransportError(f"io_cpus={sorted(cpus)}: CPUs {unusable or '(none given)'} are not ones this process may use ({sorted(usable_cpus())})")
    return cpus


def io_context(cpus: frozenset[int]) -> zmq.Context[Any]:
    """A new ZMQ context whose I/O (and reaper) threads will run on ``cpus`` (:func:`io_cpus`;
    set before its first socket starts them)."""
    ctx: zmq.Context[Any] = zmq.Context()
    for cpu in sorted(cpus):
        ctx.set(zmq.THREAD_AFFINITY_CPU_ADD, cpu)
    return ctx
