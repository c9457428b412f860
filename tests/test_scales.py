"""Many 0-d scales: strided runs, batched validation, and the fallbacks around them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch

from refit import PlanError, Refitter, ResolveError
from refit.load import Loader
from refit.meta import MIN_RUN, Role, TensorMeta, find_runs
from refit.plan import PlanEntry, plan
from refit.resolve import Placement, Resolution, TensorsResolver
from refit.scales import run_view
from refit.send import stream
from refit.transports.local import LocalSender
from tests.conftest import same_bits

pytestmark = pytest.mark.unit


def many_scales(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        dtype = torch.bfloat16 if (i // 50) % 2 else torch.float32  # runs of 50, dtypes alternate
        name = f"l{i}.input_amax" if i % 7 == 0 else f"l{i}.weight_scale"
        out[name] = (torch.rand((), generator=g) + 0.01).to(dtype)
    return out


def test_runs_are_found_and_viewed() -> None:
    entries = [PlanEntry(f"s{i}", (), torch.float32, Role.SCALE) for i in range(20)] + [PlanEntry("w", (4,), torch.float32)]
    m = plan(entries, bucket_bytes=1 << 20)
    metas = m.by_bucket[0]
    assert find_runs(metas) == [(0, 20)]
    bucket = torch.zeros(m.bucket_sizes[0], dtype=torch.uint8)
    for i, meta in enumerate(metas[:20]):
        bucket[meta.offset : meta.offset + 4].view(torch.float32)[0] = i
    assert torch.equal(run_view(bucket, metas[:20]), torch.arange(20.0))
    short = plan(entries[: MIN_RUN - 1], bucket_bytes=1 << 20)
    assert find_runs(short.by_bucket[0]) == []


@pytest.mark.parametrize("bucket_bytes", [1 << 20, 4096])  # one bucket, or runs cut by bucket edges
def test_many_scales_arrive_bit_exact_and_repeat(bucket_bytes: int) -> None:
    scales = many_scales(500)
    weights = {"w": torch.randn(64, 64)}
    target = {k: torch.zeros_like(v) for k, v in {**scales, **weights}.items()}
    r = Refitter("local", target=target, bucket_bytes=bucket_bytes)
    r.push(weights, scales)
    for k, v in scales.items():
        assert same_bits(target[k], v), k
    for v in scales.values():  # in place, as a quantizer would: the cached layout is reused
        v.mul_(2)
    rep = r.push(weights, scales)
    assert rep.receivers[0].loaded == 501
    for k, v in scales.items():
        assert same_bits(target[k], v), k


def test_scale_given_new_memory_is_read_from_it() -> None:
    """The layout reads scales through views of their memory: a scale whose tensor was given
    new memory (``.data = ...``, as some quantizers update) must be read from the new memory."""
    scales = many_scales(100)
    target = {k: torch.zeros_like(v) for k, v in scales.items()}
    r = Refitter("local", target=target)
    r.push({}, scales)
    name = "l5.weight_scale"
    scales[name].data = torch.tensor(7.5)  # same object, new storage
    scales["l6.weight_scale"].fill_(3.25)  # in place, old storage
    r.push({}, scales)
    for k, v in scales.items():
        assert same_bits(target[k], v), k
    assert float(target[name]) == 7.5


def test_new_views_of_one_flat_buffer_each_push() -> None:
    """Scales handed over as fresh 0-d views of one buffer every push sit in the same memory:
    the cached layout reads them, and every push carries that push's values."""
    flat = torch.arange(1.0, 101.0)
    names = [f"l{i}.weight_scale" for i in range(100)]
    target = {n: torch.zeros(()) for n in names}
    r = Refitter("local", target=target)
    for step in range(3):
        r.push({}, {n: flat[i] for i, n in enumerate(names)})
        assert all(float(target[n]) == float(flat[i]) for i, n in enumerate(names)), step
        flat.mul_(2)
    with pytest.raises(PlanError, match="l3.weight_scale: expected a torch.Tensor"):
        r.push({}, {n: (1.0 if i == 3 else flat[i]) for i, n in enumerate(names)})  # type: ignore[misc]  # a float on purpose


def test_bad_value_inside_a_run_is_named() -> None:
    scales = many_scales(100)
    r = Refitter("local", target={k: torch.zeros_like(v) for k, v in scales.items()})
    r.push({}, scales)
    name = "l3.weight_scale"
    scales[name].fill_(float("nan"))
    with pytest.raises(PlanError, match=f"{name}: scale has non-finite values"):
        r.push({}, scales)
    scales[name].fill_(1.0)
    scales["l7.input_amax"].fill_(0.0)  # amax may be zero
    r.push({}, scales)
    scales["l8.weight_scale"].fill_(0.0)  # a scale may not
    with pytest.raises(PlanError, match="l8.weight_scale: scale has values <= 0"):
        r.push({}, scales)


def test_receiver_validates_runs_too() -> None:
    names = [f"l{i}.k_scale" for i in range(16)]
    target = {n: torch.ones(()) for n in names}
    sender = LocalSender(target)
    m = plan([PlanEntry(n, (), torch.float32, Role.SCALE) for n in names], bucket_bytes=1 << 20)
    sender.handshake(m, 1)
    values = {n: torch.tensor(2.0) for n in names}
    values["l5.k_scale"] = torch.tensor(-1.0)  # a sender that skipped validation
    with pytest.raises(ResolveError, match="l5.k_scale: scale has values <= 0"):
        stream(sender, m, values, num_buffers=1)
    assert all(float(t) == 1.0 for t in target.values()) and not sender.loader.torn


def test_runs_with_remote_entries_fall_back_to_single_steps() -> None:
    names = [f"l{i}.k_scale" for i in range(16)]
    target = {n: torch.zeros(()) for n in names[:8]}

    class HalfRemote(TensorsResolver):
        def resolve(self, meta: TensorMeta) -> Resolution:
            return super().resolve(meta) if meta.name in self.tensors else Resolution(Placement.REMOTE, key=meta.name)

    loader = Loader(HalfRemote(target))
    rep = Refitter("local", target=loader).push({}, {n: torch.tensor(float(i + 1)) for i, n in enumerate(names)})
    assert rep.receivers[0].loaded == 8 and rep.receivers[0].remote == 8
    assert [float(target[n]) for n in names[:8]] == [float(i + 1) for i in range(8)]


def test_scale_changing_rank_in_place_is_checked_again() -> None:
    """Same memory, another rank: the cached layout must not push it as 0-d."""
    scales = many_scales(40)
    r = Refitter("local", target={k: torch.zeros_like(v) for k, v in scales.items()})
    r.push({}, scales)
    scales["l3.weight_scale"].unsqueeze_(0)
    with pytest.raises(ResolveError, match=r"l3.weight_scale: shape \[1\] does not match target \[\]"):
        r.push({}, scales)


def check_new_tensors_are_followed(base: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Push ``base``, then new tensors of the same names every push: the layout is kept and
    aimed at them, every push carries its own values. Returns the last push's scales."""
    r = Refitter("local", target=target)
    r.push({}, base)
    layout = r._collect._layout
    for step in range(1, 4):
        scales = {k: v * (step + 1) for k, v in base.items()}  # new tensors
        r.push({}, scales)
        assert r._collect._layout is layout  # followed, not rebuilt
        assert all(same_bits(target[k], v) for k, v in scales.items()), step
    for v in scales.values():  # then updated in place: read where they are
        v.add_(1)
    r.push({}, scales)
    assert r._collect._layout is layout and all(same_bits(target[k], v) for k, v in scales.items())
    r.close()
    return scales


def test_new_scale_tensors_every_push_are_followed() -> None:
    """Scales computed anew every push (``amax / 448``): same names, dtypes, devices and ranks
    in other memory."""
    base = many_scales(200)
    check_new_tensors_are_followed(base, {k: torch.zeros_like(v) for k, v in base.items()})


@pytest.mark.parametrize("memory", ["same", "new"])
def test_scales_that_change_are_checked_again(memory: str) -> None:
    """Whether the scales sit where they did or are new tensors, a change of dtype (in place
    too), rank, shape, type or device, or a bad value, is caught by the full checks."""
    base = {**many_scales(60), "l0.channel_scale": torch.full((4,), 0.5)}  # a rank-1 scale is checked on its own
    name = "l3.weight_scale"  # in a run of 0-d float32 scales
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda t: t.to(torch.float64), ResolveError, f"{name}: dtype torch.float64 does not match target torch.float32"),
        (lambda t: t.reshape(1), ResolveError, rf"{name}: shape \[1\] does not match target \[\]"),
        (lambda t: 2.0, PlanError, f"{name}: expected a torch.Tensor"),
        (lambda t: torch.empty((), device="meta"), PlanError, f"{name}: .*meta tensors cannot travel"),
        (lambda t: torch.tensor(-1.0), PlanError, f"{name}: scale has values <= 0"),
        (lambda t: torch.tensor(1 + 2j).conj().imag, PlanError, f"{name}: scale has values <= 0"),  # -2.0, negative bit
    ]
    target = {k: torch.zeros_like(v) for k, v in base.items()}
    r = Refitter("local", target=target)
    for change, error, match in cases:
        scales = base if memory == "same" else {k: v.clone() for k, v in base.items()}
        r.push({}, scales)  # the layout is built, or followed
        kept = scales[name]
        changed = {**scales, name: change(kept)}
        with pytest.raises(error, match=match):
            r.push({}, changed)
    scales = {**base, "l0.channel_scale": torch.full((5,), 0.5)}  # same rank, other shape
    with pytest.raises(ResolveError, match=r"l0.channel_scale: shape \[5\] does not match target \[4\]"):
        r.push({}, scales)
    r.push({}, base)  # and a clean push after them goes through
    assert all(same_bits(target[k], v) for k, v in base.items())


def test_same_memory_as_another_dtype_of_its_size() -> None:
    """``.data = t.data.view(int32)``: same address, same size, other dtype. Whether the layout
    keeps the scales' memory or follows new tensors, the int32 is sent as int32 (and refused by
    the float32 target), never as the layout's float32 (see ``tests/test_scale_views.py``)."""
    name = "l3.weight_scale"
    for follow in (False, True):
        scales = many_scales(40)
        target = {k: torch.zeros_like(v) for k, v in scales.items()}
        r = Refitter("local", target=target)
        r.push({}, scales)
        if follow:  # new tensors: the layout is aimed at them, keeping nothing
            scales = {k: v.clone() for k, v in scales.items()}
            r.push({}, scales)
        scales[name].data = scales[name].data.view(torch.int32)
        with pytest.raises(ResolveError, match=f"{name}: dtype torch.int32 does not match target torch.float32"):
            r.push({}, scales)


def test_subclass_scales_are_read_one_by_one() -> None:
    """A tensor subclass's ops go through its ``__torch_function__``, so its value may not be its
    raw memory: it is validated and packed on its own, never read by address."""
    seen: list[object] = []

    class Tracked(torch.Tensor):
        @classmethod
        def __torch_function__(
            cls, func: Callable[..., Any], types: Iterable[type], args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
        ) -> Any:
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    names = [f"l{i}.weight_scale" for i in range(12)]
    target = {n: torch.zeros(()) for n in names}
    scales = {n: torch.tensor(float(i + 1)) for i, n in enumerate(names)}
    scales[names[5]] = torch.tensor(6.0).as_subclass(Tracked)
    r = Refitter("local", target=target)
    for _ in range(2):  # built, then the others are new tensors
        seen.clear()
        r.push({}, scales)
        assert [float(target[n]) for n in names] == [float(i + 1) for i in range(12)]
        assert seen and 5 in r._collect._layout.singles  # type: ignore[union-attr]
        scales = {n: v.clone() if type(v) is torch.Tensor else v for n, v in scales.items()}
