"""State shapes for `refit bench`: the named ones, and the shape of a user's HF config.json
(dense, MoE, multimodal text_config), validated with errors that name the file and the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from refit.bench_vllm import hf_config
from refit.cli import main as cli
from refit.errors import RefitError
from refit.shapes import SHAPES, ModelShape, get_shape, make_state, shape_from_config

pytestmark = pytest.mark.unit

LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 151936,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "tie_word_embeddings": False,
}


def _write(tmp_path: Path, cfg: Any, name: str = "config.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(cfg) if not isinstance(cfg, str) else cfg)
    return str(path)


def test_named_shapes_exist_with_their_sizes() -> None:
    assert {"tiny", "tiny-moe", "llama-1b", "llama-8b", "qwen3-8b", "qwen3-30b-a3b"} <= set(SHAPES)
    assert SHAPES["llama-1b"].nbytes() == 2_471_628_800  # 1.236 B parameters, tied embedding
    assert SHAPES["llama-8b"].nbytes() == 16_060_522_496
    moe = SHAPES["qwen3-30b-a3b"]
    assert moe.nbytes() / 2 == pytest.approx(30.53e9, rel=0.01)  # Qwen3-30B-A3B: 30.5 B parameters
    names = dict(moe.weights())
    assert names["model.layers.0.mlp.experts.127.down_proj.weight"] == (2048, 768)
    assert names["model.layers.47.mlp.gate.weight"] == (128, 2048)
    assert names["model.layers.0.self_attn.q_norm.weight"] == (128,)
    scales = set(moe.scales())
    assert "model.layers.0.mlp.experts.5.up_proj.weight_scale" in scales and "model.layers.0.mlp.gate.weight_scale" not in scales


def test_config_json_gives_the_named_shapes(tmp_path: Path) -> None:
    assert shape_from_config(_write(tmp_path, LLAMA_1B)) == SHAPES["llama-1b"]
    assert get_shape(_write(tmp_path, QWEN3_30B_A3B, "moe.json")) == SHAPES["qwen3-30b-a3b"]
    assert get_shape(str(tmp_path)) == SHAPES["llama-1b"]  # a folder holding config.json


def test_config_variants(tmp_path: Path) -> None:
    # head_dim and kv heads derived; Qwen2's q/k/v biases; every other layer dense (decoder_sparse_step 2)
    qwen2 = {k: v for k, v in LLAMA_1B.items() if k not in ("head_dim", "num_key_value_heads")} | {"model_type": "qwen2"}
    s = shape_from_config(_write(tmp_path, qwen2))
    assert (s.head_dim, s.kv_heads, s.attn_bias) == (64, 32, True)
    assert dict(s.weights())["model.layers.3.self_attn.k_proj.bias"] == (2048,)
    sparse = QWEN3_30B_A3B | {"num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    s = shape_from_config(_write(tmp_path, sparse))
    assert s.dense_layers == (0, 2, 3) and [s.is_moe(i) for i in range(4)] == [False, True, False, False]
    mixtral = {k: v for k, v in LLAMA_1B.items() if k != "tie_word_embeddings"} | {"num_local_experts": 8, "num_hidden_layers": 2}
    s = shape_from_config(_write(tmp_path, mixtral))
    assert (s.experts, s.moe_intermediate, s.tied) == (8, 8192, False)
    vl = {"architectures": ["X"], "model_type": "qwen3_vl", "text_config": LLAMA_1B | {"model_type": "qwen3"}}
    s = shape_from_config(_write(tmp_path, vl))
    assert s.qk_norm and s.layers == 16
    state, scales = make_state(shape_from_config(_write(tmp_path, LLAMA_1B | {"num_hidden_layers": 1, "vocab_size": 64})))
    assert len(state) == 11 and len(scales) == 9  # tied: no lm_head


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ("{not json", "not a readable JSON file"),
        ([1, 2], "expected a JSON object"),
        ({k: v for k, v in LLAMA_1B.items() if k != "vocab_size"}, "'vocab_size' is missing"),
        (LLAMA_1B | {"hidden_size": "2048"}, "'hidden_size' must be a positive integer, got '2048'"),
        (LLAMA_1B | {"num_hidden_layers": 0}, "'num_hidden_layers' must be a positive integer, got 0"),
        ({k: v for k, v in LLAMA_1B.items() if k != "head_dim"} | {"hidden_size": 2050}, "not a multiple of num_attention_heads 32; set head_dim"),
        (LLAMA_1B | {"num_key_value_heads": 5}, "heads \\(32\\) must be a multiple of kv_heads \\(5\\)"),
        (LLAMA_1B | {"num_experts": -1}, "'num_experts' must be a non-negative integer"),
        (QWEN3_30B_A3B | {"mlp_only_layers": "0"}, "'mlp_only_layers' must be a list"),
        (LLAMA_1B | {"kv_lora_rank": 512}, "multi-head latent attention"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path: Path, cfg: Any, message: str) -> None:
    path = _write(tmp_path, cfg)
    with pytest.raises(RefitError, match=message) as err:
        get_shape(path)
    assert str(tmp_path) in str(err.value)


def test_missing_config_and_unknown_name() -> None:
    with pytest.raises(RefitError, match="no such file"):
        get_shape("/nonexistent/config.json")
    with pytest.raises(RefitError, match="unknown shape 'llama-3b'.*path of an HF config.json"):
        get_shape("llama-3b")


def test_hf_config_round_trips_for_vllm(tmp_path: Path) -> None:
    for name in ("tiny", "tiny-moe", "llama-1b", "qwen3-8b", "qwen3-30b-a3b"):
        cfg = hf_config(SHAPES[name])
        assert shape_from_config(_write(tmp_path, cfg)) == SHAPES[name], name
    assert hf_config(SHAPES["tiny-moe"])["architectures"] == ["Qwen3MoeForCausalLM"]
    assert hf_config(SHAPES["llama-8b"])["architectures"] == ["LlamaForCausalLM"]
    with pytest.raises(RefitError, match="Qwen3-MoE"):
        hf_config(ModelShape(layers=1, hidden=64, intermediate=64, heads=2, kv_heads=2, head_dim=32, vocab=64, experts=2, moe_intermediate=32))


@pytest.mark.integration
def test_cli_bench_from_a_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, LLAMA_1B | {"num_hidden_layers": 1, "hidden_size": 256, "intermediate_size": 512, "vocab_size": 1024, "head_dim": 32})
    out = tmp_path / "rows.json"
    assert cli(["bench", "--shape", path, "--transport", "local", "--bucket-mb", "1", "--repeat", "1", "--json", str(out), "--quiet"]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["shape"] == path and row["tensors"] == 11 + 9 and row["bytes"] == shape_from_config(path).nbytes() + 9 * 4
    assert f"shape {path}" in capsys.readouterr().out
