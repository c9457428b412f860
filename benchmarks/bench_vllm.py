"""The vLLM apply path (issue 14): a refit push into a real vLLM engine, beside vLLM's own
reload of the same tensors and the raw transport, measured in one run on one engine.

The same comparison is in the package as ``refit bench --engine vllm`` (``refit/bench_vllm.py``:
any named shape or HF config.json, bucket / buffer sweeps, JSON and plot); this script keeps
what that command does not: TP/PP layouts, vLLM's reload once per bucket or per tensor, refit's
push inside the worker (``local``) and a cProfile of both sides of the apply.

A Llama-style model (bf16, hidden 1536, 16 layers, vocab 32000, intermediate 3456: 1.0 GB in
147 tensors) is built from a config written here, with dummy weights; the pushed weights are
seeded random tensors. Per bucket size, in this order:

* vLLM's own in-process reload of the same tensors, timed inside the worker (a worker-extension
  method, ``vllm_bench_worker.py``): ``initialize_layerwise_reload``, ``model.load_weights`` once
  with every tensor (also once per bucket, once per bucket fed views of packed buckets as a
  push feeds it, once per tensor), ``finalize_layerwise_reload``;
* the raw transport ceilings: pyzmq sending the same bytes over loopback into the worker, one
  message per bucket in refit's 1 MiB frames (zero-copy on both sides), with the CPU-seconds it
  costs both processes and the floor that sets on the CPUs the pinned worker leaves, and one
  memcpy of the bytes (what a shared-memory bucket costs the trainer);
* refit pushes over ``zmq``, ``cuda_ipc`` (shared memory on CPU) and ``nccl`` (the gloo stream
  on CPU), with the stage times of the trainer and of the worker.

Each figure is the median of ``--repeats`` (5) after one warm-up. The ratio printed is
push / max(vLLM reload, raw transport), the acceptance figure of issue 14 (<= 1.25 over zmq and
cuda_ipc). Example::

    python benchmarks/bench_vllm.py --json out.json            # ~4 min on a 2-core CPU
    python benchmarks/bench_vllm.py --bucket-mib 64 512 --tp 2  # report only
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])  # the worker imports the extension

from refit.demos.tiny_vllm import offline_env  # noqa: E402

offline_env("WARNING")

import torch  # noqa: E402
from vllm_bench_worker import bench_state  # noqa: E402

from refit.bench_vllm import raw_zmq  # noqa: E402


def llama_config(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": a.hidden,
        "intermediate_size": a.intermediate,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.hidden // 128,
        "num_key_value_heads": a.hidden // 128,
        "vocab_size": a.vocab,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def spec_of(cfg: dict[str, Any]) -> list[tuple[str, list[int]]]:
    """HF names and shapes of the Llama checkpoint (147 tensors at 16 layers)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    spec = [("model.embed_tokens.weight", [v, h])]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        spec += [(p + f"self_attn.{x}_proj.weight", [h, h]) for x in "qkvo"]
        spec += [(p + "mlp.gate_proj.weight", [i, h]), (p + "mlp.up_proj.weight", [i, h]), (p + "mlp.down_proj.weight", [h, i])]
        spec += [(p + "input_layernorm.weight", [h]), (p + "post_attention_layernorm.weight", [h])]
    return spec + [("model.norm.weight", [h]), ("lm_head.weight", [v, h])]


def timed(fn: Any, repeats: int) -> list[Any]:
    fn()  # warm-up
    return [fn() for _ in range(repeats)]


def start(model_dir: str, tp: int, pp: int) -> Any:
    from vllm import LLM

    workers = tp * pp
    kwargs: dict[str, Any] = {}
    if workers > 1:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % (os.cpu_count() or 1)) for i in range(workers))
        kwargs["distributed_executor_backend"] = "mp"
    llm = LLM(
        model=model_dir, load_format="dummy", skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16", max_model_len=128,
        max_num_seqs=1, seed=0, worker_extension_cls="vllm_bench_worker.BenchExtension",
        tensor_parallel_size=tp, pipeline_parallel_size=pp, **kwargs,
    )  # fmt: skip
    if pp > 1:
        llm.collective_rpc("refit_fix_pp")
    return llm


def memcpy(state: dict[str, torch.Tensor], bucket_bytes: int) -> float:
    """Seconds of one copy of every tensor into a bucket-sized buffer (the shared-memory ceiling)."""
    buf = torch.ones(bucket_bytes, dtype=torch.uint8)  # touched: page faults are not the copy's cost
    t0 = time.perf_counter()
    off = 0
    for t in state.values():
        src = t.reshape(-1).view(torch.uint8)
        while src.numel():  # a tensor larger than what is left of the bucket goes in pieces
            if off == bucket_bytes:
                off = 0
            n = min(src.numel(), bucket_bytes - off)
            ctypes.memmove(buf.data_ptr() + off, src.data_ptr(), n)  # the fastest host copy here (refit.pack uses it too)
            src, off = src[n:], off + n
    return time.perf_counter() - t0


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def stages(reports: list[Any]) -> dict[str, float]:
    """Median per stage over the timed pushes."""
    keys = sorted({k for r in reports for k in r})
    return {k: round(med([r.get(k, 0.0) for r in reports]), 4) for k in keys}


def run(a: argparse.Namespace) -> dict[str, Any]:
    from refit import Refitter
    from refit.adapters.vllm import VllmEngine

    cfg = llama_config(a)
    model_dir = tempfile.mkdtemp(prefix="bench-vllm-")
    Path(model_dir, "config.json").write_text(json.dumps(cfg))
    spec = spec_of(cfg)
    state = bench_state(spec, a.seed)
    total = sum(t.numel() * t.element_size() for t in state.values())
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in state.values()])
    load = os.getloadavg()
    llm = start(model_dir, a.tp, a.pp)
    handle = VllmEngine(llm, rpc_timeout=900)
    threads = [r["threads"] for r in llm.collective_rpc("bench_threads")]
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "tensors": len(state), "bytes": total, "tp": a.tp, "pp": a.pp, "num_buffers": a.num_buffers, "worker_threads": threads,
        "loadavg_before": [round(x, 2) for x in load], "cpus": os.cpu_count(), "torch": torch.__version__, "configs": [],
    }  # fmt: skip
    try:
        for mib in a.bucket_mib:
            bucket = mib << 20
            row: dict[str, Any] = {"bucket_mib": mib}
            for mode in ["all", "bucket", "views"] + (["tensor"] if a.per_tensor else []):
                got = [llm.collective_rpc("bench_reload_modes", args=(spec, a.seed, mode, bucket)) for _ in range(a.repeats + 1)][1:]
                row[f"reload_{mode}"] = med([max(g["seconds"] for g in rep) for rep in got])
                row[f"reload_{mode}_range"] = [min(max(g["seconds"] for g in rep) for rep in got), max(max(g["seconds"] for g in rep) for rep in got)]
            got = [llm.collective_rpc("bench_refit_local", args=(spec, a.seed, bucket))[0] for _ in range(a.repeats + 1)][1:]
            if a.profile:
                for name, text in llm.collective_rpc("bench_profile", args=(spec, a.seed, bucket))[0].items():
                    print(f"--- profile of {name} in the worker, bucket {mib} MiB\n{text}", flush=True)
            row["refit_local"] = med([g["seconds"] for g in got])
            row["refit_local_apply"] = med([g["receiver"].get("apply", 0.0) for g in got])
            raws = timed(lambda b=bucket: raw_zmq(llm, flat, b, 120.0), a.repeats)
            row["raw_zmq"] = med([x.seconds for x in raws])
            row["raw_zmq_cpu"] = med([x.cpu for x in raws])
            row["raw_zmq_floor"] = med([x.floor(row["reload_all"], a.tp * a.pp) or 0.0 for x in raws])
            row["memcpy"] = med(timed(lambda b=bucket: memcpy(state, b), a.repeats))
            for transport in a.transports:
                sender: list[dict[str, float]] = []
                receiver: list[dict[str, float]] = []
                totals: list[float] = []
                copied0 = handle.rpc("bench_copied")[0]["copied"]
                with Refitter(transport, engine=handle, bucket_bytes=bucket, num_buffers=a.num_buffers, timeout=600) as refitter:
                    for k in range(a.repeats + 1):
                        t0 = time.perf_counter()
                        report = refitter.push(state)
                        seconds = time.perf_counter() - t0
                        if k:
                            totals.append(seconds)
                            sender.append(dict(report.seconds))
                            receiver.append(dict(max(report.receivers, key=lambda r: r.seconds.get("total", 0.0)).seconds))
                copied = (handle.rpc("bench_copied")[0]["copied"] - copied0) / (a.repeats + 1)
                row[transport] = {
                    "push": med(totals),
                    "range": [min(totals), max(totals)],
                    "sender": stages(sender),
                    "receiver": stages(receiver),
                    "copied_bytes_per_push": int(copied),
                }
            out["configs"].append(row)
            print(table({**out, "configs": [row], "loadavg_after": [round(x, 2) for x in os.getloadavg()]}), flush=True)
    finally:
        out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        try:
            handle.close()
        finally:
            llm.llm_engine.engine_core.shutdown()
    return out


CEILING = {"zmq": "raw_zmq", "cuda_ipc": "memcpy", "nccl": None}


def table(out: dict[str, Any]) -> str:
    lines = [
        f"vLLM apply: {out['tensors']} tensors, {out['bytes'] / 1e9:.2f} GB bf16, TP={out['tp']} PP={out['pp']}, "
        f"{out['num_buffers']} buffers, {out['cpus']} CPUs (worker torch threads {out['worker_threads']}), "
        f"load average {out['loadavg_before']} before, {out['loadavg_after']} after, {out['date']}",
    ]
    for row in out["configs"]:
        lines.append(f"\nbucket {row['bucket_mib']} MiB (median of the timed runs, seconds)")
        lines.append(
            f"  vLLM reload, one load_weights(all)   {row['reload_all']:.3f}  ({row['reload_all_range'][0]:.3f}-{row['reload_all_range'][1]:.3f})"
        )
        lines.append(f"  vLLM reload, one load_weights/bucket {row['reload_bucket']:.3f}")
        lines.append(f"    the same, tensors views of buckets {row['reload_views']:.3f}")
        if "reload_tensor" in row:
            lines.append(f"  vLLM reload, one load_weights/tensor {row['reload_tensor']:.3f}")
        lines.append(f"  refit in the worker (local): push    {row['refit_local']:.3f}, of which apply {row['refit_local_apply']:.3f}")
        lines.append(
            f"  raw pyzmq, same frames, loopback     {row['raw_zmq']:.3f}, {row['raw_zmq_cpu']:.3f} CPU-s (sender + receiver): "
            f"floor {row['raw_zmq_floor']:.2f} (that CPU work on the CPUs the workers are not pinned to, / max(reload, raw))"
        )
        lines.append(f"  memcpy of the bytes (shared memory)  {row['memcpy']:.3f}")
        lines.append(f"  {'transport':10s} {'push':>7s} {'range':>13s} {'ceiling':>8s} {'ratio':>6s}  stages (trainer | worker), copied per push")
        for transport in ("zmq", "cuda_ipc", "nccl"):
            r = row.get(transport)
            if r is None:
                continue
            key = CEILING[transport]
            ceiling = max(row["reload_all"], row[key]) if key else row["reload_all"]
            ratio = r["push"] / ceiling
            r["ceiling"], r["ratio"] = ceiling, ratio
            st = ", ".join(f"{k} {v:.3f}" for k, v in r["sender"].items() if v >= 0.0005 and k != "total")
            rt = ", ".join(f"{k} {v:.3f}" for k, v in r["receiver"].items() if v >= 0.0005 and k != "total")
            lines.append(
                f"  {transport:10s} {r['push']:7.3f} {r['range'][0]:6.3f}-{r['range'][1]:6.3f} {ceiling:8.3f} {ratio:6.2f}  {st} | {rt}, "
                f"{r['copied_bytes_per_push'] / 1e6:.0f} MB"
            )
        lines.append("  ratio = push / max(vLLM reload one call, raw transport); nccl (gloo): / vLLM reload (no raw gloo figure)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=3456)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--bucket-mib", type=int, nargs="+", default=[512], help="bucket (and raw frame) sizes, MiB")
    p.add_argument("--transports", nargs="+", default=["zmq", "cuda_ipc", "nccl"], choices=["zmq", "cuda_ipc", "nccl"])
    p.add_argument("--num-buffers", type=int, default=2, help="refit's staging buffers in flight")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--per-tensor", action="store_true", help="also time vLLM's reload with one load_weights per tensor")
    p.add_argument("--profile", action="store_true", help="print a cProfile of vLLM's reload and refit's in-worker push")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the figures here")
    a = p.parse_args()
    out = run(a)
    print("\n" + table(out), flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
