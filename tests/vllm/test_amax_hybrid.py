"""ModelOpt amax on a hybrid (attention + Mamba) root, resolved through the model's own mapper.

vLLM 0.32 cannot build NemotronH on the CPU backend (``is_act_and_mul=False is supported only
for CUDA, XPU and ROCm``), so this checks the resolution against a module tree laid out as
vLLM's NemotronH lays it out (``model.layers.N.mixer.attn`` for attention layers,
``model.layers.N.mixer`` a Mamba mixer for the others) with vLLM's real NemotronH mapper: the
trainer's ``backbone.layers.N.mixer.*`` names reach the quantizers by the mapper
(``backbone`` -> ``model``, q/k/v stacked into ``qkv_proj``) plus the one ModelOpt step (the
K/V quantizers sit on the inner ``attn``), never by suffix matching.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.integration

from vllm.model_executor.models.nemotron_h import NemotronHForCausalLM  # noqa: E402

from refit.adapters.vllm_kv import AmaxBuffers  # noqa: E402
from refit.resolve import Placement  # noqa: E402


def _quantizer(value: float) -> torch.nn.Module:
    q = torch.nn.Module()
    q.register_buffer("_amax", torch.tensor(value, dtype=torch.bfloat16))
    return q


class _Root(torch.nn.Module):
    """A vLLM model's root: its class carries ``packed_modules_mapping``."""

    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}


def _nemotron_h_like() -> torch.nn.Module:
    attention = torch.nn.Module()  # layer 1: attention mixer
    attention.attn = torch.nn.Module()
    attention.attn.k_bmm_quantizer, attention.attn.v_bmm_quantizer = _quantizer(0.0), _quantizer(0.0)
    attention.qkv_proj = torch.nn.Module()
    attention.qkv_proj.input_quantizer = _quantizer(0.0)
    mamba = torch.nn.Module()  # layer 0: a Mamba mixer, no quantizer
    mamba.in_proj = torch.nn.Linear(2, 2)
    layers = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
    layers[0].mixer, layers[1].mixer = mamba, attention
    root = _Root()
    root.model = torch.nn.Module()
    root.model.layers = layers
    return root


@pytest.mark.parametrize(
    "hf, key",
    [
        ("backbone.layers.1.mixer.k_bmm_quantizer._amax", "model.layers.1.mixer.attn.k_bmm_quantizer._amax"),
        ("backbone.layers.1.mixer.v_bmm_quantizer._amax", "model.layers.1.mixer.attn.v_bmm_quantizer._amax"),
        ("backbone.layers.1.mixer.k_proj.input_quantizer._amax", "model.layers.1.mixer.qkv_proj.input_quantizer._amax['k_proj']"),
        ("backbone.layers.0.mixer.k_bmm_quantizer._amax", None),  # a Mamba layer has no K/V quantizer: refused
        ("backbone.layers.1.mixer.kk_bmm_quantizer._amax", None),
    ],
)
def test_hybrid_root_amax_resolves_through_the_mapper(hf: str, key: str | None) -> None:
    model = _nemotron_h_like()
    mapped = NemotronHForCausalLM.hf_to_vllm_mapper.map_name(hf)
    assert mapped is not None and mapped.startswith("model.layers.")
    buffers = AmaxBuffers(model)
    res = buffers.resolve(hf, mapped, (), torch.bfloat16)
    if key is None:
        assert res is None and "model.layers." in buffers.missing(hf, mapped)
        return
    assert res is not None and (res.placement, res.key, res.problem) == (Placement.LOCAL, key, "")
    assert res.load is not None  # a LOCAL entry loads through its callable
    res.load(torch.tensor(2.5, dtype=torch.bfloat16))
    buffers.write()
    target = key.partition("[")[0].rpartition(".")[0]
    assert model.get_buffer(f"{target}._amax").item() == 2.5
