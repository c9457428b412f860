"""Worker side of ``bench_vllm.py``: refit's worker extension plus the two baselines, measured
inside the vLLM worker (a helper module of the benchmark, imported by the worker process).

* ``bench_reload_modes``: vLLM's own in-process reload of the same tensors (``initialize_layerwise_
  reload``, ``model.load_weights`` once with every tensor, or once per bucket, or once per
  tensor, ``finalize_layerwise_reload``), timed inside the worker. The tensors are generated
  here from the same seed as the trainer's, so they are the same values.
* ``bench_zmq_sink`` (inherited from ``refit.bench_vllm_worker``): the raw pyzmq ceiling:
  receive the same bytes in the same frame sizes (``copy=False``) in this worker process, with
  the ZMQ I/O thread placed as refit's receiver places its own; the trainer times first send to
  the worker's one-byte answer.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from refit.bench_vllm_worker import BenchExtension as PackageBench


def bench_state(spec: list[tuple[str, list[int]]], seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Seeded random tensors of ``spec`` (same values in every process)."""
    gen = torch.Generator().manual_seed(seed)
    return {name: (0.02 * torch.randn(shape, generator=gen)).to(dtype) for name, shape in spec}


def packed_views(group: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """``group``'s tensors copied into one byte buffer, as views of it (a bucket as received)."""
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for _, t in group])
    out, offset = [], 0
    for name, t in group:
        n = t.numel() * t.element_size()
        out.append((name, flat[offset : offset + n].view(t.dtype).view(t.shape)))
        offset += n
    return out


class BenchExtension(PackageBench):
    """``refit bench --engine vllm``'s worker extension (refit's own plus the raw pyzmq sink)
    with this script's baselines."""

    def bench_reload_modes(self, spec: list[tuple[str, list[int]]], seed: int, mode: str, bucket_bytes: int) -> dict[str, Any]:
        """Seconds of one reload of the seeded state by vLLM's own path; ``mode``: ``all`` (one
        ``load_weights`` call), ``bucket`` (one per ``bucket_bytes`` of tensors), ``views`` (as
        ``bucket``, each tensor a view of its bucket's packed bytes, as a push hands them to
        vLLM; packed before the clock starts), ``tensor``."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        state = getattr(self, "_script_state", None)
        if state is None or getattr(self, "_bench_seed", None) != seed:
            state = self._script_state = bench_state(spec, seed)
            self._bench_seed = seed
        items = list(state.items())
        groups: list[list[tuple[str, torch.Tensor]]] = []
        if mode == "all":
            groups = [items]
        elif mode == "tensor":
            groups = [[it] for it in items]
        else:
            size = bucket_bytes + 1
            for it in items:
                n = it[1].numel() * it[1].element_size()
                if size + n > bucket_bytes:
                    groups.append([])
                    size = 0
                groups[-1].append(it)
                size += n
        if mode == "views":
            groups = [packed_views(group) for group in groups]
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        with set_current_vllm_config(self.vllm_config), torch.no_grad():  # type: ignore[attr-defined]
            t0 = time.perf_counter()
            initialize_layerwise_reload(model)
            for group in groups:
                model.load_weights(group)
            t1 = time.perf_counter()
            finalize_layerwise_reload(model, self.model_runner.model_config)  # type: ignore[attr-defined]
            t2 = time.perf_counter()
        return {"seconds": t2 - t0, "load": t1 - t0, "finalize": t2 - t1, "calls": len(groups)}

    def bench_refit_local(self, spec: list[tuple[str, list[int]]], seed: int, bucket_bytes: int) -> dict[str, Any]:
        """One refit push of the seeded state inside this worker (``local`` transport: pack into
        a reused bucket, apply, no bytes cross a process): refit's apply beside vLLM's reload."""
        from refit import Refitter
        from refit.transports.local import LocalSender

        state = getattr(self, "_script_state", None)
        if state is None or getattr(self, "_bench_seed", None) != seed:
            state = self._script_state = bench_state(spec, seed)
            self._bench_seed = seed
        loader = self._refit_loader()
        loader.buckets_stay = False
        t0 = time.perf_counter()
        report = Refitter(LocalSender(loader), bucket_bytes=bucket_bytes).push(state)
        return {"seconds": time.perf_counter() - t0, "receiver": dict(report.receivers[0].seconds)}

    def bench_profile(self, spec: list[tuple[str, list[int]]], seed: int, bucket_bytes: int) -> dict[str, Any]:
        """cProfile text (top functions by own time) of one vLLM reload and one in-worker refit push."""
        import cProfile
        import io
        import pstats

        out = {}
        for name, call in (
            ("reload", lambda: self.bench_reload_modes(spec, seed, "all", bucket_bytes)),
            ("refit", lambda: self.bench_refit_local(spec, seed, bucket_bytes)),
        ):
            prof = cProfile.Profile()
            prof.enable()
            call()
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
            out[name] = text.getvalue()
        return out

    def bench_threads(self) -> dict[str, Any]:
        """The worker's torch threads (vLLM's CPU backend binds them at start)."""
        return {"threads": torch.get_num_threads()}

    def bench_copied(self) -> dict[str, Any]:
        """Bytes refit's loader copied out of reused buckets so far (vllm_load)."""
        loads = getattr(self._refit_loader().resolver, "loads", None)  # None: refit before issue 14
        return {"copied": getattr(loads, "copied", 0)}
