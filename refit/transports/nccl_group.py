"""The NCCL backend of the ``nccl`` transport: a CuPy ``NcclCommunicator`` on its own CUDA
stream, with a watchdog that aborts a broadcast past its deadline, and teardown in a daemon
thread (NCCL's destroy and abort wait for every rank of the node)."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import torch
from typing_extensions import override

from refit.errors import TransportError
from refit.transports.collective import Backend, Communicator, Handle, Rendezvous, barrier, cupy_nccl
from refit.transports.cuda_runtime import cuda_index

# cupy's broadcast takes an ``int`` count: larger buckets go in pieces below 2**31.
_NCCL_MAX_COUNT = 1 << 30


def nccl_check(what: str, fn: Any, *args: Any) -> Any:
    """Run one CuPy NCCL call; every NCCL status of this transport goes through here.

    Raises:
        TransportError: naming ``what`` and NCCL's error string.
    """
    nccl = cupy_nccl()
    try:
        return fn(*args)
    except Exception as exc:
        if nccl is not None and isinstance(exc, nccl.NcclError):
            raise TransportError(f"NCCL {what} failed: {exc}. Set NCCL_DEBUG=INFO for details.") from None
        raise TransportError(f"NCCL {what} failed: {type(exc).__name__}: {exc}") from None


class _NcclHandle(Handle):
    def __init__(self, done: torch.cuda.Event, comm: NcclCommunicator, what: str) -> None:
        self.done, self.comm, self.what = done, comm, what

    def wait(self, timeout: float | None = None) -> None:
        # synchronize() releases the GIL; if the peer never arrives the watchdog aborts the
        # communicator at the deadline (brought forward to ``timeout`` here), NCCL's kernels
        # return and this wakes up.
        if timeout is not None:
            self.comm.deadline(self.done, timeout)
        self.done.synchronize()
        self.comm.raise_if_failed(self.what)


def _new_comm(nccl: Any, world: int, unique_id: bytes, rank: int) -> Any:
    try:  # CuPy 14 takes the unique id as bytes
        return nccl.NcclCommunicator(world, unique_id, rank)
    except TypeError:  # older CuPy: a tuple of signed chars
        return nccl.NcclCommunicator(world, tuple(b - 256 if b > 127 else b for b in unique_id), rank)


class NcclCommunicator(Communicator):
    """A CuPy ``NcclCommunicator`` with its own stream and a timeout watchdog."""

    backend = Backend.NCCL

    def __init__(self, rdv: Rendezvous, store: torch.distributed.Store, rank: int, device: torch.device) -> None:
        nccl = cupy_nccl()
        if nccl is None:
            raise TransportError("backend 'nccl' needs CuPy with NCCL on every rank: pip install cupy-cuda12x (or cupy-cuda13x)")
        if device.type != "cuda":
            raise TransportError(f"backend 'nccl' needs a CUDA device, got {device}")
        self.nccl = nccl
        self.rank, self.world, self.timeout = rank, rdv.world, rdv.timeout
        self.name = f"NCCL group {rdv.group} (rank {rank} of {rdv.world})"
        self.device = torch.device("cuda", cuda_index(device))
        barrier(store, "init", rdv.world, rank, rdv.timeout, self.name)
        import cupy

        with cupy.cuda.Device(self.device.index):
            self.comm: Any = nccl_check(f"communicator init ({self.name})", _new_comm, nccl, rdv.world, rdv.unique_id, rank)
        self.stream = torch.cuda.Stream(self.device)
        self._lock = threading.Lock()
        self._armed: list[tuple[torch.cuda.Event, float, str, float]] = []  # (done, deadline, what, seconds allowed)
        self.failure: str | None = None
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name=f"refit-nccl-watchdog-{rdv.group}", daemon=True)
        self._watchdog.start()

    @override
    def broadcast(self, buf: torch.Tensor, what: str) -> Handle:
        self.raise_if_failed(what)
        self._check_buffer(buf, what)
        if buf.device != self.device:
            raise TransportError(f"{self.name}: buffer of {what} is on {buf.device}, the communicator on {self.device}")
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))  # packing / the last apply is done
        self.stream.wait_event(ready)
        ptr, n = buf.data_ptr(), buf.numel()
        for start in range(0, n, _NCCL_MAX_COUNT):
            count = min(_NCCL_MAX_COUNT, n - start)
            nccl_check(
                f"broadcast of {what} ({self.name})",
                self.comm.broadcast,
                ptr + start,
                ptr + start,
                count,
                self.nccl.NCCL_UINT8,
                0,
                self.stream.cuda_stream,
            )
        done = torch.cuda.Event()
        done.record(self.stream)
        # The caller's stream is not made to wait for ``done``: that would order every later
        # pack or apply after this broadcast, and the sender could no longer pack bucket k+1
        # while bucket k is on the wire. The buffer is the caller's again once wait() returned.
        with self._lock:
            self._armed.append((done, time.monotonic() + self.timeout, what, self.timeout))
        return _NcclHandle(done, self, what)

    def deadline(self, done: torch.cuda.Event, seconds: float) -> None:
        """Bring the watchdog's deadline for the broadcast that records ``done`` forward to
        ``seconds`` from now; a later one changes nothing."""
        at = time.monotonic() + seconds
        with self._lock:
            self._armed = [(e, at, w, seconds) if e is done and at < d else (e, d, w, t) for e, d, w, t in self._armed]

    def raise_if_failed(self, what: str) -> None:
        """Raise if the watchdog aborted the communicator (an operation ran past its timeout).

        Raises:
            TransportError: the communicator failed; ``what`` names the operation that was waiting.
        """
        if self.failure is not None:
            raise TransportError(f"{self.name}: {self.failure} (waiting for {what}); the communicator was aborted")

    def _watch(self) -> None:
        torch.cuda.set_device(self.device)
        while not self._stop.wait(0.005):
            with self._lock:
                self._armed = [a for a in self._armed if not a[0].query()]
                late = next((a for a in self._armed if time.monotonic() > a[1]), None)
            problem = f"broadcast of {late[2]} did not complete within {late[3]} s" if late else None
            if problem is None and self.comm is not None:
                try:
                    nccl_check("asynchronous error check", self.comm.check_async_error)
                except TransportError as exc:
                    problem = str(exc)
            if problem is not None:
                self.failure = problem
                self._abort()
                return

    def _abort(self) -> None:
        comm, self.comm = self.comm, None
        if comm is not None:
            # abort stops this rank's kernels first (so waiters wake up), then waits for the
            # other ranks of the node like destroy does: not on the watchdog's thread
            _release(comm, None, self.name)

    def close(self) -> None:
        """Release the communicator without waiting for the other ranks (see :func:`_release`)."""
        self._stop.set()
        if self._watchdog.is_alive() and threading.current_thread() is not self._watchdog:
            self._watchdog.join(timeout=5)
        comm, self.comm = self.comm, None
        if comm is not None:
            _release(comm, self.stream if self.failure is None else None, self.name)


def _release(comm: Any, stream: torch.cuda.Stream | None, name: str) -> None:
    """Destroy ``comm`` (after ``stream``'s work; abort it when ``stream`` is None) in a daemon
    thread.

    NCCL's destroy and abort synchronize the ranks of a node before freeing what they share,
    so they return only once every rank of the group released it. A rank that keeps the group
    (a receiver between pushes, until the next push offers a new group) would otherwise hang
    whoever closes first; here the teardown simply completes when the last rank lets go. The
    thread holds the only reference, so the communicator is never destroyed by the garbage
    collector on the caller's thread (CuPy destroys on deallocation).
    """

    def run() -> None:
        try:
            if stream is not None:
                stream.synchronize()  # nothing of ours in flight
                comm.destroy()
                return
        except Exception:
            pass
        with contextlib.suppress(Exception):
            comm.abort()

    threading.Thread(target=run, name=f"refit-nccl-release ({name})", daemon=True).start()
