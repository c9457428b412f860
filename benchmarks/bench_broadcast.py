"""Broadcast benchmark of the ``nccl`` transport: our push vs raw bucketed broadcast vs per tensor.

One sender (this process, rank 0) and ``--receivers`` receiver processes. In the same run, over
the same kind of private group (gloo on CPU hosts, NCCL with ``--backend nccl`` on GPU hosts):

* ``push``: ``Refitter("nccl").push(state, scales)``: handshake, pack, broadcast, apply, finish.
* ``raw buckets``: the ceiling: the same bytes in buckets of the same sizes, ``num_buffers`` in
  flight, no packing, no applying.
* ``per tensor``: the baseline many RL frameworks use: one blocking broadcast per tensor.

The synthetic state is Llama-shaped (bf16 weights, 0-d fp32 weight/k/v scales per layer); the
default is 4 layers of a Llama-3.2-1B (~0.3 B params, ~0.6 GB) so it runs on a 2-core box in
about a minute. Each figure is the median of ``--reps`` after one warm-up.

Example::

    python benchmarks/bench_broadcast.py --receivers 2 --layers 4 --json /tmp/bcast.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refit.api import Refitter
from refit.receiver import RefitReceiver
from refit.transports.collective import Rendezvous, StoreServer, choose_backend, client_store, connect, new_group_id

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_state(cfg: dict[str, Any], device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Llama-shaped bf16 weights and 0-d fp32 scales (deterministic, cheap to build)."""
    h, inter, kv, vocab = cfg["hidden"], cfg["intermediate"], cfg["hidden"] // 4, cfg["vocab"]
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    for i in range(cfg["layers"]):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (h, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, h),
            f"{p}.mlp.gate_proj.weight": (inter, h),
            f"{p}.mlp.up_proj.weight": (inter, h),
            f"{p}.mlp.down_proj.weight": (h, inter),
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
        }
    state = {n: torch.full(s, 0.01, dtype=torch.bfloat16, device=device) for n, s in shapes.items()}
    scales = {}
    for i in range(cfg["layers"]):
        scales[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(1.0, device=device)
        scales[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(1.0, device=device)
        for lin in LINEARS:
            mod = "self_attn" if lin.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            scales[f"model.layers.{i}.{mod}.{lin}.weight_scale"] = torch.tensor(0.5, device=device)
    return state, scales


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def receiver_main(cfg: dict[str, Any], rank: int, cmd: Any, res: Any) -> None:
    torch.set_num_threads(1)
    device = cfg["rx_device"].format(rank=rank)
    state, scales = llama_state(cfg, device)
    target = {**state, **scales}
    with RefitReceiver(target, "nccl", name=f"rx{rank}", device=device) as rx:
        res.put(("info", rx.info()))
        for _ in range(1 + cfg["reps"]):
            rx.receive(timeout=600)
            res.put(("pushed", rank))
        # raw phases: a private group of the same backend, same bucket sizes
        rdv = Rendezvous.decode(cmd.get(timeout=600))
        sizes, nb = cmd.get(timeout=600)
        comm = connect(rdv, client_store(rdv.host, rdv.port, rdv.timeout), rdv.rank, torch.device(device))
        bufs = [torch.empty(max(sizes), dtype=torch.uint8, device=device) for _ in range(nb)]
        tensors = [raw_bytes(target[n]) for n in sorted(target)]
        for _ in range(1 + cfg["reps"]):
            pending = {}
            for i, size in enumerate(sizes):
                if i - nb in pending:
                    pending.pop(i - nb).wait()
                pending[i] = comm.broadcast(bufs[i % nb][:size], f"bucket {i}")
            for h in pending.values():
                h.wait()
            res.put(("raw", rank))
        for _ in range(1 + cfg["reps"]):
            for i, t in enumerate(tensors):
                comm.broadcast(t, f"tensor {i}").wait()
            res.put(("per_tensor", rank))
        comm.close()


def wait_all(res: Any, kind: str, n: int) -> None:
    for _ in range(n):
        got = res.get(timeout=600)
        if got[0] != kind:
            raise RuntimeError(f"expected {kind}, got {got}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--receivers", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4, help="Llama-3.2-1B has 16")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32000, help="Llama-3.2-1B has 128256")
    ap.add_argument("--bucket-mb", type=int, default=64)
    ap.add_argument("--num-buffers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    ap.add_argument("--device", default=None, help="sender buffers (default: cuda if available)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = choose_backend(args.backend, device)
    if str(backend) == "gloo" and args.device is None:
        device = torch.device("cpu")
    cfg = {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate, "vocab": args.vocab, "reps": args.reps}
    cfg["rx_device"] = "cuda:{rank}" if device.type == "cuda" else "cpu"
    state, scales = llama_state(cfg, str(device))
    total = sum(t.numel() * t.element_size() for t in [*state.values(), *scales.values()])
    ctx = mp.get_context("spawn")
    res, cmds = ctx.Queue(), [ctx.Queue() for _ in range(args.receivers)]
    procs = [ctx.Process(target=receiver_main, args=(cfg, r + 1, cmds[r], res), daemon=True) for r in range(args.receivers)]
    for p in procs:
        p.start()
    try:
        infos = [res.get(timeout=600)[1] for _ in procs]
        times: dict[str, list[float]] = {"push": [], "raw buckets": [], "per tensor": []}
        with Refitter(
            "nccl",
            peers=[i["address"] for i in infos],
            backend=str(backend),
            device=device,
            bucket_bytes=args.bucket_mb << 20,
            num_buffers=args.num_buffers,
            timeout=600,
        ) as r:
            seen: dict[str, Any] = {}
            handshake = r.sender.handshake

            def capture(manifest: Any, version: int) -> None:  # the layout the push used
                seen["manifest"] = manifest
                handshake(manifest, version)

            r.sender.handshake = capture  # type: ignore[method-assign]
            for rep in range(1 + args.reps):
                t0 = time.perf_counter()
                report = r.push(state, scales)
                wait_all(res, "pushed", len(procs))
                if rep:
                    times["push"].append(time.perf_counter() - t0)
        sizes = list(seen["manifest"].bucket_sizes)
        store = StoreServer("127.0.0.1", 600)
        gid = new_group_id()
        uid = b""
        if str(backend) == "nccl":
            from cupy.cuda import nccl

            uid = bytes(b & 0xFF for b in nccl.get_unique_id())
        world = len(procs) + 1
        for rank, q in enumerate(cmds, start=1):
            q.put(
                Rendezvous(backend=backend, group=gid, rank=rank, world=world, host="127.0.0.1", port=store.port, unique_id=uid, timeout=600).encode()
            )
            q.put((sizes, args.num_buffers))
        me = Rendezvous(backend=backend, group=gid, rank=0, world=world, host="127.0.0.1", port=store.port, unique_id=uid, timeout=600)
        comm = connect(me, store.store, 0, device)
        bufs = [torch.empty(max(sizes), dtype=torch.uint8, device=device) for _ in range(args.num_buffers)]
        for rep in range(1 + args.reps):
            t0 = time.perf_counter()
            pending = {}
            for i, size in enumerate(sizes):
                if i - args.num_buffers in pending:
                    pending.pop(i - args.num_buffers).wait()
                pending[i] = comm.broadcast(bufs[i % args.num_buffers][:size], f"bucket {i}")
            for h in pending.values():
                h.wait()
            wait_all(res, "raw", len(procs))
            if rep:
                times["raw buckets"].append(time.perf_counter() - t0)
        tensors = {**state, **scales}
        for rep in range(1 + args.reps):
            t0 = time.perf_counter()
            for i, name in enumerate(sorted(tensors)):
                comm.broadcast(raw_bytes(tensors[name]), f"tensor {i}").wait()
            wait_all(res, "per_tensor", len(procs))
            if rep:
                times["per tensor"].append(time.perf_counter() - t0)
        comm.close()
        store.close()
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    raw_s = statistics.median(times["raw buckets"])
    rows = []
    for name, ts in times.items():
        s = statistics.median(ts)
        rows.append({"method": name, "seconds": s, "gb_per_s": total / s / 1e9, "vs_raw": raw_s / s, "broadcasts": None})
    rows[0]["broadcasts"] = len(sizes) + 1
    rows[1]["broadcasts"] = len(sizes)
    rows[2]["broadcasts"] = len(tensors)
    head = (
        f"backend {backend}, device {device}, {args.receivers} receivers, {len(tensors)} tensors ({len(scales)} 0-d scales), "
        f"{total / 1e9:.3f} GB, bucket {args.bucket_mb} MiB x {len(sizes)}, num_buffers {args.num_buffers}, median of {args.reps}"
    )
    print(head)
    print(f"{'method':<14}{'broadcasts':>11}{'seconds':>10}{'GB/s':>9}{'vs raw':>9}")
    for row in rows:
        print(f"{row['method']:<14}{row['broadcasts']:>11}{row['seconds']:>10.3f}{row['gb_per_s']:>9.3f}{row['vs_raw']:>8.0%}")
    print(f"last push stages (s): { {k: round(v, 3) for k, v in report.seconds.items()} }")
    out = {"config": {**vars(args), "json": None, "backend": str(backend), "device": str(device), "bytes": total}, "rows": rows}
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
