"""Per-bucket checksums: the algorithms, the option that picks one, and the check.

A sender with checksums on computes a short digest (8 or 16 bytes) of each bucket's bytes as
packed and sends it with the bucket; the receiver recomputes it over the bytes it holds and refuses the
bucket, before applying any of it, when the two differ. Two algorithms, picked by where the
bucket lives:

- ``xxh3``: xxHash's xxh3_64 of the bytes (the ``xxhash`` package), for host buckets. A
  non-cryptographic hash: any corruption is caught except with probability about 2**-64.
  It runs at memory speed on one core.
- ``sum64``: for device buckets, two sums over the bytes read as little-endian 64-bit words
  ``w``, computed by integer reductions on the device: ``sum(w)`` and ``sum((i + 1) * w)``,
  both modulo 2**64, the first plus the length (16 bytes). Integer addition is exact and order-free, so the GPU and the
  CPU agree bit for bit. The first sum catches every corruption confined to one 64-bit word (a
  flipped bit or byte, a zeroed word: it changes the sum by a nonzero amount modulo 2**64); the
  weighted one catches words swapped or shifted (unless ``(i - j) * (w_i - w_j)`` happens to be
  a multiple of 2**64). It is not a hash: a change crafted to cancel passes. It costs a few passes over the bucket in device memory and one
  host synchronisation per bucket; it avoids copying the bucket to the host.

``auto`` picks ``xxh3`` for host staging buffers and ``sum64`` for device ones. Rejected: a
sampled hash of a few bytes per bucket (misses most single-byte corruptions, the failure the
check is for) and a cryptographic hash (several times slower than xxh3 for no gain against
accidental corruption).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import torch

from refit.errors import RefitError
from refit.meta import TensorMeta

#: Words summed per device reduction step (bounds the temporaries to 2 x 32 MiB).
_CHUNK_WORDS = 1 << 22
_MASK = (1 << 64) - 1


class Checksum(enum.StrEnum):
    """A per-bucket checksum algorithm (see the module doc)."""

    XXH3 = "xxh3"
    SUM64 = "sum64"


def check_checksum_option(value: Any) -> str | None:
    """Validate ``Refitter(checksum=...)``: None (off), ``"auto"``, ``"xxh3"`` or ``"sum64"``.

    Raises:
        RefitError: any other value, naming the accepted ones.
    """
    if value is None or value is False:
        return None
    if value is True:
        return "auto"
    if isinstance(value, str) and value in ("auto", *Checksum):
        if value == Checksum.XXH3:
            _xxhash()  # fail now, not at the first push
        return str(value)
    raise RefitError(f"checksum must be None (off), 'auto', 'xxh3' or 'sum64', got {value!r:.80}")


def pick(option: str | None, device: torch.device) -> Checksum | None:
    """The algorithm ``option`` means for staging buffers on ``device`` (``auto``: xxh3 on the
    host, sum64 on a device)."""
    if option is None:
        return None
    if option == "auto":
        if device.type == "cpu":
            try:
                _xxhash()
            except RefitError:
                return Checksum.SUM64  # still a check, without the optional package
            return Checksum.XXH3
        return Checksum.SUM64
    return Checksum(option)


def _xxhash() -> Any:
    try:
        import xxhash
    except ImportError:
        raise RefitError("checksum 'xxh3' needs the xxhash package: pip install xxhash (or refit-stream[zmq]); or use checksum='sum64'") from None
    return xxhash


def bucket_checksum(algorithm: Checksum, bucket: torch.Tensor) -> bytes:
    """The checksum of ``bucket`` (a 1-D uint8 tensor: exactly the bytes to check): 8 bytes for
    ``xxh3`` (its big-endian digest), 16 for ``sum64``.

    A pinned host bucket may still be the target of queued device-to-host copies: the current
    CUDA stream is synchronised first. ``xxh3`` of a device bucket copies it to the host first
    (slow; ``auto`` picks ``sum64`` there).
    """
    if bucket.dim() != 1 or bucket.dtype != torch.uint8:
        raise RefitError(f"bucket_checksum needs a 1-D uint8 tensor, got {bucket.dtype}{list(bucket.shape)}")
    if bucket.device.type == "cpu" and bucket.is_pinned() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()
    if algorithm is Checksum.XXH3:
        from refit.pack import host_bytes

        host = bucket if bucket.device.type == "cpu" and bucket.is_contiguous() else bucket.cpu().contiguous()
        return bytes(_xxhash().xxh3_64_digest(host_bytes(host)))
    return _sum64(bucket)


def pieces_checksum(pieces: Sequence[memoryview]) -> bytes:
    """The ``xxh3`` checksum of the bytes of ``pieces`` taken in order: the same as
    :func:`bucket_checksum` of them laid end to end (a bucket sent in place, not packed)."""
    h = _xxhash().xxh3_64()
    for piece in pieces:
        h.update(piece)
    return bytes(h.digest())


_WEIGHTS: dict[torch.device, torch.Tensor] = {}  # 1, 2, ..., _CHUNK_WORDS per device, made once


def _sum64(bucket: torch.Tensor) -> bytes:
    n = bucket.numel()
    whole = n - n % 8
    words = bucket[:whole].view(torch.int64) if whole else bucket.new_empty(0).view(torch.int64)
    weights = _WEIGHTS.get(bucket.device)
    if weights is None:
        weights = _WEIGHTS[bucket.device] = torch.arange(1, _CHUNK_WORDS + 1, dtype=torch.int64, device=bucket.device)
    parts: list[torch.Tensor] = []  # per chunk: sum(w_j), sum((j + 1) * w_j); read back once per bucket
    for k in range(0, words.numel(), _CHUNK_WORDS):
        w = words[k : k + _CHUNK_WORDS]
        # int64 sums and products wrap modulo 2**64 on every device: exact, order-free
        parts += [w.sum(), (w * weights[: w.numel()]).sum()]
    a = b = 0
    values = torch.stack(parts).tolist() if parts else []
    for c, k in enumerate(range(0, words.numel(), _CHUNK_WORDS)):
        s, weighted = values[2 * c], values[2 * c + 1]
        a += s
        b += weighted + k * s  # sum((k + j + 1) * w_j) = sum((j + 1) * w_j) + k * sum(w_j)
    if whole < n:  # the last bytes, as one zero-padded word
        tail = int.from_bytes(bytes(bucket[whole:].cpu().tolist()), "little")
        a += tail
        b += tail * (whole // 8 + 1)
    a += n  # the length counts too (trailing zero bytes add nothing to the sums)
    return (a & _MASK).to_bytes(8, "little") + (b & _MASK).to_bytes(8, "little")


def check_bucket(algorithm: Checksum, bucket: torch.Tensor, expected: bytes | None, peer: str, index: int, metas: Sequence[TensorMeta]) -> str | None:
    """None if ``bucket`` (exactly its bytes) matches the sender's checksum ``expected``; else
    the error text, naming receiver ``peer``, bucket ``index`` and the tensors in it (``metas``)."""
    if expected is None:
        return f"{peer}: bucket {index} came without the {algorithm} checksum its push announced; nothing of it was applied"
    got = bucket_checksum(algorithm, bucket)
    if got == expected:
        return None
    names = list(dict.fromkeys(m.name for m in metas))
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return (
        f"{peer}: bucket {index} is corrupt: its {algorithm} checksum is {got.hex()}, the sender's {expected.hex()}; "
        f"nothing of it was applied (it holds {shown or 'no tensors'}). The bytes changed on the way: check the "
        "network / shared memory / GPU, and push again"
    )
