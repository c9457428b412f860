"""Device paths of the core: packing, unpacking and local pushes on CUDA, bit for bit."""

from __future__ import annotations

import pytest
import torch

import refit
from refit import Lazy, Refitter
from tests.conftest import every_dtype_state, random_tensor, same_bits
from tests.test_gather import check_reads_current_values, scattered
from tests.test_plan_pack import roundtrip
from tests.test_scales import check_new_tensors_are_followed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_every_dtype_roundtrips_on_cuda(gen: torch.Generator) -> None:
    state = every_dtype_state(gen, device="cuda")
    got = roundtrip(state, 1024, device="cuda")
    for k, v in state.items():
        assert got[k].is_cuda and same_bits(got[k], v), k


@pytest.mark.parametrize("n", [4096, 4097, 3 * 4096])
def test_bucket_edges_on_cuda(gen: torch.Generator, n: int) -> None:
    state = {"a": random_tensor((), torch.bfloat16, gen, "cuda"), "x": random_tensor((n,), torch.uint8, gen, "cuda")}
    got = roundtrip({k: v.cpu() for k, v in state.items()}, 4096)
    for k, v in state.items():
        assert same_bits(got[k], v.cpu())


def test_local_push_on_cuda_with_scales_and_lazy(gen: torch.Generator) -> None:
    state = {
        "w8": random_tensor((64, 64), torch.float8_e4m3fn, gen, "cuda"),
        "wbf": random_tensor((300, 100), torch.bfloat16, gen, "cuda"),  # chunked at 16 KiB
        "nc": random_tensor((32, 48), torch.float16, gen, "cuda").t(),
    }
    scales = {f"l{i}.k_scale": torch.tensor(0.5 + i, dtype=torch.float32, device="cuda") for i in range(40)}
    scales["l0.v_scale"] = torch.tensor(0.25, dtype=torch.bfloat16, device="cuda")
    lazy = Lazy((128,), torch.float32, lambda out: torch.arange(128, out=out, dtype=torch.float32))
    target = {k: torch.empty(v.shape, dtype=v.dtype, device="cuda") for k, v in {**state, **scales}.items()}
    target["lz"] = torch.zeros(128, device="cuda")
    with Refitter("local", target=target, bucket_bytes=16384) as r:
        for _ in range(3):
            pushed: dict[str, torch.Tensor | Lazy] = {**state, "lz": lazy}
            r.push(pushed, scales)
    for k, v in {**state, **scales}.items():
        assert same_bits(target[k], v), k
    assert torch.equal(target["lz"], torch.arange(128.0, device="cuda"))


@pytest.mark.parametrize("num_buffers", [1, 2, 3])
def test_local_push_on_cuda_pipelines_buffers_safely(gen: torch.Generator, num_buffers: int) -> None:
    """Applying runs on its own stream, overlapping the next bucket's packing: a buffer must never
    be packed again before it was applied. Many buckets, few buffers, values changing every push."""
    state = {f"w{i}": random_tensor((1 << 19,), torch.bfloat16, gen, "cuda") for i in range(24)}  # 1 MiB each
    scales = {f"w{i}_scale": torch.tensor(1.0 + i, device="cuda") for i in range(24)}
    target = {k: torch.empty_like(v) for k, v in {**state, **scales}.items()}
    with Refitter("local", target=target, bucket_bytes=2 << 20, num_buffers=num_buffers) as r:
        for step in range(5):
            report = r.push(state, scales)
            assert report.buckets >= 12
            for k, v in {**state, **scales}.items():
                assert same_bits(target[k], v), (step, k)
            for v in state.values():
                v.add_(1)  # on the current stream, after the push returned
            for v in scales.values():
                v.mul_(2)


def test_zmq_pinned_staging_roundtrip(gen: torch.Generator) -> None:
    """CUDA source tensors go through pinned host buckets; a CUDA receiver stages into pinned memory."""
    import threading

    pytest.importorskip("zmq")
    from refit.receiver import RefitReceiver

    state = {"w": random_tensor((1000, 37), torch.bfloat16, gen, "cuda"), "s": torch.tensor(0.5, device="cuda")}
    target = {k: torch.zeros(v.shape, dtype=v.dtype, device="cuda") for k, v in state.items()}
    rx = RefitReceiver(target, "zmq", device="cuda")
    done: list[object] = []
    th = threading.Thread(target=lambda: done.append(rx.receive(timeout=60)))
    th.start()
    with Refitter("zmq", peers=[rx.info()["address"]], bucket_bytes=8192, timeout=60) as r:
        r.push({"w": state["w"]}, {"s": state["s"]})
    th.join(timeout=60)
    rx.close()
    assert done and all(same_bits(target[k], v) for k, v in state.items())


@pytest.mark.parametrize("src_device", ["cuda", "cpu"])
def test_scale_runs_with_amax_on_cuda(src_device: str) -> None:
    """A run of 0-d scales holding an amax (may be 0) validates on the run's device."""
    scales = {f"l{i}.weight_scale": torch.tensor(0.5 + i, device=src_device) for i in range(9)}
    scales["l9.input_amax"] = torch.tensor(0.0, device=src_device)
    target = {k: torch.ones((), device="cuda") for k in scales}
    with Refitter("local", target=target) as r:
        r.push({}, scales)
        r.push({}, scales)  # cached layout
    for k, v in scales.items():
        assert same_bits(target[k], v.cuda()), k
    scales["l3.weight_scale"].fill_(-1.0)
    with pytest.raises(refit.PlanError, match="l3.weight_scale"):
        Refitter("local", target=target).push({}, scales)


def test_scales_on_two_devices_are_stacked_per_device() -> None:
    """0-d scales of one dtype but on different devices form separate stacked groups."""
    scales = {f"l{i}.weight_scale": torch.tensor(1.0 + i, device="cuda" if i < 12 else "cpu") for i in range(24)}
    target = {k: torch.zeros((), device="cuda") for k in scales}
    with Refitter("local", target=target) as r:
        for step in range(2):
            r.push({}, scales)
            for k, v in scales.items():
                assert float(target[k]) == float(v), (step, k)
            for v in scales.values():
                v.mul_(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float64], ids=str)
def test_cuda_scales_are_read_through_one_window(dtype: torch.dtype, gen: torch.Generator) -> None:
    """0-d CUDA tensors (separate allocations and views of one buffer) read by one gather."""
    g = check_reads_current_values(scattered(dtype, gen, "cuda"), gen)
    assert g.windowed and g._window is not None and g._window.is_cuda


def test_new_cuda_scale_tensors_every_push() -> None:
    """Scales made anew every push on the GPU: the layout follows them, values bit-exact."""
    base = {f"l{i}.weight_scale": torch.rand((), device="cuda") + 0.5 for i in range(300)}
    check_new_tensors_are_followed(base, {k: torch.zeros((), device="cuda") for k in base})
