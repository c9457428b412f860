"""Trainer-side sources: names, tied weights, filters, renames, ModelOpt amax; pushed bit for bit."""

from __future__ import annotations

import pytest
import torch

from refit import PlanError, Refitter
from refit.sources import Gathered, Source, quantizer_amax, strip_wrappers
from tests.conftest import same_bits

pytestmark = pytest.mark.unit


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 8, bias=False)
        self.norm = torch.nn.LayerNorm(8)
        self.register_buffer("rope_cache", torch.randn(4), persistent=False)  # not in a checkpoint
        self.register_buffer("step", torch.tensor(3))


class TiedLM(torch.nn.Module):
    """lm_head registered before the embeddings, so the first name seen is the one HF drops."""

    _tied_weights_keys = ["lm_head.weight"]  # noqa: RUF012  (HF's class attribute)

    def __init__(self) -> None:
        super().__init__()
        self.lm_head = torch.nn.Linear(8, 16, bias=False)
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(16, 8)
        self.model.layers = torch.nn.ModuleList([Block(), Block()])
        self.lm_head.weight = self.model.embed_tokens.weight


def randomize(m: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_parameters_and_persistent_buffers_in_state_dict_order_tied_once() -> None:
    m = TiedLM()
    names = Source(m).names
    assert "lm_head.weight" not in names and names.count("model.embed_tokens.weight") == 1
    assert "model.layers.0.rope_cache" not in names and "model.layers.0.step" in names
    assert names == [n for n in m.state_dict() if n != "lm_head.weight"]


def test_tied_in_a_plain_state_dict_keeps_the_first_name() -> None:
    e = torch.randn(16, 8)
    assert Source({"model.embed_tokens.weight": e, "lm_head.weight": e, "other": e[:2]}).names == ["model.embed_tokens.weight", "other"]


def test_include_rename_and_wrappers() -> None:
    outer = torch.nn.Module()
    outer._orig_mod = TiedLM()  # what torch.compile's wrapper looks like
    src = Source(outer, include=lambda n: ".layers.1." in n, rename=lambda n: n.replace("model.", "decoder.", 1))
    assert src.names == ["decoder.layers.1.step", "decoder.layers.1.q_proj.weight", "decoder.layers.1.norm.weight", "decoder.layers.1.norm.bias"]
    assert strip_wrappers("model._checkpoint_wrapped_module.layers.0._fsdp_wrapped_module.w") == "model.layers.0.w"
    assert Source(outer, strip=False).names[0].startswith("_orig_mod.")


def test_every_bad_rename_is_listed() -> None:
    with pytest.raises(PlanError) as err:
        Source(TiedLM(), rename=lambda n: "" if n.endswith("step") else ("same" if "norm" in n else n))
    msg = str(err.value)
    assert "model.layers.0.step: rename returned ''" in msg and "model.layers.1.step: rename returned ''" in msg
    assert "renamed to 'same', which 'model.layers.0.norm.weight' is already exported as" in msg
    with pytest.raises(PlanError, match="x: expected a tensor, got int"):
        Source({"x": 3})
    with pytest.raises(PlanError, match="Module or a state dict"):
        Source([torch.zeros(1)])  # type: ignore[arg-type]


def test_push_from_a_source_is_bit_exact_and_reads_current_values() -> None:
    src_model, dst = TiedLM(), TiedLM()
    source = Source(src_model)
    with Refitter("local", target=dst, bucket_bytes=512) as r:
        for step in range(2):
            randomize(src_model, step)
            rep = r.push(source)
            for name, v in src_model.state_dict().items():
                assert same_bits(dst.state_dict()[name], v), name
    assert rep.tensors == len(source) and dst.lm_head.weight is dst.get_submodule("model.embed_tokens").weight


class Quantizer(torch.nn.Module):
    """Stands in for ModelOpt's TensorQuantizer: an ``_amax`` buffer."""

    def __init__(self, amax: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("_amax", amax)


def quantized_attention() -> torch.nn.Module:
    attn = torch.nn.Module()
    for proj in ("q_proj", "k_proj"):
        lin = torch.nn.Linear(8, 8, bias=False)
        lin.input_quantizer = Quantizer(torch.tensor(2.0))
        lin.weight_quantizer = Quantizer(torch.rand(8))  # per-channel amax
        attn.add_module(proj, lin)
    attn.k_bmm_quantizer = Quantizer(torch.tensor(5.0))
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.model.layers[0].self_attn = attn
    return model


def test_modelopt_amax_exported_unchanged() -> None:
    src, dst = quantized_attention(), quantized_attention()
    amax = quantizer_amax(src)
    assert list(amax) == [
        "model.layers.0.self_attn.q_proj.input_quantizer._amax",
        "model.layers.0.self_attn.q_proj.weight_quantizer._amax",
        "model.layers.0.self_attn.k_proj.input_quantizer._amax",
        "model.layers.0.self_attn.k_proj.weight_quantizer._amax",
        "model.layers.0.self_attn.k_bmm_quantizer._amax",
    ]
    assert amax["model.layers.0.self_attn.k_bmm_quantizer._amax"] is src.get_buffer("model.layers.0.self_attn.k_bmm_quantizer._amax")
    with torch.no_grad():
        for v in amax.values():
            v.mul_(3.0)
    Refitter("local", target=dst).push(amax)
    for name, v in amax.items():
        assert same_bits(dst.get_buffer(name), v), name
    # a whole Source carries them with the weights, under the same names, checked as amax
    assert set(amax) < set(Source(src).names)
    with torch.no_grad():
        src.get_buffer("model.layers.0.self_attn.k_bmm_quantizer._amax").fill_(-1.0)
    with pytest.raises(PlanError, match=r"k_bmm_quantizer\._amax: amax has negative values"):
        Refitter("local", target=dst).push(Source(src))


def test_gathered_is_a_lazy_the_push_fills() -> None:
    full = torch.arange(6.0).reshape(2, 3)
    lazy = Gathered((2, 3), torch.float32, lambda out: out.copy_(full), lambda: full)
    dst = {"w": torch.zeros(2, 3)}
    Refitter("local", target=dst).push([("w", lazy)])
    assert torch.equal(dst["w"], full) and lazy.full() is full
