"""FSDP2 (``fully_shard``) parameters pushed from a 2-process gloo group: bit-exact, one full
tensor at a time, every rank joining the gathers the pushing rank drives."""

from __future__ import annotations

import os
import traceback
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from tests.procs import free_port

pytestmark = pytest.mark.integration

# 8 layers, fp32: 121 MiB of weights; the largest tensor (embeddings) is 8 MiB
SHAPE = dict(layers=8, hidden=512, intermediate=1536, heads=8, kv_heads=8, head_dim=64, vocab=4096)
BUCKET = 16 << 20


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmHWM:"))


def _body(rank: int, port: int, results: Any) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
        torch.set_num_threads(1)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from refit import Refitter, ResolveError
        from refit.fp8 import fp8_stream, quantize
        from refit.shapes import ModelShape, SyntheticModel
        from refit.sources import Source

        shape = ModelShape(**SHAPE)  # type: ignore[arg-type]
        model = SyntheticModel(shape, dtype=torch.float32)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02, generator=gen)
        reference = {k: v.clone() for k, v in model.state_dict().items()} if rank == 0 else {}
        mesh = init_device_mesh("cpu", (2,))
        for i in range(shape.layers):
            fully_shard(model.get_submodule(f"model.layers.{i}"), mesh=mesh)
        fully_shard(model, mesh=mesh)
        source = Source(model)
        # KV-cache calibration: each rank sees its own batch, every rank gets the max of both
        from refit.kv_calibration import KVCalibrator

        attn = torch.nn.Module()
        attn.k_proj, attn.v_proj = torch.nn.Identity(), torch.nn.Identity()
        with KVCalibrator(attn) as cal:
            attn.k_proj(torch.tensor([-3.0, 1.0]) * (rank + 1))  # amax 3 on rank 0, 6 on rank 1
            attn.v_proj(torch.tensor([5.0]) * (1 - rank))  # 5 on rank 0, 0 on rank 1
        kv = {k: float(v) for k, v in cal.scales().items()}
        if rank != 0:
            served = [source.serve() for _ in range(3)]
            results.put((rank, {"served": served, "kv": kv}))
            return
        out: dict[str, Any] = {
            "kv": kv,
            "sharded": type(model.get_submodule("model.norm").weight).__name__,
            "params": len(list(model.parameters())),
            "state_bytes": sum(v.numel() * 4 for v in reference.values()),
        }
        target = {k: torch.zeros_like(v) for k, v in reference.items()}
        with Refitter("local", target=target, bucket_bytes=BUCKET) as r:
            r.push(reference)  # buckets allocated, target touched
            for v in target.values():
                v.zero_() if v.dim() else v.fill_(0.5)  # weights to zero, scales (0-d) to another valid value
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM: the peak below is this push's
            base = _vm_hwm()
            with source.lead():
                report = r.push(source)
            out["peak_bytes"] = _vm_hwm() - base
        out["tensors"] = report.tensors
        out["mismatch"] = [k for k, v in reference.items() if not torch.equal(target[k], v)]
        # FP8 on push from the sharded model: the same bits as quantizing the unsharded weights
        fp8_target: dict[str, torch.Tensor] = {}
        for name, v in reference.items():
            if name.endswith("_proj.weight"):
                q, s = quantize(v, "block")
                fp8_target[name], fp8_target[name + "_scale_inv"] = torch.zeros_like(q), torch.zeros_like(s)
            else:
                fp8_target[name] = torch.zeros_like(v)
        with source.lead():
            Refitter("local", target=fp8_target, bucket_bytes=BUCKET).push(fp8_stream(source, scheme="block"))
        bad = []
        for name, v in reference.items():
            if name.endswith("_proj.weight"):
                q, s = quantize(v, "block")
                if not (torch.equal(fp8_target[name].view(torch.uint8), q.view(torch.uint8)) and torch.equal(fp8_target[name + "_scale_inv"], s)):
                    bad.append(name)
            elif not torch.equal(fp8_target[name], v):
                bad.append(name)
        out["fp8_mismatch"] = bad
        # a refused push: the followers are released all the same
        with pytest.raises(ResolveError), source.lead():
            Refitter("local", target={"nothing": torch.zeros(1)}, bucket_bytes=BUCKET).push(source)
        results.put((0, out))
    except BaseException:
        results.put((rank, {"error": traceback.format_exc()}))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_fsdp2_push_is_bit_exact_and_gathers_one_tensor_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # a fixed mmap threshold: every large tensor is its own mapping, unmapped when freed, so
    # peak RSS counts what is held at once (glibc's adaptive threshold would keep freed blocks)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_body, args=(rank, port, results)) for rank in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank, res in got.items():
        assert "error" not in res, f"rank {rank}:\n{res['error']}"
    lead, follower = got[0], got[1]
    assert lead["kv"] == follower["kv"] == {"k_scale": float(torch.tensor(6.0) / 448), "v_scale": float(torch.tensor(5.0) / 448)}
    assert lead["sharded"] == "DTensor"  # fully_shard really sharded the parameters
    assert lead["mismatch"] == [] and lead["fp8_mismatch"] == []
    n = lead["params"]  # the DTensors; the 0-d scale buffers are plain tensors
    assert lead["tensors"] > n
    # plain push: one gather per parameter; FP8 push: two per quantized weight (scale, then weight); refused: fewer
    quantized = 7 * SHAPE["layers"]
    assert follower["served"][:2] == [n, n + quantized] and follower["served"][2] < n  # the refused push released them
    # peak growth of the pushing process (buckets allocated before): measured 17.4 MiB, about twice
    # the largest tensor (8 MiB: the gathered tensor and the collective's buffer); the state is 121 MiB
    print(f"peak RSS growth during the sharded push: {lead['peak_bytes'] / 2**20:.1f} MiB of a {lead['state_bytes'] / 2**20:.0f} MiB state")
    assert lead["peak_bytes"] < 3 * (8 << 20) < lead["state_bytes"] / 4
