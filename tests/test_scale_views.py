"""A cached scale layout never changes a value.

The collector reads the scales of a push by address once it has seen their layout. Whatever the
trainer does to them between pushes (views of another dtype over the same bytes, other ranks,
strides or storages, torch's negative bit, complex views, subclasses), every push must deliver
exactly the values, dtypes and shapes it was handed, as a Refitter that never saw the scales
before does. Each case runs with the layout holding the scales' memory (the same tensors every
push) and following new tensors (new tensors every push, nothing held), over separately
allocated scales and over 0-d views of one flat buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import pytest
import torch

from refit import PlanError, Refitter, ResolveError
from refit.load import Loader
from refit.meta import TensorMeta
from refit.pack import host_memory
from refit.resolve import Placement, Resolution
from refit.signature import Signature
from tests.conftest import same_bits
from tests.procs import zeros_like

pytestmark = pytest.mark.unit

N = 24
NAMES = [f"l{i}.weight_scale" for i in range(N)]
NAME = "l3.weight_scale"  # inside the run of 0-d float32 scales
CHANNEL = "l0.channel_scale"  # a rank-1 scale, read on its own
Scales = dict[str, torch.Tensor]


class Capture:
    """A receiver target that takes whatever arrives (any name, dtype, shape) and keeps it."""

    stable = False  # resolve every push again: the dtypes and shapes may change

    def __init__(self) -> None:
        self.got: dict[str, torch.Tensor] = {}

    def resolve(self, meta: TensorMeta) -> Resolution:
        if meta.chunk == 0:
            self.got[meta.name] = zeros_like(torch.empty(meta.shape, dtype=meta.dtype))
        return Resolution(Placement.LOCAL, dest=self.got[meta.name], key=meta.name)

    def required_keys(self) -> set[str]:
        return set()

    def post_load(self) -> None:
        pass


def make(storage: str) -> Scales:
    values = [0.25 + i / 8 for i in range(N)]
    if storage == "flat":
        flat = torch.tensor(values)
        scales = {n: flat[i] for i, n in enumerate(NAMES)}
    else:
        scales = {n: torch.tensor(v) for n, v in zip(NAMES, values)}
    return {CHANNEL: torch.tensor([0.5, 1.0, 1.5, 2.0]), **scales}


def renew(scales: Scales, storage: str) -> Scales:
    """The same values in new tensors (in new memory), laid out as ``storage``."""
    if storage == "flat":
        flat = torch.stack([scales[n] for n in NAMES]).clone()
        return {CHANNEL: scales[CHANNEL].clone(), **{n: flat[i] for i, n in enumerate(NAMES)}}
    return {k: v.clone() for k, v in scales.items()}


def low_half(t: torch.Tensor, dtype: torch.dtype, value: float) -> torch.Tensor:
    """A 0-d ``dtype`` view of the first bytes of 0-d float32 ``t`` (same address), set to ``value``."""
    view = t.view(1).view(dtype)[0]
    view.fill_(value)
    return view


class Tracked(torch.Tensor):
    """A subclass whose ops go through its own ``__torch_function__`` (recorded)."""

    seen: ClassVar[list[object]] = []

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Iterable[type], args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def _set_storage(s: Scales) -> Scales:
    s[NAME].set_(torch.tensor([9.0, 1.5]).untyped_storage(), 1, (), ())  # same object, other storage
    return s


def _alias(dtype: torch.dtype, value: float | None) -> Callable[[Scales], Scales]:
    def change(s: Scales) -> Scales:  # a new tensor on a new storage object over the same bytes
        size = torch.empty((), dtype=dtype).element_size()
        alias = torch.frombuffer(host_memory(s[NAME].data_ptr(), size, owner=s[NAME]), dtype=dtype)[0]
        if value is not None:
            alias.fill_(value)
        return {**s, NAME: alias}

    return change


def _negative(s: Scales) -> Scales:
    s[NAME].fill_(-0.75)  # the memory holds -0.75; the tensor handed over reads +0.75
    return {**s, NAME: s[NAME]._neg_view()}


def _data_int32(s: Scales) -> Scales:
    s[NAME].data = s[NAME].data.view(torch.int32)  # same object, same memory, other dtype
    return s


def _strided_channel(s: Scales) -> Scales:
    wide = torch.zeros(8)
    wide[::2] = s[CHANNEL] * 2
    return {**s, CHANNEL: wide[::2]}  # stride 2


# name -> change (may mutate the scales in place; returns what the push is handed)
CHANGES: dict[str, Callable[[Scales], Scales]] = {
    "bfloat16 view, other size": lambda s: {**s, **{n: low_half(s[n], torch.bfloat16, 0.5) for n in NAMES}},
    "float16 view of one, other size": lambda s: {**s, NAME: low_half(s[NAME], torch.float16, 0.375)},
    "int32 view, same size": lambda s: {**s, NAME: s[NAME].view(torch.int32)},
    ".data = int32 view, same object": _data_int32,
    "rank 1 at the same address": lambda s: {**s, NAME: s[NAME].view(1)},
    "other strides at the same address": lambda s: {**s, CHANNEL: s[CHANNEL].as_strided((4,), (0,))},
    "strided view of other memory": _strided_channel,
    "set_ to another storage": _set_storage,
    "new storage, same address and dtype": _alias(torch.float32, None),
    "new storage, same address, other dtype": _alias(torch.bfloat16, 0.625),
    "negative bit": _negative,
    "conj().imag of a complex (negative bit)": lambda s: {**s, NAME: torch.tensor(0.5 - 0.25j).conj().imag},
    "conj().real of a complex": lambda s: {**s, NAME: torch.tensor(0.5 - 0.25j).conj().real},
    "subclass at the same address": lambda s: {**s, NAME: s[NAME].as_subclass(Tracked)},
    "parameter at the same address": lambda s: {**s, NAME: torch.nn.Parameter(s[NAME], requires_grad=False)},
}


def cached(mode: str, storage: str) -> tuple[Refitter, Capture, Scales]:
    """A Refitter whose scale layout was built and, for "followed", aimed at new tensors."""
    capture = Capture()
    r = Refitter("local", target=Loader(capture))
    scales = make(storage)
    r.push({}, scales)
    if mode == "followed":
        scales = renew(scales, storage)
        r.push({}, scales)
    layout = r._collect._layout
    assert layout is not None and layout.groups
    assert all((g.held is None) == (mode == "followed") for g in layout.gathers)
    return r, capture, scales


def delivered(scales: Scales) -> Scales:
    """What a push of ``scales`` delivers through a Refitter that never saw them."""
    capture = Capture()
    Refitter("local", target=Loader(capture)).push({}, scales)
    return capture.got


@pytest.mark.parametrize("storage", ["separate", "flat"])
@pytest.mark.parametrize("mode", ["held", "followed"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_push_delivers_exactly_what_it_was_handed(change: str, mode: str, storage: str) -> None:
    r, capture, scales = cached(mode, storage)
    Tracked.seen.clear()
    handed = CHANGES[change](scales)
    expected = {k: v.detach().clone() for k, v in handed.items()}  # the values, dtypes and shapes handed over
    r.push({}, handed)
    for k, v in expected.items():
        assert same_bits(capture.got[k], v), (k, capture.got[k], v)
    if change == "subclass at the same address":
        assert Tracked.seen  # read through its own ops, never by address
    fresh = delivered(handed)
    assert all(same_bits(fresh[k], capture.got[k]) for k in expected)
    again = renew(make(storage), storage)  # and the layout recovers: a plain push is exact again
    r.push({}, again)
    assert all(same_bits(capture.got[k], v) for k, v in again.items())


@pytest.mark.parametrize("mode", ["held", "followed"])
@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda s: {**s, NAME: s[NAME]._neg_view()}, PlanError, f"{NAME}: scale has values <= 0"),
        (lambda s: {**s, NAME: torch.tensor(0.5 + 0.25j).conj().imag}, PlanError, f"{NAME}: scale has values <= 0"),
        (lambda s: {**s, NAME: torch.tensor(0.5 + 0.25j)}, PlanError, f"{NAME}: dtype torch.complex64 cannot travel"),
        (lambda s: {**s, NAME: low_half(s[NAME], torch.bfloat16, float("nan"))}, PlanError, f"{NAME}: scale has non-finite values"),
    ],
    ids=["negative bit", "conj().imag, negative", "complex", "bfloat16 view, NaN"],
)
def test_a_reinterpreted_bad_value_is_refused(mode: str, change: Callable[[Scales], Scales], error: type[Exception], match: str) -> None:
    r, capture, scales = cached(mode, "flat")
    before = {k: v.clone() for k, v in capture.got.items()}
    with pytest.raises(error, match=match):
        r.push({}, change(scales))
    assert all(same_bits(capture.got[k], v) for k, v in before.items())


def test_bfloat16_views_of_pushed_float32_memory_are_refused_like_a_fresh_push() -> None:
    """The issue's case: float32 scales read from a buffer are pushed, then bfloat16 views of the
    same memory. The target holds float32: both a fresh and a cached Refitter refuse, and the
    target keeps the float32 values (before, the cached one sent the float32 bytes)."""
    buf = torch.arange(1.0, N + 1.0) / 4
    target = {n: torch.zeros(()) for n in NAMES}
    r = Refitter("local", target=target)
    r.push({}, {n: buf[i] for i, n in enumerate(NAMES)})
    bf = buf.view(torch.bfloat16)
    bf[0::2] = 0.5
    views = {n: bf[2 * i] for i, n in enumerate(NAMES)}
    kept = {n: t.clone() for n, t in target.items()}
    for refitter in (Refitter("local", target=target), r):
        with pytest.raises(ResolveError, match="l0.weight_scale: dtype torch.bfloat16 does not match target torch.float32"):
            refitter.push({}, views)
    with pytest.raises(ResolveError, match="l0.weight_scale: dtype torch.int32 does not match target torch.float32"):
        r.push({}, {n: buf.view(torch.int32)[i] for i, n in enumerate(NAMES)})
    assert all(same_bits(target[n], kept[n]) for n in NAMES)


@pytest.mark.parametrize("native", [True, False], ids=["torch guard", "python passes"])
def test_signature_notices_every_reinterpretation(native: bool) -> None:
    """Both ways of comparing (torch's C++ guard where it exists, the Python passes elsewhere)
    tell apart everything that changes a value read at an unchanged address."""
    t = torch.tensor(0.5)
    values = [torch.tensor(float(i)) for i in range(8)] + [t]
    sig = Signature(values, native=native)
    assert sig.native == native or not native
    assert sig.matches(values) and sig.matches([v.clone() for v in values])
    others = {
        "bfloat16": t.view(1).view(torch.bfloat16)[0],
        "int32": t.view(torch.int32),
        "float64": t.double(),
        "rank 1": t.view(1),
        "negative bit": t._neg_view(),
        "conj().imag": torch.tensor(1 + 2j).conj().imag,
        "subclass": t.as_subclass(Tracked),
        "zero tensor": torch._efficientzerotensor(()),
        "meta": torch.empty((), device="meta"),
        "not a tensor": 0.5,
    }
    for what, other in others.items():
        assert not sig.matches([*values[:-1], other]), what
    assert not sig.matches(values[:-1])  # another count


def test_without_the_torch_guard_pushes_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch has no usable guard, the Python passes keep every push exact."""
    from refit import signature

    monkeypatch.setattr(signature, "_TensorGuards", None)
    for change in ("bfloat16 view, other size", "negative bit", "subclass at the same address", "rank 1 at the same address"):
        r, capture, scales = cached("held", "separate")
        assert not r._collect._layout.signature.native  # type: ignore[union-attr]
        handed = CHANGES[change](scales)
        expected = {k: v.detach().clone() for k, v in handed.items()}
        r.push({}, handed)
        assert all(same_bits(capture.got[k], v) for k, v in expected.items()), change
