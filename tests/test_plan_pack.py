"""Planner and packer: layout rules and bit-exact round trips on CPU."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refit.errors import PlanError
from refit.meta import DTYPES, Role, dtype_from_name, dtype_name
from refit.pack import Lazy, pack, unpack
from refit.plan import PlanEntry, plan
from tests.conftest import every_dtype_state, random_tensor, same_bits

pytestmark = pytest.mark.unit


def roundtrip(state: Mapping[str, torch.Tensor | Lazy], bucket_bytes: int, alignment: int = 256, device: str = "cpu", tail_bytes: int = 0) -> dict[str, torch.Tensor]:
    """Plan, pack into buckets on ``device``, unpack and reassemble; returns the received tensors."""
    entries = [PlanEntry(n, tuple(t.shape), t.dtype) for n, t in state.items()]
    m = plan(entries, bucket_bytes=bucket_bytes, alignment=alignment, tail_bytes=tail_bytes)
    assert all(size <= bucket_bytes for size in m.bucket_sizes)
    out: dict[str, torch.Tensor] = {}
    for b, metas in enumerate(m.by_bucket):
        bucket = torch.full((bucket_bytes,), 0xAB, dtype=torch.uint8, device=device)
        pack(bucket, metas, [state[x.name] for x in metas])
        for meta, view in zip(metas, unpack(bucket[: m.bucket_sizes[b]], metas)):
            if meta.is_chunked:
                whole = out.setdefault(meta.name, torch.empty(meta.shape, dtype=meta.dtype, device=device))
                size = whole.element_size()
                whole.view(-1)[meta.start // size : (meta.start + meta.nbytes) // size].copy_(view)
            else:
                out[meta.name] = view.clone()
    return out


def test_dtype_table_is_explicit_and_complete() -> None:
    for name in ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2"):
        assert dtype_from_name(name) is getattr(torch, name)
        assert dtype_name(getattr(torch, name)) == name
    with pytest.raises(PlanError, match="unknown dtype"):
        dtype_from_name("__class__")
    with pytest.raises(PlanError, match="cannot travel"):
        dtype_name(torch.complex64)


def test_every_dtype_roundtrips_bit_exact(gen: torch.Generator) -> None:
    state = every_dtype_state(gen)
    got = roundtrip(state, bucket_bytes=1024)
    assert set(got) == set(state)
    for k, v in state.items():
        assert same_bits(got[k], v), k


@pytest.mark.parametrize("nbytes_delta", [0, 1, 256, 3 * 4096, 3 * 4096 + 5])
def test_bucket_edges_and_chunking(gen: torch.Generator, nbytes_delta: int) -> None:
    bucket = 4096
    n = bucket + nbytes_delta if nbytes_delta < 3 * 4096 else nbytes_delta
    state = {
        "a0": random_tensor((), torch.float32, gen),
        "exact": random_tensor((bucket,), torch.uint8, gen),
        "big": random_tensor((n,), torch.uint8, gen),
        "big16": random_tensor((3 * bucket // 2 + 1,), torch.bfloat16, gen),
        "empty": random_tensor((0, 3), torch.float16, gen),
        "tail": random_tensor((5,), torch.int64, gen),
    }
    got = roundtrip(state, bucket)
    for k, v in state.items():
        assert same_bits(got[k], v), k


def test_layout_rules() -> None:
    entries = [
        PlanEntry("s", (), torch.float32, Role.SCALE),
        PlanEntry("w", (10,), torch.bfloat16),
        PlanEntry("e", (0,), torch.float32),
        PlanEntry("big", (3000,), torch.uint8),
    ]
    m = plan(entries, bucket_bytes=1024, alignment=256)
    s, w, e = m.metas[:3]
    assert (s.shape, s.offset, s.nbytes, s.role) == ((), 0, 4, Role.SCALE)
    assert (w.offset, w.nbytes) == (256, 20)
    assert e.nbytes == 0
    big = [x for x in m.metas if x.name == "big"]
    assert [x.chunk for x in big] == [0, 1, 2, 3] and all(x.chunks == 4 for x in big)
    assert sum(x.nbytes for x in big) == 3000 and all(x.offset % 256 == 0 for x in m.metas)
    assert all(size <= 1024 for size in m.bucket_sizes)
    # deterministic: the same input gives the same digest
    assert plan(entries, bucket_bytes=1024).digest == m.digest
    assert plan(entries, bucket_bytes=2048).digest != m.digest


def test_non_contiguous_inputs_pack_as_their_value(gen: torch.Generator) -> None:
    base = random_tensor((16, 8), torch.float32, gen)
    state = {"t": base.t(), "sl": base[::2, 1:5], "big_t": random_tensor((64, 40), torch.float16, gen).t()}
    got = roundtrip(state, bucket_bytes=2048)
    for k, v in state.items():
        assert same_bits(got[k], v.contiguous()), k


def test_lazy_fills_its_bucket_view() -> None:
    seen = []

    def fill(out: torch.Tensor) -> None:
        seen.append(out.shape)
        out.copy_(torch.arange(12, dtype=torch.float32).reshape(3, 4))

    got = roundtrip({"lz": Lazy((3, 4), torch.float32, fill)}, bucket_bytes=1024)
    assert seen == [torch.Size([3, 4])]
    assert torch.equal(got["lz"], torch.arange(12, dtype=torch.float32).reshape(3, 4))


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([PlanEntry("a", (1,), torch.float32), PlanEntry("a", (1,), torch.float32)], "duplicate name"),
        ([PlanEntry("", (1,), torch.float32)], "non-empty"),
        ([PlanEntry("n", (-1,), torch.float32)], "invalid shape"),
        ([PlanEntry("c", (2,), torch.complex64)], "cannot travel"),
    ],
)
def test_planner_refuses_bad_entries(entries: list[PlanEntry], match: str) -> None:
    with pytest.raises(PlanError, match=match):
        plan(entries, bucket_bytes=1024)


@pytest.mark.parametrize(("bucket_bytes", "alignment", "tail_bytes"), [(1000, 256, 0), (1024, 100, 0), (128, 256, 0), (1024, 8, 0), (1024, 256, 1024), (1024, 256, -1), (1024, 256, True)])
def test_planner_refuses_bad_options(bucket_bytes: int, alignment: int, tail_bytes: int) -> None:
    with pytest.raises(PlanError):
        plan([], bucket_bytes=bucket_bytes, alignment=alignment, tail_bytes=tail_bytes)


def test_tail_bytes_cuts_the_last_bucket_short() -> None:
    mib = 1 << 20
    # Llama-like tail: layers of 100 MiB, then a 1000 MiB head that fits a 1 GiB bucket whole
    entries = [PlanEntry(f"l{i}", (100 * mib,), torch.uint8) for i in range(25)] + [PlanEntry("head", (1000 * mib,), torch.uint8)]
    full = plan(entries, bucket_bytes=1024 * mib)
    cut = plan(entries, bucket_bytes=1024 * mib, tail_bytes=64 * mib)
    assert full.bucket_sizes[-1] == 1000 * mib  # the head alone: its apply overlaps nothing
    assert cut.bucket_sizes[-1] <= 128 * mib and sum(cut.bucket_sizes) == sum(full.bucket_sizes)
    assert cut.num_buckets <= full.num_buckets + 2
    head = [m for m in cut.metas if m.name == "head"]
    assert len(head) > 1 and head[-1].bucket == cut.num_buckets - 1  # chunked: its last piece is short
    # a state shorter than twice the tail is one bucket, as without a tail
    assert plan(entries[:1], bucket_bytes=1024 * mib, tail_bytes=64 * mib).num_buckets == 1


_dtypes = st.sampled_from(sorted(DTYPES))
_shapes = st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None)
@given(
    specs=st.lists(st.tuples(_dtypes, _shapes), min_size=1, max_size=12),
    bucket_kib=st.sampled_from([1, 2, 4]),
    alignment=st.sampled_from([16, 64, 256]),
    tail=st.sampled_from([0, 16, 256, 700]),
    seed=st.integers(0, 2**31),
)
def test_property_random_states_roundtrip(specs: list[tuple[str, tuple[int, ...]]], bucket_kib: int, alignment: int, tail: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    state = {f"t{i}": random_tensor(shape, DTYPES[d], gen) for i, (d, shape) in enumerate(specs)}
    got = roundtrip(state, bucket_bytes=bucket_kib * 1024, alignment=alignment, tail_bytes=tail)
    for k, v in state.items():
        assert same_bits(got[k], v), k
    if tail:  # the last bucket holds at most twice the tail (plus the rounding to alignment)
        m = plan([PlanEntry(n, tuple(t.shape), t.dtype) for n, t in state.items()], bucket_bytes=bucket_kib * 1024, alignment=alignment, tail_bytes=tail)
        assert sum(x.nbytes for x in m.metas if x.bucket == m.num_buckets - 1) <= 2 * tail + alignment
