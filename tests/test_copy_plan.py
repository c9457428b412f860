"""CopyPlan on the host: every path (memmove for large contiguous tensors, copy_ for large
strided ones, a loop or the multi-tensor kernel for small ones) copies bit for bit."""

from __future__ import annotations

import pytest
import torch

from refit.pack import CPU_LOOP_MAX, LARGE_COPY_BYTES, CopyPlan

pytestmark = pytest.mark.unit


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("small", [3, CPU_LOOP_MAX + 5], ids=["loop", "foreach"])
def test_host_copies_are_bit_exact(small):
    gen = torch.Generator().manual_seed(0)
    big = torch.randint(-(2**15), 2**15 - 1, (LARGE_COPY_BYTES // 2 + 17,), dtype=torch.int16, generator=gen).view(torch.bfloat16)
    strided = torch.randn(1024, 600, generator=gen).t()  # large, not contiguous: copy_
    nan = torch.tensor([float("nan")] * 4).view(torch.int32)
    nan[1] = 0x7FC00123  # a NaN payload survives
    srcs = [big, strided, nan.view(torch.float32), torch.tensor(0.5)]
    srcs += [torch.randn(7, generator=gen).to(torch.float8_e4m3fn) for _ in range(small)]
    dsts = [torch.zeros(s.shape, dtype=s.dtype) for s in srcs]
    plan = CopyPlan(dsts, srcs)
    assert len(plan.host) == 1 and len(plan.large) == 1
    plan.run()
    for d, s in zip(dsts, srcs, strict=True):
        assert torch.equal(_raw(d), _raw(s))
    # a plan is re-run on new values of the same buffers
    big.view(torch.int16).add_(1)
    plan.run()
    assert torch.equal(_raw(dsts[0]), _raw(big))
