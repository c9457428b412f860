"""The public API over the in-process transport: strict loading, refusals, torn state."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import refit
from refit import Lazy, PlanError, Refitter, ResolveError
from refit.load import Loader
from refit.meta import Manifest
from refit.plan import PlanEntry, plan
from refit.resolve import TensorsResolver
from refit.transports.local import LocalSender
from tests.conftest import every_dtype_state, same_bits

pytestmark = pytest.mark.unit


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 32)
        self.out = torch.nn.Linear(32, 8, bias=False)
        self.register_buffer("k_scale", torch.tensor(1.0))
        self.register_buffer("amax", torch.zeros(8))


def snapshot(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def new_weights(m: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in m.state_dict().items() if k not in ("k_scale", "amax")}


def test_import_pulls_no_optional_backend() -> None:
    code = "import sys, refit; bad = [m for m in sys.modules if m.split('.')[0] in ('zmq', 'cupy', 'ray', 'vllm')]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_push_weights_and_scales_bit_exact() -> None:
    m = Tiny()
    w = new_weights(m)
    scales = {"k_scale": torch.tensor(0.25), "amax": torch.rand(8)}
    with Refitter("local", target=m, bucket_bytes=1024) as r:
        rep = r.push(w, scales)
    for k, v in {**w, **scales}.items():
        assert same_bits(m.state_dict()[k], v), k
    assert rep.version == 1 and rep.tensors == 5 and rep.receivers[0].loaded == 5
    assert rep.bytes == sum(v.numel() * v.element_size() for v in {**w, **scales}.values())


def test_every_dtype_into_dict_target(gen: torch.Generator) -> None:
    src = every_dtype_state(gen)
    dst = {k: torch.empty_like(v) for k, v in src.items()}
    Refitter("local", target=dst, bucket_bytes=512).push(iter(src.items()))
    for k, v in src.items():
        assert same_bits(dst[k], v), k


def test_refusal_lists_every_problem_and_loads_nothing() -> None:
    m = Tiny()
    before = snapshot(m)
    w = new_weights(m)
    w["proj.wieght"] = w.pop("proj.weight")
    w["out.weight"] = torch.zeros(8, 33)
    w["proj.bias"] = w["proj.bias"].double()
    with pytest.raises(ResolveError) as err:
        Refitter("local", target=m, bucket_bytes=256).push(w, {"no.such.k_scale": torch.tensor(2.0)})
    msg = str(err.value)
    assert "proj.wieght: no such parameter or buffer (did you mean 'proj.weight'?)" in msg
    assert "out.weight: shape [8, 33]" in msg and "proj.bias: dtype torch.float64" in msg and "no.such.k_scale" in msg
    assert len(err.value.problems) == 4
    for k, v in before.items():
        assert same_bits(m.state_dict()[k], v), k


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_invalid_scales_are_refused_before_sending(bad: float) -> None:
    m = Tiny()
    before = snapshot(m)
    with pytest.raises(PlanError, match="k_scale"):
        Refitter("local", target=m).push(new_weights(m), {"k_scale": torch.tensor(bad)})
    for k, v in before.items():
        assert same_bits(m.state_dict()[k], v), k


def test_amax_may_be_zero_but_not_negative() -> None:
    m = Tiny()
    Refitter("local", target=m).push({}, {"amax": torch.zeros(8)})
    with pytest.raises(PlanError, match="amax has negative"):
        Refitter("local", target=m).push({}, {"amax": -torch.ones(8)})


@pytest.mark.parametrize(
    ("state", "scales", "match"),
    [
        ({"a": [1, 2]}, None, "expected a torch.Tensor"),
        ({"a": torch.zeros(2)}, {"a": torch.ones(())}, "more than once"),
        ({"a": torch.zeros(2, dtype=torch.complex64)}, None, "cannot travel"),
        ({"a": torch.zeros(2).to_sparse()}, None, "dense"),
        ([("a", torch.zeros(1), 3)], None, "pairs"),
        ({}, [torch.ones(())], "mapping"),
    ],
)
def test_input_validation(state: object, scales: object, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        Refitter("local", target={"a": torch.zeros(2)}).push(state, scales)  # type: ignore[arg-type]


def test_module_instead_of_state_is_a_clear_error() -> None:
    with pytest.raises(PlanError, match="state_dict"):
        Refitter("local", target=Tiny()).push(Tiny())  # type: ignore[arg-type]


def test_require_complete() -> None:
    m = Tiny()
    with pytest.raises(ResolveError, match="out.weight: missing"):
        Refitter("local", target=m, require_complete=True).push({"proj.weight": torch.zeros(32, 16)})


def test_lazy_sources_chunked_and_not() -> None:
    dst = {"a": torch.zeros(4, 4), "b": torch.zeros(3000)}
    state = {
        "a": Lazy((4, 4), torch.float32, lambda out: out.fill_(3.0)),
        "b": Lazy((3000,), torch.float32, lambda out: out.copy_(torch.arange(3000.0))),
    }
    Refitter("local", target=dst, bucket_bytes=1024).push(state)
    assert torch.equal(dst["a"], torch.full((4, 4), 3.0)) and torch.equal(dst["b"], torch.arange(3000.0))


def test_torn_state_when_stream_breaks_midway() -> None:
    dst = {f"t{i}": torch.zeros(64) for i in range(4)}
    loader = Loader(TensorsResolver(dst), name="rx")
    m = plan([PlanEntry(k, (64,), torch.float32) for k in dst], bucket_bytes=256)
    assert loader.prepare(m, 5) == []
    loader.apply(0, torch.ones(256, dtype=torch.uint8))
    loader.abort("sender died")
    assert loader.torn and loader.version == 0
    with pytest.raises(refit.TornStateError, match="last committed version 0"):
        loader.check_serving()
    # a complete push clears it
    Refitter("local", target=loader).push({k: torch.ones(64) for k in dst}, version=6)
    assert not loader.torn and loader.version == 6
    loader.check_serving()


def test_out_of_order_bucket_is_refused() -> None:
    dst = {"a": torch.zeros(64), "b": torch.zeros(64)}
    loader = Loader(TensorsResolver(dst))
    m = plan([PlanEntry(k, (64,), torch.float32) for k in dst], bucket_bytes=256)
    loader.prepare(m, 1)
    with pytest.raises(ResolveError, match="out of order"):
        loader.apply(1, torch.zeros(256, dtype=torch.uint8))


def test_unchanged_layout_reuses_the_manifest() -> None:
    m = Tiny()
    r = Refitter("local", target=m)
    r.push(new_weights(m, 1))
    first = r._last
    r.push(new_weights(m, 2))
    assert r._last is first
    assert same_bits(m.state_dict()["proj.weight"], new_weights(m, 2)["proj.weight"])


def test_unknown_transport_and_options() -> None:
    with pytest.raises(refit.RefitError, match="unknown transport"):
        Refitter("carrier-pigeon")
    with pytest.raises(refit.RefitError, match="num_buffers"):
        Refitter("local", target={}, num_buffers=0)
    with pytest.raises(refit.RefitError, match="needs target"):
        Refitter("local")


def test_parameters_that_require_grad_push_as_is() -> None:
    src, dst = torch.nn.Linear(300, 300), torch.nn.Linear(300, 300)
    Refitter("local", target=dst, bucket_bytes=65536).push(dict(src.named_parameters()))  # chunked weight
    assert same_bits(dst.weight.data, src.weight.data) and same_bits(dst.bias.data, src.bias.data)
    assert dst.weight.requires_grad and dst.weight.grad_fn is None


def test_same_tensors_updated_in_place_arrive_each_push() -> None:
    """The second push reuses the first one's validation and copy plans; the values are new."""
    state = {"a": torch.randn(64, 64), "b": torch.randn(3000), "c": torch.randn(5)}
    scales = {f"s{i}": torch.tensor(1.0 + i) for i in range(12)}
    target = {k: torch.zeros_like(v) for k, v in {**state, **scales}.items()}
    target["d"] = torch.zeros(2)
    r = Refitter("local", target=target, bucket_bytes=4096)
    for step in range(3):
        for v in state.values():
            v.add_(1.0)
        for v in scales.values():
            v.mul_(2.0)
        r.push(state, scales, version=step + 1)
        for k, v in {**state, **scales}.items():
            assert same_bits(target[k], v), (step, k)
    state["d"] = torch.ones(2)  # a new tensor: everything is re-checked
    r.push(state, scales)
    assert same_bits(target["d"], state["d"])


def test_refitter_keeps_no_pushed_tensor_alive() -> None:
    """Temporary tensors (gathered shards, converted copies) must be freed after their push."""
    import gc
    import weakref

    target = {"w": torch.zeros(256, 256), **{f"s{i}": torch.zeros(()) for i in range(10)}}
    r = Refitter("local", target=target, bucket_bytes=1 << 16)
    w = torch.randn(256, 256)
    scales = {f"s{i}": torch.tensor(1.0 + i) for i in range(10)}
    refs = [weakref.ref(w), *(weakref.ref(v) for v in scales.values())]
    r.push({"w": w}, scales)
    del w, scales
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_tensor_changed_in_place_is_checked_again() -> None:
    """The validation cache is keyed on tensor identity; a dtype or shape changed in place
    since the last push must be seen (and refused here), not copied as raw bits."""
    p = torch.nn.Parameter(torch.ones(4, 4))
    target = {"p": torch.zeros(4, 4)}
    r = Refitter("local", target=target)
    r.push({"p": p})
    p.data = p.data.to(torch.bfloat16)  # same object, new dtype
    with pytest.raises(ResolveError, match="dtype torch.bfloat16"):
        r.push({"p": p})
    p.data = torch.full((2, 8), 2.5)  # same object, same numel, new shape
    with pytest.raises(ResolveError, match=r"shape \[2, 8\]"):
        r.push({"p": p})
    assert same_bits(target["p"], torch.ones(4, 4))


def test_torn_until_the_broken_tensors_are_pushed_again() -> None:
    dst = {"a": torch.zeros(64), "b": torch.zeros(64), "s": torch.ones(())}
    loader = Loader(TensorsResolver(dst), name="rx")
    m = plan([PlanEntry(k, (64,), torch.float32) for k in ("a", "b")], bucket_bytes=256)
    assert loader.prepare(m, 1) == []
    loader.apply(0, torch.ones(256, dtype=torch.uint8))  # "a" written, "b" not
    loader.abort("sender died")
    Refitter("local", target=loader).push({}, {"s": torch.tensor(2.0)}, version=2)  # does not touch "a"
    assert loader.torn and loader.version == 2
    with pytest.raises(refit.TornStateError, match="possibly mixed: a"):
        loader.check_serving()
    Refitter("local", target=loader).push({"a": torch.ones(64)}, version=3)
    assert not loader.torn
    loader.check_serving()


def test_chunked_tensor_needs_a_contiguous_target() -> None:
    from refit.meta import TensorMeta
    from refit.resolve import Placement, Resolution

    dest = torch.zeros(64, 4).t()

    class Strided(TensorsResolver):
        def resolve(self, meta: TensorMeta) -> Resolution:
            return Resolution(Placement.LOCAL, dest=dest, key=meta.name)

    with pytest.raises(ResolveError, match="not contiguous"):
        Refitter("local", target=Loader(Strided({})), bucket_bytes=256).push({"w": torch.ones(4, 64)})


def test_short_bucket_is_a_wire_error() -> None:
    dst = {"a": torch.zeros(64)}
    loader = Loader(TensorsResolver(dst))
    loader.prepare(plan([PlanEntry("a", (64,), torch.float32)], bucket_bytes=1024), 1)
    with pytest.raises(refit.WireError, match="bucket 0 holds 25 bytes"):
        loader.apply(0, torch.zeros(25, dtype=torch.uint8))
    assert not loader.torn and torch.equal(dst["a"], torch.zeros(64))


def test_version_must_fit_the_wire() -> None:
    with pytest.raises(refit.RefitError, match="2\\*\\*63"):
        Refitter("local", target={"a": torch.zeros(1)}).push({"a": torch.ones(1)}, version=2**63)


class _Recording(LocalSender):
    """A local sender that records the order of the calls a push makes."""

    def __init__(self, target: dict[str, torch.Tensor]) -> None:
        super().__init__(target)
        self.calls: list[str] = []

    def stage(self, manifest: Manifest) -> None:
        self.calls.append("stage")

    def handshake(self, manifest: Manifest, version: int) -> None:
        self.calls.append("handshake")
        super().handshake(manifest, version)

    def send(self, index: int, slot: int, nbytes: int, checksum: bytes | None = None) -> None:
        self.calls.append(f"send {index}")
        super().send(index, slot, nbytes, checksum=checksum)

    def abort(self, reason: str) -> None:
        self.calls.append("abort")
        super().abort(reason)


def test_first_bucket_is_packed_before_the_handshake_and_sent_after_it() -> None:
    """Packing bucket 0 overlaps the handshake; nothing is sent before the verdict."""
    target = {f"w{i}": torch.zeros(256) for i in range(4)}
    sender = _Recording(target)
    filled: list[int] = []

    def fill(out: torch.Tensor) -> None:
        filled.append(len(sender.calls))
        out.fill_(3.0)

    state: dict[str, torch.Tensor | Lazy] = {"w0": Lazy((256,), torch.float32, fill), **{f"w{i}": torch.ones(256) for i in range(1, 4)}}
    Refitter(sender, bucket_bytes=1024).push(state)
    assert sender.calls == ["stage", "handshake", "send 0", "send 1", "send 2", "send 3"]
    assert filled == [1]  # bucket 0's Lazy was filled after stage, before the handshake
    assert float(target["w0"][0]) == 3.0 and float(target["w3"][0]) == 1.0


def test_refused_after_packing_bucket_zero_sends_nothing_and_aborts_nothing() -> None:
    target = {"w": torch.zeros(256)}
    sender = _Recording(target)
    with pytest.raises(ResolveError, match="nope"):
        Refitter(sender, bucket_bytes=1024).push({"w": torch.ones(256), "nope": torch.ones(256)})
    assert sender.calls == ["stage", "handshake"]
    assert not sender.loader.torn and float(target["w"].abs().sum()) == 0.0


def test_pipeline_stage_loads_its_tensors_and_consumes_the_other_stages() -> None:
    """A plain torch pipeline stage: its own names load, the other stage's are remote, and a
    name neither stage owns refuses the push with nothing loaded."""
    full = {f"layers.{i}.w": torch.full((4,), float(i + 1)) for i in range(4)}
    stages = [{k: torch.zeros(4) for k in list(full)[:2]}, {k: torch.zeros(4) for k in list(full)[2:]}]
    for mine, other in ((stages[0], stages[1]), (stages[1], stages[0])):
        resolver = TensorsResolver(mine, remote=other.__contains__)
        with Refitter("local", target=resolver) as r:
            report = r.push(full).receivers[0]
            assert (report.loaded, report.remote) == (2, 2)
            assert all(torch.equal(mine[k], full[k]) for k in mine)
            before = {k: v.clone() for k, v in mine.items()}
            with pytest.raises(ResolveError, match="layers.9.w: no such parameter"):
                r.push({**{k: v + 1 for k, v in full.items()}, "layers.9.w": torch.ones(4)})
            assert all(torch.equal(mine[k], before[k]) for k in mine)


@pytest.mark.parametrize("copied", [True, False])
def test_chunked_tensors_assemble_in_a_kept_buffer_only_when_loads_are_copied(copied: bool) -> None:
    """A tensor larger than a bucket is assembled whole before its ``load``; a resolver that
    copies what it loads (``loads_copied``, as vLLM's) lets the loader keep that buffer for the
    next push (no fresh pages each push); any other gets a new one. Values land either way."""
    from refit.meta import TensorMeta
    from refit.resolve import Placement, Resolution

    got: list[tuple[torch.Tensor, int]] = []  # w as loaded, and where it was assembled

    class Copying(TensorsResolver):
        loads_copied = copied

        def resolve(self, meta: TensorMeta) -> Resolution:
            if meta.name == "w":
                return Resolution(Placement.LOCAL, load=lambda t: got.append((t.clone(), t.data_ptr())), key=meta.name)
            return Resolution(Placement.LOCAL, load=lambda t: None, key=meta.name)

    loader = Loader(Copying({}))
    with Refitter("local", target=loader, bucket_bytes=256) as r:
        for seed in range(3):
            w = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed))
            r.push({"w": w, "b": torch.ones(3)})
            assert torch.equal(got[-1][0], w) and got[-1][0].shape == (4, 64)
    assert len(got) == 3
    assert len({p for _, p in got}) == 1 if copied else not loader._wholes
    # a push of the same layout that breaks after w's first chunk was assembled: the next one heals
    kept = loader._wholes.get("w")
    assert (kept is not None) == copied
    m = plan([PlanEntry("w", (4, 64), torch.float32), PlanEntry("b", (3,), torch.float32)], bucket_bytes=256)
    assert loader.prepare(m, 10) == []
    loader.apply(0, torch.full((256,), 0xFF, dtype=torch.uint8))
    loader.abort("sender died")
    w = torch.randn(4, 64)
    with Refitter("local", target=loader, bucket_bytes=256) as r:
        r.push({"w": w, "b": torch.ones(3)}, version=11)
    assert torch.equal(got[-1][0], w) and not loader.torn
    assert loader._wholes.get("w") is kept  # the same layout all along: the one kept buffer (None if not copied)
    with Refitter("local", target=loader, bucket_bytes=256) as r2:
        r2.push({"w": torch.zeros(2, 64)})  # a new layout: the kept buffer goes with the old one
    assert not loader._wholes or tuple(loader._wholes["w"].shape) == (2, 64)
