"""Receiving the next bucket while one is applied: the socket lent to a helper thread.

A receiver that applies bucket k on its own thread (a vLLM worker pinned to one core) would
otherwise copy bucket k+1's frames into their staging slot only after that apply, on the same
thread: 0.3 s per GB on the CPU box, a quarter of a push into a vLLM engine (docs/benchmarks.md,
issue 14). So while bucket k is applied, :class:`Ahead` lends the control socket to the
``prefetch`` thread (on the ZMQ I/O thread's CPUs): it waits for the next message and, when
that is a bucket of the same push in another slot, copies its frames into that slot. When the
apply ends, the applying thread wakes it (a byte on a socket pair it polls beside the control
socket), waits until it has returned, and only then uses the socket again (acks, the next
message): a ZMQ socket is used by one thread at a time, and the future's completion is the
hand-over. Rejected: a peek without waiting (bucket k+1 rarely sits complete on the socket when
bucket k's apply begins with two buffers, so the copy stayed on the applying thread), and a
thread owning the socket for the whole push (the acks would need a second channel).
"""

from __future__ import annotations

import socket
import time
from concurrent import futures
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from refit.wire import Bucket, Hello

if TYPE_CHECKING:
    from refit.transports.control import BucketSource, ControlServer


@dataclass
class Staged:
    """A bucket's bytes got ahead (or why getting them failed: raised at the bucket's turn)."""

    msg: Bucket
    data: tuple[torch.Tensor, bool] | Exception

    def bytes(self) -> tuple[torch.Tensor, bool]:
        """The bytes and whether they sit in a reused staging buffer (``BucketSource``'s answer)."""
        if isinstance(self.data, Exception):
            raise self.data
        return self.data


class Ahead:
    """The next message of a push, received on ``executor`` while ``current`` is applied.

    Until :meth:`join` returns, the caller must not touch ``server``'s socket.
    """

    def __init__(
        self, server: ControlServer, current: Bucket, hello: Hello, bucket_source: BucketSource, timeout: float | None, executor: Executor
    ) -> None:
        self._server = server
        self._wake, self._waker = server.wake_pair()
        self._future = executor.submit(self._receive, current, hello, bucket_source, None if timeout is None else time.monotonic() + timeout)

    def _receive(self, current: Bucket, hello: Hello, bucket_source: BucketSource, deadline: float | None) -> Staged | None:
        server = self._server
        if server.pending is None:
            server.pending = server.next_message(deadline, wake=self._wake)
        if server.pending is None:  # woken, or nothing came
            return None
        msg, frames = server.pending
        if not isinstance(msg, Bucket) or msg.push_id != hello.push_id or msg.slot == current.slot:
            return None  # the applying thread handles it
        try:
            return Staged(msg, bucket_source(msg, frames))
        except Exception as exc:  # raised when the applying thread reaches this bucket
            return Staged(msg, exc)

    def join(self, *, quiet: bool = False) -> Staged | None:
        """Wake the helper, wait until it returned the socket; what it got ahead (None: nothing).
        ``quiet``: the push is failing anyway, so a fault of the helper's is not raised.

        Raises:
            TransportError: the helper met a garbled message of the push's sender.
        """
        self._waker.send(b"\0")
        futures.wait([self._future])
        while True:  # empty the pair for the next bucket (the helper may have returned before the byte came)
            try:
                if not self._wake.recv(64):
                    break
            except BlockingIOError:
                break
        if quiet:
            return None
        return self._future.result()


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """A (wake, waker) pair: the helper polls ``wake``, the applying thread writes to ``waker``."""
    wake, waker = socket.socketpair()
    wake.setblocking(False)
    return wake, waker
