"""One tiny Qwen2 engine (TP=1, float32): pushes land bit for bit, greedy output equals HF's,
KV scales land, refusals leave every engine tensor bit-identical."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.integration

from refit import Refitter  # noqa: E402

from .conftest import engine_fixture, hf_greedy, hf_state, read, refused, vllm_greedy  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_model_dir):
    yield from engine_fixture(tmp_model_dir)


def test_push_in_rpc_matches_hf(engine):
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=1)
    reports = handle.apply(state, version=7)
    assert [r.version for r in reports] == [7]
    assert reports[0].loaded == len(state)
    # Unfused tensors land bit for bit (norms are plain parameters; embed/lm_head too).
    got = read(handle, ["model.norm.weight", "model.embed_tokens.weight", "lm_head.weight", "model.layers.1.input_layernorm.weight"])[0]
    for name, t in got.items():
        assert torch.equal(t.view(torch.uint8), state[name].contiguous().view(torch.uint8)), name
    assert vllm_greedy(llm) == hf_greedy(hf)


def test_push_over_zmq_one_line(engine):
    pytest.importorskip("zmq")
    pytest.importorskip("refit.transports.zmq")
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=2)
    with Refitter("zmq", engine=handle, bucket_bytes=1 << 18, timeout=60) as refitter:
        report = refitter.push(state)
    assert report.buckets > 1  # several buckets: tensors of one layer span buckets
    assert [r.loaded for r in report.receivers] == [len(state)]
    assert vllm_greedy(llm) == hf_greedy(hf)
    handle.open("zmq", {})  # Refitter.close() closed the workers' receivers; rejoin for later tests


@pytest.mark.parametrize("transport", ["nccl", "cuda_ipc"])  # gloo stream and shared-memory buckets on CPU
def test_push_over_the_other_transports(engine, transport):
    pytest.importorskip("zmq")
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=5)
    scales = {"model.layers.1.self_attn.k_scale": torch.tensor(0.75)}
    with Refitter(transport, engine=handle, bucket_bytes=1 << 18, timeout=60) as refitter:
        report = refitter.push(state, scales)
    assert report.buckets > 1 and [r.loaded for r in report.receivers] == [len(state) + 1]
    assert read(handle, ["model.layers.1.self_attn.attn._k_scale"])[0]["model.layers.1.self_attn.attn._k_scale"].item() == 0.75
    assert vllm_greedy(llm) == hf_greedy(hf)


def test_kv_scales_land_and_survive_weight_pushes(engine):
    # Explicit versions above those the Refitter pushes of the tests before took (receivers
    # accept only increasing versions).
    llm, handle, model_dir = engine
    scales = {
        "model.layers.0.self_attn.k_scale": torch.tensor(0.5),
        "model.layers.0.self_attn.v_scale": torch.tensor(0.25),
        "model.layers.1.self_attn.k_proj.k_scale": torch.tensor(0.125),  # ModelOpt-style name
    }
    handle.apply({}, scales, version=108)
    names = [
        "model.layers.0.self_attn.attn._k_scale",
        "model.layers.0.self_attn.attn._v_scale",
        "model.layers.1.self_attn.attn._k_scale",
        "model.layers.0.self_attn.attn._k_scale_float",
        "model.layers.0.self_attn.attn._v_scale_float",
        "model.layers.1.self_attn.attn._k_scale_float",
    ]
    got = read(handle, names)[0]
    assert got[names[0]].item() == 0.5 and got[names[0]].shape == () and got[names[0]].dtype == torch.float32
    assert got[names[1]].item() == 0.25 and got[names[2]].item() == 0.125
    assert (got[names[3]], got[names[4]], got[names[5]]) == (0.5, 0.25, 0.125)
    # A later weight-only push runs vLLM's post-load step (which resets unquantized scales to
    # 1.0); the pushed values must still be there afterwards.
    hf, state = hf_state(model_dir, seed=3)
    handle.apply(state, version=109)
    got = read(handle, names)[0]
    assert got[names[0]].item() == 0.5 and got[names[3]] == 0.5
    assert vllm_greedy(llm) == hf_greedy(hf)


def test_modelopt_amax_without_its_quantizer_is_refused_never_converted(engine):
    """An engine without ModelOpt quantizers has no buffer for an amax: the push is refused
    (fail closed), naming where it looked and the explicit conversion, and nothing changes."""
    _, handle, _ = engine
    message = refused(handle, {"model.layers.0.self_attn.k_bmm_quantizer._amax": torch.tensor(448.0 * 0.375)}, version=110)
    assert "model.layers.0.self_attn.attn.k_bmm_quantizer._amax" in message and "amax_to_scale" in message


@pytest.mark.parametrize(
    "bad, expect",
    [
        ({"model.layers.0.self_attn.q_projj.weight": torch.zeros(128, 128)}, "q_projj"),
        ({"model.layers.0.mlp.down_proj.input_scale": torch.tensor(1.0)}, "down_proj.input_scale"),
        ({"model.layers.0.self_attn.o_proj.weight": torch.zeros(128, 64)}, "shape [128, 64]"),
        ({"model.norm.weight": torch.zeros(128, dtype=torch.bfloat16)}, "dtype torch.bfloat16"),
        ({"model.layers.2.mlp.up_proj.weight": torch.zeros(256, 128)}, "layers.2"),
    ],
    ids=["misspelled", "scale-without-buffer", "wrong-shape", "wrong-dtype", "no-such-layer"],
)
def test_refusal_leaves_engine_bit_identical(engine, bad, expect):
    _, handle, model_dir = engine
    _, state = hf_state(model_dir, seed=4)
    msg = refused(handle, {**state, **bad}, 99)
    assert expect in msg
    assert "vllm-worker-0" in msg


@pytest.mark.parametrize(
    "bad, expect, never",
    [
        (
            {"model.layers.0.self_attn.q_proj.input_scale": torch.tensor(1.0)},
            "this engine has no input_scale for model.layers.0.self_attn.qkv_proj (QKVParallelLinear holds bias, weight)",
            "has no attribute 'data'",
        ),
        (
            {"model.layers.0.mlp.gate_proj.weight": torch.zeros(256, 100)},
            "does not fit model.layers.0.mlp.gate_up_proj.weight (the parameter is [512, 128] torch.float32)",
            None,
        ),
        ({"model.layers.0.input_layernorm.weightt": torch.zeros(128)}, "(did you mean 'model.layers.0.input_layernorm.weight'?)", "weightt'?"),
    ],
    ids=["scale-without-slot", "loader-assertion", "did-you-mean"],
)
def test_refusals_say_what_to_do(engine, bad, expect, never):
    """Issue 13 finding 6: vLLM's own errors (an AttributeError for a scale with no slot, an
    empty AssertionError from a loader) come with the target and what would fit."""
    _, handle, model_dir = engine
    msg = refused(handle, bad, 98)
    assert expect in msg, msg
    assert never is None or never not in msg, msg


@pytest.mark.parametrize(
    "name, shape, expected",
    [
        ("model.layers.0.mlp.up_proj.weight", (300, 128), [256, 128]),
        ("model.layers.0.self_attn.q_proj.weight", (200, 128), [128, 128]),
        ("model.layers.0.self_attn.q_proj.bias", (200,), [128]),
        ("model.layers.0.mlp.down_proj.weight", (128, 300), [128, 256]),
        ("model.layers.1.mlp.gate_proj.weight", (128, 128), [256, 128]),
    ],
    ids=["up-rows", "q-rows", "q-bias", "down-columns", "gate-too-small"],
)
def test_wrong_shape_is_refused_with_the_expected_shape(engine, name, shape, expected):
    # vLLM's loaders narrow an oversized tensor to the parameter without an error; refit
    # accounts for every pushed element before loading anything.
    _, handle, model_dir = engine
    _, state = hf_state(model_dir, seed=4)
    msg = refused(handle, {**state, name: torch.zeros(shape)}, 97)
    assert f"{name}: shape {list(shape)}" in msg and f"expected {expected}" in msg, msg


def test_partial_layer_is_refused(engine):
    _, handle, model_dir = engine
    _, state = hf_state(model_dir, seed=5)
    msg = refused(handle, {"model.layers.0.self_attn.q_proj.weight": state["model.layers.0.self_attn.q_proj.weight"]}, 198)
    assert "qkv_proj" in msg and "push every tensor of this layer" in msg


def test_partial_model_push_of_whole_layers(engine):
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=6)
    handle.apply(state, version=111)
    hf2, state2 = hf_state(model_dir, seed=7)
    mlp1 = {k: v for k, v in state2.items() if k.startswith("model.layers.1.mlp.")}
    handle.apply(mlp1, version=112)
    hf.load_state_dict({**state, **mlp1})
    assert vllm_greedy(llm) == hf_greedy(hf)


@pytest.mark.parametrize(("transport", "options"), [("cuda_ipc", {}), ("zmq", {"frame_bytes": 4096})])
def test_layer_spanning_a_reused_bucket_loads_exactly(engine, transport, options):
    # One staging buffer of 64 KiB: q_proj (64 KiB), k_proj and v_proj of a layer arrive in
    # different buckets, each written into the same buffer (shared memory; over zmq, the worker's
    # staging bucket that a bucket's 4 KiB frames are copied into). vLLM's layer-wise reload
    # keeps views of a layer's tensors until its last one arrived, so refit copies the views it
    # still holds before the buffer is reused (vllm_load); without that copy, q_proj would load
    # k_proj's bytes. (A zmq bucket of one frame is applied from that frame, which its views keep
    # alive: nothing needs copying, see test_push_over_zmq_one_line.)
    pytest.importorskip("zmq")
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=8)
    with Refitter(transport, engine=handle, bucket_bytes=1 << 16, num_buffers=1, timeout=60, **options) as refitter:
        report = refitter.push(state)
    assert report.buckets > 10 and [r.loaded for r in report.receivers] == [len(state)]
    assert vllm_greedy(llm) == hf_greedy(hf)
    handle.open("zmq", {})  # Refitter.close() closed the workers' receivers; rejoin for later tests


def test_chunked_tensors_reassembled_in_the_kept_buffer_generate_like_hf_each_push(engine):
    """The embedding (256 KiB) is larger than a 64 KiB bucket: the worker assembles it from its
    chunks in a host buffer it keeps across pushes (vLLM copies what it loads, so the buffer is
    free again at the next push). Two pushes of different weights in one layout: each generates
    like HF with those weights."""
    pytest.importorskip("zmq")
    llm, handle, model_dir = engine
    handle.open("zmq", {})
    with Refitter("zmq", engine=handle, bucket_bytes=1 << 16, timeout=60) as refitter:
        for seed in (11, 12):
            hf, state = hf_state(model_dir, seed=seed)
            assert max(t.numel() * t.element_size() for t in state.values()) > 1 << 16
            refitter.push(state)
            assert vllm_greedy(llm) == hf_greedy(hf), seed
    handle.open("zmq", {})


def test_tensors_sent_in_place_and_staged_ahead_generate_like_hf(engine, monkeypatch):
    """The zmq sender sends contiguous host tensors from their own memory (here every one: the
    tiny model has none of the >= 1 MiB it takes in production) and, with 3 buffers in flight,
    the worker copies a waiting bucket's frames into staging while vLLM loads the one before."""
    pytest.importorskip("zmq")
    import refit.send

    packed = []
    pack = refit.send.pack

    def spy(bucket, metas, *args, **kw):
        packed.extend(metas)
        pack(bucket, metas, *args, **kw)

    monkeypatch.setattr(refit.send, "LARGE_COPY_BYTES", 1)
    monkeypatch.setattr(refit.send, "pack", spy)
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=10)
    with Refitter("zmq", engine=handle, bucket_bytes=1 << 16, num_buffers=3, frame_bytes=4096, timeout=60) as refitter:
        report = refitter.push(state)
    assert report.buckets > 10 and packed == []  # every tensor went from its own memory
    assert vllm_greedy(llm) == hf_greedy(hf)
    handle.open("zmq", {})


def test_the_worker_receives_over_zmq_off_its_compute_core(engine):
    """vLLM's CPU backend pins each worker's thread to its compute core(s); refit's zmq receiver
    opened there runs its I/O thread on the CPUs the worker is not pinned to, so receiving bucket
    k+1 overlaps applying bucket k (issue 14). A push then still generates like HF."""
    pytest.importorskip("zmq")
    from refit.transports.io_threads import usable_cpus  # the engine's worker runs on this machine

    llm, handle, model_dir = engine
    handle.open("zmq", {})
    got = handle.rpc("refit_status")[0]
    others = sorted(usable_cpus() - set(got["cpus"]))
    if not others:
        pytest.skip(f"the worker is not pinned (it may use every CPU: {got['cpus']}): nothing to place elsewhere")
    assert got["io_cpus"] == others, got  # tests/test_io_threads.py: the I/O thread runs on exactly these
    hf, state = hf_state(model_dir, seed=9)
    with Refitter("zmq", engine=handle, bucket_bytes=1 << 18, timeout=60) as refitter:
        refitter.push(state)
    assert vllm_greedy(llm) == hf_greedy(hf)
    handle.open("zmq", {})


def test_versions_continue_after_the_engine_and_status_reports_them(engine):
    """apply() without version= numbers after what the workers committed (a fixed default of 1
    would be refused once versions only increase); status() reports each worker's version."""
    llm, handle, model_dir = engine
    hf, state = hf_state(model_dir, seed=41)
    before = handle.status()
    assert len(before) == 1 and not before[0]["torn"]
    first = handle.apply(state)[0].version
    second = handle.apply(state)[0].version
    assert (first, second) == (before[0]["version"] + 1, before[0]["version"] + 2)
    assert [{k: s[k] for k in ("version", "torn")} for s in handle.status()] == [{"version": second, "torn": False}]
    message = refused(handle, state, version=first)
    assert f"version {first} is not greater than" in message
    assert f"version {first} is not greater than" in handle.status()[0]["last_error"]  # kept for the trainer to read
