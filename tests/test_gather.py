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
    assert check_reads_current_values(scattered(dtype, gen), gen).windowed


@pytest.mark.parametrize("hold", [True, False])
def test_without_a_window_the_tensors_are_stacked(hold: bool, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gather_module, "_window", lambda *args: None)
    g = check_reads_current_values(scattered(torch.float32, gen), gen, hold=hold)
    assert not g.windowed and (g.held is not None) == hold


def test_held_memory_is_not_given_to_other_tensors(gen: torch.Generator) -> None:
    values = scattered(torch.float32, gen)
    addresses = pointers(values)
    g = Gather(values, addresses)
    del values  # the trainer dropped its tensors: nothing may take their memory while g lives
    newcomers = [torch.zeros(()) for _ in range(200)]
    assert g.held is not None and not {t.data_ptr() for t in newcomers} & set(addresses)


def test_misaligned_tensors_are_stacked(gen: torch.Generator) -> None:
    raw = bytearray(4 * 64 + 1)
    flat = torch.frombuffer(raw, dtype=torch.float32, offset=1)  # every element one byte off
    flat.copy_(torch.rand(64) + 0.5)
    values = [*flat.unbind()[:20], *scattered(torch.float32, gen)[:20]]
    assert not check_reads_current_values(values, gen).windowed


def test_memory_that_is_not_the_value_is_stacked() -> None:
    """torch's negative bit (a public ``complex.conj().imag`` has it) and tensors without
    memory: their raw bytes are not their values."""
    negative = torch.tensor(1 + 2j, dtype=torch.complex64).conj().imag
    assert negative.is_neg() and float(negative) == -2.0
    values = [torch.tensor(float(i)) for i in range(8)] + [negative]
    g = Gather(values, pointers(values))
    assert not g.windowed and float(g(values)[-1]) == -2.0
    zero = torch._efficientzerotensor(())  # data_ptr() == 0
    values = [torch.tensor(1.0)] * 8 + [zero]
    g = Gather(values, pointers(values))
    assert not g.windowed and float(g(values)[-1]) == 0.0
