"""Read accounting of the vLLM probe (refit/adapters/vllm_reads.py): which elements of a probe
input the loaders' copies read, on meta tensors as in the probe."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from refit.adapters.vllm_reads import CopyTrace, Reads, bounding_shape, covered

pytestmark = pytest.mark.unit


def trace(shape: tuple[int, ...], loader: Callable[[torch.Tensor], object]) -> Reads:
    """Run ``loader(source)`` (which copies parts of ``source`` into meta targets) under the trace."""
    source = torch.empty(shape, device="meta")
    reads = Reads()
    with CopyTrace(source, reads):
        loader(source)
    return reads


def test_narrowed_rows_cover_part_of_an_oversized_tensor():
    reads = trace((300, 128), lambda x: torch.empty(256, 128, device="meta").copy_(x.narrow(0, 0, 256)))
    assert covered(reads.regions) == 256 * 128
    assert bounding_shape(reads.regions, (300, 128)) == [256, 128]


def test_narrowed_columns_are_strided_runs():
    reads = trace((128, 300), lambda x: torch.empty(128, 256, device="meta").copy_(x.narrow(1, 0, 256)))
    assert covered(reads.regions) == 128 * 256
    assert bounding_shape(reads.regions, (128, 300)) == [128, 256]


def test_two_shards_cover_the_whole_tensor_once():
    def both_ranks(x: torch.Tensor) -> None:
        for rank in (0, 1):
            torch.empty(128, 128, device="meta").copy_(x.narrow(0, rank * 128, 128))

    reads = trace((256, 128), both_ranks)
    assert covered(reads.regions) == 256 * 128 and not reads.untraced


def test_overlapping_reads_count_once():
    def overlapping(x: torch.Tensor) -> None:
        torch.empty(64, 8, device="meta").copy_(x[0:64])
        torch.empty(64, 8, device="meta").copy_(x[32:96])

    assert covered(trace((100, 8), overlapping).regions) == 96 * 8


def test_a_scalar_and_a_reshaped_scalar():
    assert covered(trace((), lambda x: torch.empty(1, device="meta").copy_(x.reshape(1))).regions) == 1


def test_a_copy_of_something_else_is_untraced():
    reads = trace((16, 16), lambda x: torch.empty(16, 16, device="meta").copy_(x.t().contiguous()))
    assert reads.untraced


def test_written_elements_are_counted():
    source = torch.empty(4, 4, device="meta")
    with CopyTrace(source, Reads()) as t:
        torch.empty(2, 4, device="meta").copy_(source[:2])
    assert t.numel == 8
