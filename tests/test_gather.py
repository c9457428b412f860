"""Reading many 0-d tensors by address: the window path, and the stacked fallback."""

from __future__ import annotations

import pytest
import torch

from refit import gather as gather_module
from refit.gather import Gather
from refit.meta import DTYPES
from tests.conftest import random_tensor, same_bits

pytestmark = pytest.mark.unit


def scattered(dtype: torch.dtype, gen: torch.Generator, device: str = "cpu") -> list[torch.Tensor]:
    """0-d tensors of ``dtype``: separate allocations and views of one flat buffer, interleaved."""
    flat = random_tensor((40,), dtype, gen, device)
    own = [random_tensor((), dtype, gen, device) for _ in range(40)]
    return [t for pair in zip(own, flat.unbind()[::-1]) for t in pair]


def pointers(values: list[torch.Tensor]) -> list[int]:
    return [v.data_ptr() for v in values]


def check_reads_current_values(values: list[torch.Tensor], gen: torch.Generator, *, hold: bool = True) -> Gather:
    g = Gather(values, pointers(values), hold=hold)
    assert same_bits(g(values), torch.stack(values))
    for v in values[::3]:  # in place, as a quantizer updates its amax
        v.copy_(random_tensor((), v.dtype, gen, str(v.device)))
    assert same_bits(g(values), torch.stack(values))
    return g


@pytest.mark.parametrize("dtype", sorted(DTYPES.values(), key=str), ids=str)
def test_every_dtype_is_read_bit_exact_through_the_window(dtype: torch.dtype, gen: torch.Generator) -> None:
    g = check_reads_current_values(scattered(dtype, gen), gen)
    assert g._window is not None  # the fast path was taken


@pytest.mark.parametrize("hold", [True, False])
def test_without_a_window_the_tensors_are_stacked(hold: bool, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gather_module, "_window", lambda *args: None)
    g = check_reads_current_values(scattered(torch.float32, gen), gen, hold=hold)
    assert g._window is None and (g.held is not None) == hold


def test_storages_are_kept_while_the_gather_lives(gen: torch.Generator) -> None:
    values = scattered(torch.float32, gen)
    addresses = pointers(values)
    g = Gather(values, addresses)
    del values  # the trainer dropped its tensors: nothing may take their memory yet
    newcomers = [torch.zeros(()) for _ in range(200)]
    assert not {t.data_ptr() for t in newcomers} & set(addresses)
    assert g.held is not None
