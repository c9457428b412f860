"""The send loop of one push, the same for every transport: wait until a staging buffer may be
reused, pack the next bucket into it, hand it to the transport.

The first bucket is packed into the sender's own staging buffer *before* the handshake, so the
device copies overlap the receivers' answer; nothing reaches a receiver before it accepted the
manifest. Runs of 0-d scales are packed with one strided copy each. A transport that
``sends_in_place`` (``zmq``) gets large contiguous host tensors sent from where they lie, with
only the rest of each bucket packed around them. With checksums on
(``sender.checksum``), each bucket's checksum is taken right after it is packed and travels with
it (see :mod:`refit.integrity`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch

from refit.collect import ScaleBlocks
from refit.errors import PlanError
from refit.integrity import Checksum, bucket_checksum, pieces_checksum
from refit.meta import Manifest, TensorMeta
from refit.pack import LARGE_COPY_BYTES, Lazy, chunk_of, host_bytes, pack
from refit.scales import run_view
from refit.transports.base import Progress, Sender


def in_place_bytes(meta: TensorMeta, src: torch.Tensor | Lazy) -> memoryview | None:
    """The bytes ``meta`` carries, in ``src`` itself, when they may be sent from there: a
    contiguous host tensor of at least ``LARGE_COPY_BYTES`` (smaller ones are cheaper to pack
    than to send as a frame of their own). None: pack it."""
    if isinstance(src, Lazy) or src.device.type != "cpu" or meta.nbytes < LARGE_COPY_BYTES:
        return None
    view = chunk_of(src, meta) if meta.is_chunked else src
    if not view.is_contiguous():
        return None
    if view.numel() * view.element_size() != meta.nbytes:
        raise PlanError(f"{meta.name}: {src.dtype}{list(src.shape)} no longer has the {meta.nbytes} bytes planned (was a tensor changed in place?)")
    return host_bytes(view)


def bucket_pieces(staging: memoryview, in_place: list[tuple[int, memoryview]], nbytes: int) -> list[memoryview]:
    """A bucket of ``nbytes`` as ordered byte views: the tensors sent in place (``(offset,
    bytes)``) and, around them, the slices of the ``staging`` buffer that hold the rest."""
    pieces: list[memoryview] = []
    pos = 0
    for offset, view in sorted(in_place, key=lambda p: p[0]):
        if offset > pos:
            pieces.append(staging[pos:offset])
        pieces.append(view)
        pos = offset + len(view)
    if pos < nbytes:
        pieces.append(staging[pos:nbytes])
    return pieces


def stream(
    sender: Sender,
    manifest: Manifest,
    sources: Mapping[str, torch.Tensor | Lazy],
    *,
    num_buffers: int,
    handshake: Callable[[], object] | None = None,
    progress: Progress | None = None,
    blocks: ScaleBlocks | None = None,
) -> dict[str, float]:
    """Pack and send every bucket of ``manifest`` with at most ``num_buffers`` in flight.

    ``handshake`` (the sender's, bound to this push) is called once the first bucket is packed
    and before it is sent, so the first copies overlap it; a refusal raises from here with
    nothing sent. Returns seconds spent handshaking, packing and waiting for buffer reuse.
    Chunked :class:`Lazy` sources are materialized once (on the buffers' device) and dropped
    after their last chunk. Runs of 0-d tensors are packed with one strided copy (from
    ``blocks`` when it holds them stacked).
    """
    sender.stage(manifest)
    bufs = sender.buffers(manifest.bucket_bytes, num_buffers)
    pinned = bool(bufs) and bufs[0].is_pinned()  # host staging for a GPU source: non-blocking copies
    pack_s = wait_s = handshake_s = checksum_s = 0.0
    algorithm = sender.checksum
    in_place = sender.sends_in_place and algorithm in (None, Checksum.XXH3)
    materialized: dict[str, torch.Tensor] = {}
    if handshake is not None and not manifest.num_buckets:
        t0 = time.perf_counter()
        handshake()
        handshake_s = time.perf_counter() - t0
    for index, metas in enumerate(manifest.by_bucket):
        slot = index % len(bufs)
        t0 = time.perf_counter()
        sender.wait_reusable(slot)
        t1 = time.perf_counter()
        singles: list[TensorMeta] = []
        srcs: list[torch.Tensor | Lazy] = []
        sent_in_place: list[tuple[int, memoryview]] = []
        for i, j, is_run in manifest.segments[index]:
            run = metas[i:j]
            stacked = blocks.source(run) if is_run and blocks is not None else None
            if stacked is None and is_run:
                values = [sources[m.name] for m in run]
                if not any(isinstance(v, Lazy) for v in values) and len({v.device for v in values}) == 1:  # type: ignore[union-attr]
                    stacked = torch.stack(values)  # type: ignore[arg-type]
            if stacked is not None:
                run_view(bufs[slot], run).copy_(stacked, non_blocking=pinned)
                continue
            for m in run:
                src = sources[m.name]
                if isinstance(src, Lazy) and m.is_chunked:
                    if m.name not in materialized:
                        materialized[m.name] = src.materialize(bufs[slot].device)
                    src = materialized[m.name] if m.chunk < m.chunks - 1 else materialized.pop(m.name)
                if in_place and (view := in_place_bytes(m, src)) is not None:
                    sent_in_place.append((m.offset, view))
                    continue
                singles.append(m)
                srcs.append(src)
        pack(bufs[slot], singles, srcs, non_blocking=pinned)
        t2 = time.perf_counter()
        pack_s += t2 - t1
        nbytes = manifest.bucket_sizes[index]
        pieces = bucket_pieces(host_bytes(bufs[slot]), sent_in_place, nbytes) if in_place else None
        checksum = None
        if algorithm is not None:
            if pieces is None:
                checksum = bucket_checksum(algorithm, bufs[slot][:nbytes])
            else:
                if pinned:  # the staged parts may still be the target of queued device copies
                    torch.cuda.current_stream().synchronize()
                checksum = pieces_checksum(pieces)
            checksum_s += time.perf_counter() - t2
            t2 = time.perf_counter()
        if index == 0 and handshake is not None:
            handshake()
            handshake_s = time.perf_counter() - t2
        if pieces is not None:
            sender.send_pieces(index, slot, pieces, checksum=checksum)
        elif checksum is None:
            sender.send(index, slot, nbytes)
        else:
            sender.send(index, slot, nbytes, checksum=checksum)  # type: ignore[call-arg]
        wait_s += t1 - t0
        if progress is not None:
            progress(index + 1, manifest.num_buckets)
    out = {"handshake": handshake_s, "pack": pack_s, "wait": wait_s}
    if algorithm is not None:
        out["checksum"] = checksum_s
    return out
