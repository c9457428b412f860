"""FP8 on push on the GPU (issue 18): weights quantized on the sender's device, straight into
CUDA buckets, arrive bit for bit as :func:`refit.fp8.quantize` computes them on that device
(both schemes, a bucket smaller than some weights, so chunked weights are materialized first),
with their scales; and within one float32 ulp of the CPU's scales: on CUDA, PyTorch divides by a
scalar through its reciprocal (``amax / 448`` for block scales, as vLLM's own
``per_block_cast_to_fp8`` does on the GPU), so a block scale may differ from the CPU's in its
last bit."""

from __future__ import annotations

import pytest
import torch

from refit import Refitter
from refit.fp8 import FP8, fp8_stream, quantize
from refit.shapes import get_shape

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("scheme", ["tensor", "block"])
def test_fp8_push_on_the_gpu_equals_the_cpu_quantizer(scheme: str) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    state = {n: (torch.randn(s, generator=g, device="cuda") * 0.02).to(torch.bfloat16) for n, s in get_shape("tiny").weights()}
    target = {n: torch.zeros(v.shape, dtype=v.dtype, device="cuda") for n, v in fp8_stream(state.items(), scheme=scheme)}
    with Refitter("local", target=target, bucket_bytes=48 << 10) as r:  # 48 KiB: the larger weights are chunked
        r.push(fp8_stream(state.items(), scheme=scheme))
    quantized = 0
    for name, w in state.items():
        if target[name].dtype != FP8:
            assert torch.equal(target[name], w)
            continue
        q, s = quantize(w, scheme)
        scale = name + ("_scale" if scheme == "tensor" else "_scale_inv")
        assert torch.equal(target[name].view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(target[scale], s), scale
        cpu_scale = quantize(w.cpu(), scheme)[1]
        assert torch.allclose(s.cpu(), cpu_scale, rtol=2.0**-23, atol=0), scale
        quantized += 1
    assert quantized == 14  # 7 linears x 2 layers
