"""Has any of a list of tensors changed in a way that changes the value read at its address?

The collector reads cached scales by address (``gather.py``). An equal data pointer is not
enough for that read to be the tensor's value: the same bytes mean another value under another
dtype (``t.view(torch.int32)``, ``buf.view(torch.bfloat16)[2 * i]``), with torch's negative
bit (``z.conj().imag``, ``t._neg_view()``), under a subclass whose ops are its own, or at
another rank. :class:`Signature` records, when a layout is built, everything of each tensor
that decides its value besides the address (Python type, dtype, device, dispatch keys: the
negative, conjugate and zero-tensor bits and Python subclasses' keys, sizes and strides) and
compares it again every push.

Why this way: each attribute read from Python costs ~70 ns per tensor (a C call through
torch's argument handling), so comparing dtypes, bits, types and ranks in separate passes
costs 3-4 ms per 10,000 scales, most of the 5 ms budget. torch's own guard of compiled code,
``torch._C._dynamo.guards.TensorGuards``, compares all of that for a whole list in one C++ loop
(~1 ms per 10,000 cold tensors on the CPU box). It is a private API, so it is used only where
it exists and accepts what it is given, and the tests check, on the installed torch, that it
notices every reinterpretation listed above; elsewhere the same properties are compared in
Python passes (slower, same answers). Rejected: skipping the comparison while the layout holds
the scales' memory (what the collector did before): a same-address view of another dtype was
then sent as the old dtype's bytes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch

_TensorGuards: Any = None
try:  # torch's C++ tensor guard (see the module doc); absent or changed: the Python passes
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - depends on the torch build
    pass

_PROPERTIES: tuple[Callable[[Any], Any], ...] = (
    type,
    *(operator.attrgetter(name) for name in ("dtype", "device", "shape")),
    torch.Tensor.is_neg,
    torch.Tensor.is_conj,
    torch.Tensor._is_zerotensor,
)


def _python_signature(values: Sequence[Any]) -> list[list[Any]]:
    """The compared properties of ``values`` as lists (C-level loops, one per property)."""
    return [list(map(get, values)) for get in _PROPERTIES]


class Signature:
    """What decides the values of a list of tensors besides their addresses.

    Args:
        values: the tensors (any dense tensors: plain, parameters, subclasses).
        native: use torch's C++ guard where available (False: the Python passes; for tests).

    Example:
        >>> t = torch.tensor(0.5)
        >>> sig = Signature([t])
        >>> sig.matches([torch.tensor(2.0)]), sig.matches([t.view(torch.int32)])
        (True, False)
    """

    def __init__(self, values: Sequence[torch.Tensor], *, native: bool = True) -> None:
        self._guard: Any = None
        self._python: list[list[Any]] | None = None
        if native and _TensorGuards is not None:
            try:
                self._guard = _TensorGuards(*values, dynamic_dims_sizes=None, dynamic_dims_strides=None)
            except (TypeError, RuntimeError):  # a signature change in a later torch: the Python passes
                self._guard = None
        if self._guard is None:
            self._python = _python_signature(values)

    @property
    def native(self) -> bool:
        """True if torch's C++ guard does the comparison."""
        return self._guard is not None

    def matches(self, values: Sequence[Any]) -> bool:
        """True if every value is a tensor of the recorded type, dtype, device, dispatch keys,
        sizes (and, with the C++ guard, strides and ``requires_grad``). Anything else (a value
        that is not a tensor, another count) is False, never an error."""
        if self._guard is not None:
            try:
                return bool(self._guard.check(*values))
            except (TypeError, RuntimeError):
                return False
        try:
            return _python_signature(values) == self._python
        except (TypeError, AttributeError, RuntimeError):
            return False
