"""A content digest of named tensors, for inspection: the demo's bit-for-bit checks and the vLLM
worker's ``refit_digest`` RPC."""

from __future__ import annotations

import hashlib

import torch

from refit.pack import host_bytes


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """One sha256 over every tensor's name, dtype, shape and raw bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(host_bytes(v))
    return h.hexdigest()
