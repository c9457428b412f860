"""Shared fixtures and helpers: bit-exact comparison, a state of every dtype."""

from __future__ import annotations

import pytest
import torch

from refit.meta import DTYPES


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if ``a`` and ``b`` have the same dtype, shape and raw bytes (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    ra = a.detach().contiguous().view(torch.uint8) if a.dim() else a.detach().reshape(1).view(torch.uint8)
    rb = b.detach().contiguous().view(torch.uint8) if b.dim() else b.detach().reshape(1).view(torch.uint8)
    return torch.equal(ra.cpu(), rb.cpu())


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, device: str = "cpu") -> torch.Tensor:
    """Random bits of ``dtype`` (every bit pattern, NaNs included)."""
    size = torch.empty(0, dtype=dtype).element_size()
    n = 1
    for d in shape:
        n *= d
    high = 2 if dtype == torch.bool else 256  # torch bools hold 0 or 1; other bytes are undefined behaviour
    raw = torch.randint(0, high, (n * size,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape).to(device)


def every_dtype_state(gen: torch.Generator, device: str = "cpu") -> dict[str, torch.Tensor]:
    shapes = [(), (0,), (7,), (3, 5), (2, 3, 4)]
    out = {}
    for name, dtype in sorted(DTYPES.items()):
        for i, shape in enumerate(shapes):
            out[f"{name}.{i}"] = random_tensor(shape, dtype, gen, device)
    return out


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
