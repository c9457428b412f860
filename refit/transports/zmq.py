"""``zmq``: bucket bytes over ZMQ sockets (``tcp://`` or ``ipc://``), zero-copy where it can be.

What it does: the sender packs each bucket into a persistent host staging buffer (pinned when
CUDA is present, so device tensors are copied out with non-blocking copies) and sends the
header and the bytes as one multipart message with ``copy=False``, to every receiver (fan-out
reuses the same buffer). Large contiguous host tensors are not packed: their frames are sent
from the tensors' own memory (``sends_in_place``), with the rest of the bucket packed around
them, which saves the trainer a copy of (nearly) every byte. A buffer is reused only after
every receiver acknowledged the bucket in it, so at most ``num_buffers`` buckets are in flight.

The bytes travel as frames of at most ``frame_bytes`` (1 MiB by default): ZMQ allocates a new
message for every frame it receives, and the C allocator serves requests of up to 32 MiB from
memory it keeps and reuses, but maps larger ones fresh from the kernel, so a bucket-sized frame
costs the receiver a page fault and a zeroed page for every 4 KiB, each push again (on the CPU
box, 1.2 CPU-seconds per GB received: more than vLLM's own load of the same bytes; see
docs/benchmarks.md, issue 14). The receiver copies the frames of a bucket into a staging
bucket it reuses (pinned for CUDA targets, so the host-to-device copies are non-blocking) and
applies from there. While a bucket is applied, a thread of the receiver's (on the ZMQ I/O
thread's CPUs) receives the next one and copies it into its slot
(:mod:`refit.transports.receive_ahead`), so that copy is off a pinned worker's core. A bucket sent as one
frame (``frame_bytes`` >= the bucket: nothing is then sent in place) is applied from a tensor
view of ZMQ's frame, without a copy.

Why ZMQ: it works across hosts with no NCCL, for CPU engines, and for debugging; it keeps one
connection per receiver across pushes, so 200 pushes open no new file descriptors. Rejected:
one message per tensor (per-message overhead dominates with thousands of small tensors and
0-d scales); pickle-based ``send_pyobj`` (remote code execution on the receiver).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from typing_extensions import override

from refit.auth import CurveAuth
from refit.errors import TransportError, WireError
from refit.load import Loader
from refit.meta import Manifest
from refit.pack import host_bytes
from refit.report import RefitReport
from refit.transports.base import ReceiverTransport, Sender
from refit.transports.control import DEFAULT_ADDRESS, ControlServer, Frames
from refit.transports.io_threads import IoCpus
from refit.transports.peers import PeerGroup, Peers, peer_infos
from refit.wire import Bucket, Fingerprints

# Under glibc's 32 MiB ceiling for memory it reuses (see the module doc). 8 MiB frames still
# cost 43-50 k page faults per GiB received (part of their memory is given back and mapped
# again), 1 MiB frames 2-4 k: faster pushes and a 1.6-2x faster raw ceiling (docs/benchmarks.md).
DEFAULT_FRAME_BYTES = 1 << 20
MIN_FRAME_BYTES = 4096
MAX_FRAME_BYTES = 1 << 40


def split_frames(mem: memoryview, frame_bytes: int = DEFAULT_FRAME_BYTES) -> list[memoryview]:
    """``mem`` as the frames a bucket travels in: consecutive slices of at most ``frame_bytes``."""
    return [mem[o : o + frame_bytes] for o in range(0, len(mem), frame_bytes)]


def host_buffer(nbytes: int) -> torch.Tensor:
    """A 1-D uint8 host buffer, pinned when CUDA is available (fast, async device copies)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())


class ZmqSender(Sender):
    """Sender half: pushes to every receiver in ``peers``.

    Args:
        peers: the receivers: each its address or what its ``info()`` returned.
        timeout: seconds any wait for a receiver may take.
        auth: CURVE keys (:class:`refit.auth.CurveAuth`) when the receivers require them.
    """

    def __init__(self, peers: Peers = (), *, timeout: float = 120.0, auth: CurveAuth | None = None, frame_bytes: int = DEFAULT_FRAME_BYTES) -> None:
        if isinstance(frame_bytes, bool) or not isinstance(frame_bytes, int) or not MIN_FRAME_BYTES <= frame_bytes <= MAX_FRAME_BYTES:
            raise TransportError(
                f"frame_bytes must be an int in [{MIN_FRAME_BYTES}, {MAX_FRAME_BYTES}], got {frame_bytes!r:.80} "
                f"(default {DEFAULT_FRAME_BYTES}: frames over 32 MiB cost the receiver fresh pages on every push)"
            )
        self.group = PeerGroup([i["address"] for i in peer_infos(peers, "zmq")], timeout=timeout, auth=auth)
        self.frame_bytes = frame_bytes
        self._bufs: list[torch.Tensor] = []
        self._num_buffers = 2

    supports_checksum = True
    sends_in_place = True

    @override
    def handshake(self, manifest: Manifest, version: int) -> None:
        self.group.handshake(manifest, version, self._num_buffers, checksum=self.checksum or "", record=self.record)

    @override
    def buffers(self, bucket_bytes: int, num_buffers: int) -> list[torch.Tensor]:
        self._num_buffers = num_buffers
        # frames as large as a bucket ask for one frame per bucket (a CPU receiver applies it
        # without a copy); tensors sent in place would split it at their edges
        self.sends_in_place = self.frame_bytes < bucket_bytes
        if len(self._bufs) != num_buffers or self._bufs[0].numel() != bucket_bytes:
            self._bufs = [host_buffer(bucket_bytes) for _ in range(num_buffers)]
        return self._bufs

    @override
    def wait_reusable(self, slot: int) -> None:
        self.group.wait_slot(slot)

    @override
    def send(self, index: int, slot: int, nbytes: int, checksum: bytes | None = None) -> None:
        self.send_pieces(index, slot, [host_bytes(self._bufs[slot])[:nbytes]], checksum=checksum)

    @override
    def send_pieces(self, index: int, slot: int, pieces: Sequence[memoryview], checksum: bytes | None = None) -> None:
        if self._bufs[slot].is_pinned():  # pack used non-blocking device-to-host copies
            torch.cuda.current_stream().synchronize()
        frames = [frame for piece in pieces for frame in split_frames(piece, self.frame_bytes)]
        self.group.send_bucket(index, sum(len(p) for p in pieces), slot, *frames, checksum=checksum)

    @override
    def finish(self) -> list[RefitReport]:
        return self.group.finish()

    @override
    def committed_versions(self) -> list[int] | None:
        return self.group.committed_versions()

    @override
    def fingerprints(self) -> list[Fingerprints] | None:
        return self.group.fingerprints()

    @override
    def abort(self, reason: str) -> None:
        self.group.abort(reason)

    @override
    def close(self) -> None:
        self.group.close()
        self._bufs = []


class ZmqReceiver(ReceiverTransport):
    """Receiver half: binds ``address`` and serves pushes.

    Args:
        address: ``tcp://127.0.0.1:*`` by default (loopback, free port); ``ipc:///path`` gets an
            owner-only socket file.
        name: this receiver's name in reports and errors.
        device: ``"cuda"`` to stage into pinned buffers for device targets; default: ``cpu``
            (apply straight from the received frame).
        auth: CURVE keys (:class:`refit.auth.CurveAuth`): only senders holding the expected key
            are heard. Default: unauthenticated (see docs/reliability.md).
        io_cpus: the CPUs of the ZMQ I/O thread that receives the buckets: ``"inherit"``
            (default: the calling thread's), ``"auto"`` (those around this process besides the
            ones the calling thread is pinned to: what refit's vLLM worker extension asks for,
            so that receiving bucket k+1 overlaps applying bucket k on a pinned CPU worker), or
            a collection of CPU ids (:mod:`refit.transports.io_threads`).
    """

    def __init__(
        self,
        *,
        address: str = DEFAULT_ADDRESS,
        name: str = "receiver",
        device: str = "cpu",
        auth: CurveAuth | None = None,
        io_cpus: IoCpus = "inherit",
    ) -> None:
        self.server = ControlServer(address, name=name, auth=auth, io_cpus=io_cpus)
        self.name = name
        self.device = torch.device(device)
        self._staging: list[torch.Tensor] = []
        self._copier: ThreadPoolExecutor | None = None  # copies the next bucket's frames into staging while one is applied

    @override
    def info(self) -> dict[str, Any]:
        return {"address": self.server.address}

    def _bucket(self, msg: Bucket, frames: Frames) -> tuple[torch.Tensor, bool]:
        """The bucket's bytes, and whether they sit in a reused staging buffer."""
        sizes = [len(f.buffer) for f in frames]
        if sum(sizes) != msg.nbytes or (msg.nbytes and 0 in sizes):
            raise WireError(f"{self.name}: bucket {msg.index} header says {msg.nbytes} bytes, its {len(sizes)} frames hold {sum(sizes)}")
        if msg.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8), False
        if len(frames) == 1 and self.device.type == "cpu":
            return torch.frombuffer(frames[0].buffer, dtype=torch.uint8), False  # a view of ZMQ's frame, alive while views of it are
        slot = msg.slot % 64
        while len(self._staging) <= slot:
            self._staging.append(host_buffer(0))
        if self._staging[slot].numel() < msg.nbytes:
            self._staging[slot] = host_buffer(msg.nbytes)
        staged = self._staging[slot][: msg.nbytes]
        offset = 0
        for frame, size in zip(frames, sizes, strict=True):
            ctypes.memmove(staged.data_ptr() + offset, torch.frombuffer(frame.buffer, dtype=torch.uint8).data_ptr(), size)
            offset += size
        return staged, True

    @override
    def receive(self, loader: Loader, timeout: float | None, *, push_timeout: float | None = None) -> RefitReport | None:
        if self._copier is None:  # on the I/O thread's CPUs: off a pinned worker's core
            cpus = self.server.io_cpus
            place = None if cpus is None else functools.partial(os.sched_setaffinity, 0, cpus)
            self._copier = ThreadPoolExecutor(1, f"refit-staging-{self.name}", initializer=place)
        return self.server.receive(
            loader,
            timeout,
            self._bucket,
            push_timeout=push_timeout,
            after_apply=self._after_apply if self.device.type == "cuda" else None,
            prefetch=self._copier,
        )

    def _after_apply(self, msg: Bucket) -> None:
        """The host-to-device copies out of a pinned staging slot are only queued; they must
        have read it before the ack lets the next bucket overwrite it."""
        torch.cuda.current_stream(self.device).synchronize()

    @override
    def close(self) -> None:
        if self._copier is not None:
            self._copier.shutdown()
            self._copier = None
        self.server.close()
