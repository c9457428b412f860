"""KV-cache scales calibrated in the trainer: hooks, max over batches, refusals, push."""

from __future__ import annotations

import pytest
import torch

from refit import PlanError, Refitter
from refit.kv_calibration import KVCalibrator, kv_scales
from refit.scales import amax_to_scale
from tests.conftest import same_bits

pytestmark = pytest.mark.unit


class Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(8, 8) for _ in range(3))
        self.register_buffer("k_scale", torch.tensor(1.0))
        self.register_buffer("v_scale", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x) + self.k_proj(x) + self.v_proj(x)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Module()
    m.model = torch.nn.Module()
    m.model.layers = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
    for layer in m.model.layers:
        layer.self_attn = Attention()
    return m


def attentions(m: torch.nn.Module) -> list[Attention]:
    """Each layer's attention in layer order, typed (``m.model.layers[i].self_attn`` is not)."""
    return [a for a in m.modules() if isinstance(a, Attention)]


def run(m: torch.nn.Module, x: torch.Tensor) -> None:
    for attn in attentions(m):
        x = attn(x)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_scales_are_the_max_over_the_batch_and_land_in_the_engine(cache_dtype: torch.dtype) -> None:
    m = model()
    batches = [torch.randn(4, 8), 3 * torch.randn(4, 8)]
    expected: dict[str, float] = {}
    with torch.no_grad():
        for x in batches:  # the reference: the same forwards, amax taken by hand
            h = x
            for i, attn in enumerate(attentions(m)):
                for kind, proj in (("k", attn.k_proj), ("v", attn.v_proj)):
                    name = f"model.layers.{i}.self_attn.{kind}_scale"
                    expected[name] = max(expected.get(name, 0.0), float(proj(h).abs().amax()))
                h = attn(h)
    with KVCalibrator(m) as cal, torch.no_grad():
        for x in batches:
            run(m, x)
    scales = cal.scales(cache_dtype)
    assert sorted(scales) == sorted(expected)
    for name, s in scales.items():
        assert same_bits(s, amax_to_scale(torch.tensor(expected[name]), cache_dtype)), name
    engine = model()
    Refitter("local", target=engine).push({}, scales)
    for name, s in scales.items():
        assert same_bits(engine.get_buffer(name), s), name
    run(m, torch.full((1, 8), 1e6))  # hooks are gone: nothing changes after the block
    assert cal.scales(cache_dtype) == scales


def test_queries_on_request() -> None:
    m = model()
    with KVCalibrator(m, queries=("q_proj",)) as cal, torch.no_grad():
        run(m, torch.randn(2, 8))
    assert "model.layers.1.self_attn.q_scale" in cal.scales() and len(cal.scales()) == 6


def test_bad_amax_refused_with_every_name() -> None:
    m = model()
    with KVCalibrator(m) as cal, torch.no_grad():
        attentions(m)[0](torch.full((1, 8), float("nan")))  # layer 0: NaN; layer 1 never runs
    with pytest.raises(PlanError) as err:
        cal.scales()
    msg = str(err.value)
    for name in ("model.layers.0.self_attn.k_scale", "model.layers.0.self_attn.v_scale"):
        assert f"{name}: amax is nan (NaN or Inf)" in msg
    for name in ("model.layers.1.self_attn.k_scale", "model.layers.1.self_attn.v_scale"):
        assert f"{name}: amax is 0.0 (zero: no calibration data reached it" in msg
    with pytest.raises(PlanError) as err:
        kv_scales({"a.k_scale": torch.tensor(-1.0), "a.v_scale": torch.tensor(float("inf")), "b.k_scale": torch.tensor(2.0)})
    assert "a.k_scale: amax is -1.0 (negative)" in str(err.value) and "a.v_scale: amax is inf (NaN or Inf)" in str(err.value)
    assert "b.k_scale" not in str(err.value)


def test_nothing_to_hook_is_a_clear_error() -> None:
    with pytest.raises(PlanError, match=r"no module named \['key'\] for k_scale"):
        KVCalibrator(model(), keys=("key",))
