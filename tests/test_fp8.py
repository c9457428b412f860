"""FP8 on push: numerics against float64 and a naive reference, zeros, NaN/Inf refusals, and
round trips through Refitter("local") bit-exact against calling the quantizer directly."""

from __future__ import annotations

import math

import pytest
import torch

import refit.fp8 as fp8
from refit import Lazy, PlanError, Refitter
from refit.fp8 import BLOCK_AMAX_FLOOR, FP8, FP8_MAX, TENSOR_SCALE_FLOOR, fp8_stream, is_linear_weight, quantize
from refit.shapes import SHAPES, make_state
from tests.conftest import same_bits

pytestmark = pytest.mark.unit

SHAPES_2D = [(1, 1), (128, 128), (300, 200), (129, 257), (256, 640)]


def weight(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[:: max(1, w.numel() // 7)] *= 40  # outliers, so blocks get different scales
    return w.to(dtype)


def naive_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-tensor rule written out plainly."""
    amax = w.abs().max().float()
    scale = torch.maximum(amax / torch.tensor(FP8_MAX), torch.tensor(TENSOR_SCALE_FLOOR))
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def naive_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block rule written out plainly: one 128x128 block at a time."""
    m, n = w.shape
    q = torch.empty(m, n, dtype=FP8)
    s = torch.empty(math.ceil(m / 128), math.ceil(n / 128))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            s[i, j] = blk.abs().float().max().clamp(min=BLOCK_AMAX_FLOOR) / FP8_MAX
            q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (blk.float() * (1.0 / s[i, j])).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, s


def dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    d = q.double()
    if s.dim() == 0:
        return d * s.double()
    full = s.double().repeat_interleave(128, 0).repeat_interleave(128, 1)
    return d * full[: q.shape[0], : q.shape[1]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES_2D)
def test_equals_naive_reference_and_float64_bounds(shape: tuple[int, int], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8, "_ROWS_ELEMS", 4096)  # many row slabs: slabbing must not change a bit
    w = weight(shape, dtype)
    for scheme, naive in (("tensor", naive_tensor), ("block", naive_blocks)):
        q, s = quantize(w, scheme)
        nq, ns = naive(w)
        assert same_bits(q, nq) and same_bits(s, ns), scheme
        # float64: e4m3 keeps 3 mantissa bits, so round-to-nearest is within 2^-4 relative for
        # normal values and 2^-10 * scale absolute below the smallest normal (2^-6 * scale)
        w64, d = w.double(), dequant(q, s)
        scale = s.double() if s.dim() == 0 else dequant(torch.ones_like(q, dtype=torch.float64).to(FP8), s)
        bound = torch.maximum(w64.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
        assert bool(((d - w64).abs() <= bound).all()), scheme


def test_measured_relative_error() -> None:
    """The figures quoted in docs/trainer.md (4096 x 4096 bf16, N(0, 0.02) with outliers)."""
    w = weight((4096, 4096), torch.bfloat16, seed=3)
    w64 = w.double()
    errs = {}
    for scheme in ("tensor", "block"):
        d = dequant(*quantize(w, scheme))
        errs[scheme] = float((d - w64).norm() / w64.norm())
    print(f"relative error (Frobenius) of dequantized weights: {errs}")
    assert errs["block"] < errs["tensor"] < 0.04 and errs["block"] < 0.03


def test_zeros_keep_a_positive_scale() -> None:
    q, s = quantize(torch.zeros(4, 4, dtype=torch.bfloat16))
    assert float(s) == float(torch.tensor(TENSOR_SCALE_FLOOR)) and float(s) > 0 and not q.float().any()
    w = torch.zeros(256, 256)
    w[200, 200] = 448.0  # one block non-zero, three all-zero
    q, s = quantize(w, "block")
    floor = float(torch.tensor(BLOCK_AMAX_FLOOR) / FP8_MAX)  # float32 arithmetic, as the quantizer's
    assert s.tolist() == [[floor, floor], [floor, 1.0]]
    assert float(q[200, 200].float()) == 448.0 and int(q.float().count_nonzero()) == 1


def test_names_and_default_selection() -> None:
    assert is_linear_weight("model.layers.3.mlp.down_proj.weight", (8, 4))
    assert not is_linear_weight("model.layers.3.mlp.down_proj.bias", (8,))
    assert not is_linear_weight("model.embed_tokens.weight", (8, 4)) and not is_linear_weight("lm_head.weight", (8, 4))
    state = {"m.q_proj.weight": torch.randn(300, 130), "m.q_proj.bias": torch.randn(300), "m.norm.weight": torch.ones(130)}
    got = dict(fp8_stream(state.items(), scheme="block"))
    assert list(got) == ["m.q_proj.weight", "m.q_proj.weight_scale_inv", "m.q_proj.bias", "m.norm.weight"]
    assert got["m.q_proj.weight_scale_inv"].shape == (3, 2) and got["m.q_proj.bias"] is state["m.q_proj.bias"]


def test_bad_selection_lists_every_name() -> None:
    state = {"a.weight": torch.zeros(4, dtype=torch.int32), "b.weight": torch.zeros(2, 3, 4), "c.bias": torch.zeros(3)}
    with pytest.raises(PlanError) as err:
        fp8_stream(state.items(), scheme="block", select=lambda n, s: True)
    msg = str(err.value)
    assert "a.weight: only floating-point" in msg and "b.weight: block FP8 needs a 2-D weight" in msg and "c.bias: only" in msg
    with pytest.raises(ValueError, match="'rows'"):
        fp8_stream(state.items(), scheme="rows")


def llama_state() -> dict[str, torch.Tensor]:
    state, _ = make_state(SHAPES["tiny"], dtype=torch.bfloat16)
    return state


def target_for(state: dict[str, torch.Tensor], scheme: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, v in state.items():
        if is_linear_weight(name, tuple(v.shape)):
            q, s = quantize(v, scheme)
            out[name], out[name + ("_scale" if scheme == "tensor" else "_scale_inv")] = torch.zeros_like(q), torch.zeros_like(s)
        else:
            out[name] = torch.zeros_like(v)
    return out


@pytest.mark.parametrize("scheme", ["tensor", "block"])
@pytest.mark.parametrize("bucket_bytes", [8192, 1 << 22])  # 8 KiB: fp8 weights split into chunks
def test_round_trip_through_local_is_bit_exact(scheme: str, bucket_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    state = llama_state()
    target = target_for(state, scheme)
    computed: list[str] = []
    real = fp8.tensor_scale if scheme == "tensor" else fp8.block_scales

    def counting(w: torch.Tensor) -> torch.Tensor:
        computed.append(str(w.shape))
        return real(w)

    linears = sum(is_linear_weight(n, tuple(v.shape)) for n, v in state.items())
    monkeypatch.setattr(fp8, "tensor_scale" if scheme == "tensor" else "block_scales", counting)
    with Refitter("local", target=target, bucket_bytes=bucket_bytes) as r:
        for _ in range(2):
            for v in state.values():
                v.mul_(1.5)
            before = len(computed)
            r.push(fp8_stream(state.items(), scheme=scheme))
            assert len(computed) - before == linears  # once per weight: the weight's fill reuses the scale's
            for name, v in state.items():
                if is_linear_weight(name, tuple(v.shape)):
                    q, s = quantize(v, scheme)
                    assert same_bits(target[name], q) and same_bits(target[name + ("_scale" if scheme == "tensor" else "_scale_inv")], s), name
                else:
                    assert same_bits(target[name], v), name


def test_lazy_sources_are_quantized_too() -> None:
    w = weight((256, 384), torch.bfloat16)
    target = {"x.up_proj.weight": torch.zeros(256, 384, dtype=FP8), "x.up_proj.weight_scale": torch.zeros(())}
    Refitter("local", target=target).push(fp8_stream([("x.up_proj.weight", Lazy((256, 384), torch.bfloat16, lambda out: out.copy_(w)))]))
    q, s = quantize(w)
    assert same_bits(target["x.up_proj.weight"], q) and same_bits(target["x.up_proj.weight_scale"], s)


@pytest.mark.parametrize("scheme", ["tensor", "block"])
def test_non_finite_weights_refused_with_every_name_nothing_loaded(scheme: str) -> None:
    state = llama_state()
    target = target_for(state, scheme)
    state["model.layers.0.self_attn.k_proj.weight"][3, 5] = float("nan")
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("-inf")
    state["model.layers.1.mlp.up_proj.weight"][7, 1] = float("inf")
    before = {k: v.clone() for k, v in target.items()}
    with pytest.raises(PlanError) as err:
        Refitter("local", target=target, bucket_bytes=1 << 16).push(fp8_stream(state.items(), scheme=scheme))
    msg = str(err.value)
    assert "FP8 quantization refused weights with NaN or Inf" in msg
    assert "model.layers.0.self_attn.k_proj.weight: 1 of 8192 values are NaN or Inf" in msg
    assert "model.layers.1.mlp.up_proj.weight: 2 of 32768 values are NaN or Inf" in msg
    assert msg.count(" values are NaN or Inf") == 2
    for k, v in before.items():
        assert same_bits(target[k], v), k  # scales are planned first: refused before any bucket was applied


def test_docstring_example_values() -> None:
    q, s = quantize(torch.tensor([[1.0, -448.0]]))
    assert q.float().tolist() == [[1.0, -448.0]] and float(s) == 1.0
    assert q.dtype == FP8 and s.dtype == torch.float32 and s.shape == ()


@pytest.mark.integration
def test_bit_identical_to_vllms_own_quantizers() -> None:
    """vLLM 0.32's block quantizer and its per-tensor scale with true-division quantization."""
    deep_gemm = pytest.importorskip("vllm.utils.deep_gemm")
    online = pytest.importorskip("vllm.model_executor.layers.quantization.online.fp8")
    quant_utils = pytest.importorskip("vllm.model_executor.layers.quantization.utils.quant_utils")
    for shape in [(300, 200), (256, 384), (129, 1)]:
        for dtype in (torch.bfloat16, torch.float32):
            w = weight(shape, dtype)
            w[:128, :128] = 0  # an all-zero block
            q, s = quantize(w, "block")
            vq, vs = deep_gemm.per_block_cast_to_fp8(w, [128, 128])
            assert same_bits(q, vq) and same_bits(s, vs), (shape, dtype)
            q, s = quantize(w, "tensor")
            vs = online._fp8_scale(quant_utils.weight_amax(w).reshape(1))
            vq = online._fp8_quant_per_channel(w, vs.expand(w.shape[0]).reshape(-1, 1))
            assert same_bits(s.reshape(1), vs) and same_bits(q, vq), (shape, dtype)
