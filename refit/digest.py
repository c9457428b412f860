"""Content digests of named tensors, for inspection: the demo's bit-for-bit checks, the vLLM
worker's ``refit_digest`` RPC, and the per-tensor fingerprints ``refit verify`` compares."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

from refit.meta import dtype_name
from refit.pack import host_bytes


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """One sha256 over every tensor's name, dtype, shape and raw bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(host_bytes(v))
    return h.hexdigest()


def digest_header(dtype: torch.dtype, shape: Iterable[int]) -> hashlib._Hash:
    """A sha256 fed with a tensor's dtype (wire name) and shape; feed it the tensor's bytes in
    order (whole, or chunk after chunk) to get its :func:`tensor_digest`."""
    return hashlib.sha256(f"{dtype_name(dtype)}:{list(shape)}:".encode())


def tensor_digest(t: torch.Tensor) -> bytes:
    """The 32-byte sha256 of one tensor's dtype, shape and raw bytes (its fingerprint).

    Raises:
        PlanError: a dtype that cannot travel.
    """
    h = digest_header(t.dtype, t.shape)
    h.update(host_bytes(t.detach().cpu().contiguous()))
    return h.digest()


def fingerprints(tensors: Mapping[str, torch.Tensor]) -> dict[str, bytes]:
    """``name -> tensor_digest`` of every tensor."""
    return {k: tensor_digest(v) for k, v in tensors.items()}
