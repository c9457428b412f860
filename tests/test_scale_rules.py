"""One rule for every scale and amax, whichever argument carried it.

Scales are finite and > 0, amax finite and >= 0, decided by the name (``refit.scales``). The
sender checks what it can (every tensor in ``scales`` and every scale or amax inside ``state``),
every receiver checks every entry by its role or its name before any byte of its bucket is
applied, so a sender that skipped the check, or a value only known at pack time (``Lazy``),
is still refused and never written into a target.
"""

from __future__ import annotations

import doctest
import threading
from typing import Any

import pytest
import torch

from refit import Lazy, PlanError, Refitter, ResolveError, TornStateError, TransportError
from refit import scales as scales_module
from refit import signature as signature_module
from refit.load import Loader
from refit.meta import Role
from refit.plan import PlanEntry, plan
from refit.resolve import TensorsResolver
from refit.scales import amax_to_scale, is_amax, is_quant_state, is_scale
from refit.send import stream
from refit.transports.local import LocalSender
from tests.conftest import same_bits

NAN, INF = float("nan"), float("inf")


def qat_state(n: int = 12) -> dict[str, torch.Tensor]:
    """A QAT / ModelOpt-style ``state_dict()``: weights with their quantizer state inside."""
    state: dict[str, torch.Tensor] = {}
    for i in range(n):
        p = f"model.layers.{i}"
        state[f"{p}.mlp.weight"] = torch.randn(4, 4, generator=torch.Generator().manual_seed(i))
        state[f"{p}.mlp.weight_scale"] = torch.tensor(0.5 + i / 16)
        state[f"{p}.mlp.input_quantizer._amax"] = torch.tensor(3.0 + i)
        state[f"{p}.self_attn.k_scale"] = torch.tensor(0.25 + i / 32)
        state[f"{p}.layer_scale"] = torch.full((4,), -0.5)  # a LayerScale gamma: not a quantization scale
    return state


def zeros(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in state.items()}


# ---------------------------------------------------------------- names


@pytest.mark.unit
@pytest.mark.parametrize(
    ("name", "scale", "amax"),
    [
        ("model.layers.0.self_attn.k_scale", True, False),
        ("model.layers.0.self_attn.attn._v_scale", True, False),
        ("model.layers.0.self_attn.k_cache.scale", True, False),
        ("model.layers.0.mlp.experts.w13_weight_scale", True, False),
        ("model.layers.0.mlp.down_proj.weight_scale_2", True, False),
        ("model.layers.0.mlp.down_proj.weight_scale_inv", True, False),
        ("model.layers.0.mlp.down_proj.input_global_scale", True, False),
        ("model.layers.0.mlp.down_proj.input_quantizer._pre_quant_scale", True, False),
        ("model.layers.0.self_attn.prob_scale", True, False),
        ("model.layers.0.mlp.down_proj.input_quantizer._amax", False, True),
        ("model.layers.0.self_attn.k_bmm_quantizer._amax", False, True),
        ("model.layers.0.mlp.input_amax", False, True),
        ("model.layers.0.layer_scale", False, False),
        ("logit_scale", False, False),
        ("model.layers.0.mlp.down_proj.weight", False, False),
    ],
)
def test_the_name_decides(name: str, scale: bool, amax: bool) -> None:
    assert (is_scale(name), is_amax(name), is_quant_state(name)) == (scale, amax, scale or amax)


# ---------------------------------------------------------------- sender


@pytest.mark.unit
@pytest.mark.parametrize("n", [2, 12], ids=["one by one", "gathered runs"])  # 12 layers: runs of >= 8 0-d scales
def test_bad_scales_inside_state_are_refused_by_the_sender_all_named(n: int) -> None:
    state = qat_state(n)
    target = zeros(state)
    r = Refitter("local", target=target)
    r.push(state)  # clean: accepted, and its layout kept
    bad = {
        "model.layers.1.self_attn.k_scale": (NAN, "scale has non-finite values"),
        "model.layers.0.mlp.input_quantizer._amax": (-1.0, "amax has negative values"),
        "model.layers.1.mlp.weight_scale": (0.0, "scale has values <= 0"),
        "model.layers.0.self_attn.k_scale": (INF, "scale has non-finite values"),
    }
    for name, (value, _) in bad.items():
        state[name].fill_(value)  # in place, as a trainer's quantizer would
    kept = {k: v.clone() for k, v in target.items()}
    with pytest.raises(PlanError) as err:
        r.push(state)
    text = str(err.value)
    assert "nothing was sent" in text
    for name, (_, what) in bad.items():
        assert f"{name}: {what}" in text and "fix its calibration" in text, name
    assert all(same_bits(target[k], v) for k, v in kept.items())
    with pytest.raises(PlanError, match="model.layers.1.self_attn.k_scale: scale has non-finite"):  # a fresh Refitter alike
        Refitter("local", target=target).push(state)


@pytest.mark.unit
def test_zero_amax_and_negative_non_scales_are_accepted() -> None:
    state = qat_state()
    state["model.layers.3.mlp.input_quantizer._amax"].zero_()  # an amax may be 0 (a dead channel)
    target = zeros(state)
    Refitter("local", target=target).push(state)
    assert all(same_bits(target[k], v) for k, v in state.items())  # layer_scale (-0.5) went through too


@pytest.mark.unit
def test_scales_inside_state_are_planned_first_as_scales_and_arrive_exact() -> None:
    state = qat_state()
    target = zeros(state)
    r = Refitter("local", target=target)
    for step in range(3):
        r.push(state)
        m = r.manifest
        assert m is not None
        roles = [meta.role for meta in m.metas]
        n_quant = sum(map(is_quant_state, state))
        assert roles == [Role.SCALE] * n_quant + [Role.WEIGHT] * (len(state) - n_quant)
        assert {meta.name for meta in m.metas[:n_quant]} == {k for k in state if is_quant_state(k)}
        assert all(same_bits(target[k], v) for k, v in state.items()), step
        layout = r._collect._layout
        assert layout is not None and layout.groups  # 0-d scales read as gathered runs
        for k, v in state.items():
            if is_quant_state(k):
                v.mul_(2)
            else:
                v.add_(1)


@pytest.mark.unit
def test_pairs_state_and_duplicates() -> None:
    state = qat_state(2)
    target = zeros(state)
    Refitter("local", target=target).push(list(state.items()))
    assert all(same_bits(target[k], v) for k, v in state.items())
    bad = dict(state)
    bad["model.layers.0.self_attn.k_scale"] = torch.tensor(-2.0)
    with pytest.raises(PlanError, match="model.layers.0.self_attn.k_scale: scale has values <= 0"):
        Refitter("local", target=target).push(iter(bad.items()))
    name = "model.layers.1.self_attn.k_scale"
    with pytest.raises(PlanError, match=f"{name}: appears more than once"):
        Refitter("local", target=target).push(state, {name: torch.tensor(1.0)})
    with pytest.raises(PlanError, match=f"{name}: appears more than once"):
        Refitter("local", target=target).push([*state.items(), (name, torch.tensor(1.0))])


# ---------------------------------------------------------------- receiver


def unchecked_push(loader_or_sender: Any, entries: list[PlanEntry], values: dict[str, Any], bucket_bytes: int = 1 << 20) -> None:
    """What a sender that checks nothing and marks nothing as a scale would send."""
    m = plan(entries, bucket_bytes=bucket_bytes)
    loader_or_sender.handshake(m, 7)
    stream(loader_or_sender, m, values, num_buffers=1)
    loader_or_sender.finish()


@pytest.mark.unit
def test_receiver_checks_scales_by_name_whatever_their_role() -> None:
    """A sender that marks every entry as a weight: runs of 0-d scales, single scales and an
    amax are checked by name, every bad one is named, nothing of the bucket is applied."""
    state = qat_state(12)
    state["model.layers.0.mlp.big_weight_scale"] = torch.full((100,), 0.5)  # chunked over 256-byte buckets below
    for name, value in [
        ("model.layers.2.self_attn.k_scale", NAN),
        ("model.layers.5.mlp.weight_scale", -1.0),
        ("model.layers.7.mlp.input_quantizer._amax", -INF),
    ]:
        state[name] = torch.tensor(value)
    state["model.layers.0.mlp.big_weight_scale"][80] = 0.0  # in its second chunk
    bad = ["model.layers.2.self_attn.k_scale", "model.layers.5.mlp.weight_scale", "model.layers.7.mlp.input_quantizer._amax"]
    entries = [PlanEntry(k, tuple(v.shape), v.dtype, Role.WEIGHT) for k, v in sorted(state.items(), key=lambda kv: not is_quant_state(kv[0]))]
    for bucket_bytes in (1 << 20, 256):
        target = zeros(state)
        sender = LocalSender(target)
        with pytest.raises(ResolveError) as err:
            unchecked_push(sender, entries, state, bucket_bytes)
        text = str(err.value)
        if bucket_bytes == 1 << 20:  # everything in one bucket: every bad entry named at once
            for name in (
                "layers.2.self_attn.k_scale: scale has non-finite",
                "layers.5.mlp.weight_scale: scale has values <= 0",
                "layers.7.mlp.input_quantizer._amax: amax has non-finite",
            ):
                assert name in text, name
            assert "big_weight_scale: scale has values <= 0" in text
        if bucket_bytes == 1 << 20:
            assert all(not v.any() for v in target.values()) and not sender.loader.torn  # nothing applied
        else:  # one tensor per bucket: earlier buckets were applied, the first bad one never
            assert sender.loader.torn and not target[bad[0]].any() and float(target["model.layers.0.mlp.big_weight_scale"][80]) == 0.0


@pytest.mark.unit
def test_a_bad_scale_in_a_later_bucket_is_never_written() -> None:
    """Values are known bucket by bucket: when the scales span buckets, those of earlier
    buckets may be applied (the target is then torn and its version kept), the bad one never."""
    names = [f"model.layers.{i}.self_attn.k_scale" for i in range(40)]
    target = {n: torch.ones(()) for n in names}
    values = {n: torch.tensor(2.0) for n in names}
    values[names[-1]] = torch.tensor(-3.0)
    loader = Loader(TensorsResolver(target))
    sender = LocalSender(loader)
    with pytest.raises(ResolveError, match=f"{names[-1]}: scale has values <= 0"):
        unchecked_push(sender, [PlanEntry(n, (), torch.float32) for n in names], values, bucket_bytes=256 * 16)
    assert float(target[names[-1]]) == 1.0 and float(target[names[0]]) == 2.0
    assert loader.torn and loader.version == 0
    with pytest.raises(TornStateError):
        loader.check_serving()


@pytest.mark.unit
def test_a_lazy_scale_in_state_is_checked_by_the_receiver_before_any_weight() -> None:
    state: dict[str, Any] = {"w": torch.ones(4), "model.layers.0.self_attn.k_scale": Lazy((), torch.float32, lambda out: out.fill_(-1.0))}
    target = {"w": torch.zeros(4), "model.layers.0.self_attn.k_scale": torch.ones(())}
    r = Refitter("local", target=target, bucket_bytes=256)  # one tensor per bucket
    with pytest.raises(ResolveError, match="model.layers.0.self_attn.k_scale: scale has values <= 0"):
        r.push(state)
    assert r.manifest is not None and r.manifest.metas[0].name == "model.layers.0.self_attn.k_scale"
    assert r.manifest.metas[0].role is Role.SCALE
    assert float(target["model.layers.0.self_attn.k_scale"]) == 1.0 and not target["w"].any()
    assert not r.sender.loader.torn  # type: ignore[attr-defined]


# ---------------------------------------------------------------- amax -> scale


@pytest.mark.unit
def test_amax_to_scale() -> None:
    assert float(amax_to_scale(torch.tensor(448.0))) == 1.0
    assert float(amax_to_scale(torch.tensor(57344.0), torch.float8_e5m2)) == 1.0
    amax = torch.tensor([0.0, 224.0, 896.0], dtype=torch.bfloat16)
    scale = amax_to_scale(amax)
    assert scale.dtype == torch.bfloat16 and scale.tolist() == [0.0, 0.5, 2.0]
    assert not amax.requires_grad and amax.tolist() == [0.0, 224.0, 896.0]  # the input is left alone
    for bad in (torch.float8_e4m3fnuz, torch.float32, torch.int8):
        with pytest.raises(PlanError, match="cache_dtype must be torch.float8_e4m3fn or torch.float8_e5m2"):
            amax_to_scale(torch.tensor(1.0), bad)
    for bad_amax in (torch.tensor(3), 3.0):
        with pytest.raises(PlanError, match="amax must be a floating-point tensor"):
            amax_to_scale(bad_amax)  # type: ignore[arg-type]


@pytest.mark.unit
@pytest.mark.parametrize("module", [scales_module, signature_module], ids=lambda m: m.__name__)
def test_docstring_examples(module: Any) -> None:
    result = doctest.testmod(module, extraglobs={"torch": torch})
    assert result.attempted and not result.failed


# ---------------------------------------------------------------- over zmq


class ThreadReceiver:
    """A zmq RefitReceiver serving pushes in a thread; what each receive gave is kept."""

    def __init__(self, target: dict[str, torch.Tensor]) -> None:
        from refit.receiver import RefitReceiver

        self.rx = RefitReceiver(target, "zmq", name="rx0")
        self.results: list[Any] = []
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        def run() -> None:
            try:
                self.results.append(self.rx.receive(timeout=30))
            except Exception as exc:  # kept for the test to assert on
                self.results.append(exc)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def join(self) -> Any:
        assert self._thread is not None
        self._thread.join(timeout=60)
        assert not self._thread.is_alive()
        return self.results[-1]


@pytest.mark.integration
def test_zmq_scales_inside_state_checked_on_both_sides() -> None:
    state = qat_state()
    target = zeros(state)
    rx = ThreadReceiver(target)
    try:
        address = rx.rx.info()["address"]
        with Refitter("zmq", peers=[address], timeout=20) as r:
            rx.start()  # a good push of a state with its scales inside: bit for bit
            r.push(state, version=1)
            assert rx.join().version == 1 and all(same_bits(target[k], v) for k, v in state.items())

            state["model.layers.4.mlp.input_quantizer._amax"].fill_(-1.0)  # the sender refuses: nothing sent
            with pytest.raises(PlanError, match="model.layers.4.mlp.input_quantizer._amax: amax has negative values"):
                r.push(state, version=2)
            state["model.layers.4.mlp.input_quantizer._amax"].fill_(1.0)

        from refit.transports.zmq import ZmqSender

        kept = {k: v.clone() for k, v in target.items()}
        state["model.layers.6.self_attn.k_scale"].fill_(NAN)  # a sender that checks and marks nothing
        rx.start()
        sender = ZmqSender([address], timeout=20)
        try:
            with pytest.raises(TransportError, match="model.layers.6.self_attn.k_scale: scale has non-finite"):
                unchecked_push(sender, [PlanEntry(k, tuple(v.shape), v.dtype, Role.WEIGHT) for k, v in state.items()], state)
        finally:
            sender.close()
        got = rx.join()
        assert isinstance(got, ResolveError) and "model.layers.6.self_attn.k_scale" in str(got)
        assert not rx.rx.torn and rx.rx.version == 1
        assert all(same_bits(target[k], v) for k, v in kept.items())
    finally:
        rx.rx.close()


def test_a_lazy_scale_in_scales_is_planned_as_a_scale_and_checked_by_the_receiver() -> None:
    """scales= may hold a refit.Lazy (it used to be refused as 'got Lazy'): it is written into
    its bucket view, and a receiver checks its value as a scale's whatever its name."""

    target = {"w": torch.zeros(2), "k_scale": torch.zeros(()), "foo": torch.zeros(())}
    with Refitter("local", target=target) as r:
        r.push({"w": torch.ones(2)}, {"k_scale": Lazy((), torch.float32, lambda o: o.fill_(0.5)), "foo": Lazy((), torch.float32, lambda o: o.fill_(2.0))})
        assert (target["k_scale"].item(), target["foo"].item()) == (0.5, 2.0)
        with pytest.raises(ResolveError, match="foo: scale has values <= 0"):
            r.push({"w": torch.full((2,), 3.0)}, {"foo": Lazy((), torch.float32, lambda o: o.fill_(-1.0))})
        assert torch.equal(target["w"], torch.ones(2))  # nothing of the refused bucket applied
        with pytest.raises(PlanError, match="foo: appears more than once"):
            r.push({"w": torch.ones(2), "foo": torch.ones(())}, {"foo": Lazy((), torch.float32, lambda o: o.fill_(1.0))})
