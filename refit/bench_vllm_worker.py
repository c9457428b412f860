"""Worker side of ``refit bench --engine vllm``: refit's vLLM worker extension plus the two
baselines a push is compared with, measured inside the vLLM worker process.

* ``bench_reload``: vLLM's own in-process reload of the same tensors
  (``initialize_layerwise_reload``, one ``model.load_weights`` with every tensor,
  ``finalize_layerwise_reload``), timed inside the worker. The tensors are made here from the
  same shape and seed as the trainer's (:func:`refit.shapes.make_state`), so they are the same
  values, and they are made before the clock starts.
* ``bench_zmq_bind`` / ``bench_zmq_sink``: the raw pyzmq ceiling into this process: the same
  bytes in refit's frames, received zero-copy and released one by one, on a
  ZMQ I/O thread placed as refit's receiver places its own (``io_cpus="auto"``).

Start the engine with ``worker_extension_cls=EXTENSION`` (this module's class); pushes then go
through refit's own extension methods, which this class inherits.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from refit.adapters.vllm import RefitWorkerExtension
from refit.shapes import ModelShape, make_state

EXTENSION = "refit.bench_vllm_worker.BenchExtension"


class BenchExtension(RefitWorkerExtension):
    """:class:`~refit.adapters.vllm.RefitWorkerExtension` with the benchmark's baselines."""

    _bench_key: Any = None
    _bench_weights: dict[str, torch.Tensor]
    _bench_sock: Any = None
    _bench_ctx: Any = None

    def _bench_state(self, shape: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
        key = (tuple(sorted((k, str(v)) for k, v in shape.items())), seed)
        if getattr(self, "_bench_key", None) != key:
            self._bench_weights = make_state(ModelShape(**shape), seed=seed)[0]
            self._bench_key = key
        return self._bench_weights

    def bench_reload(self, shape: dict[str, Any], seed: int) -> dict[str, Any]:
        """Seconds of one reload of the seeded weights of ``shape`` by vLLM's own path: one
        ``load_weights`` call with every tensor between vLLM's layer-wise reload begin and end."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        items = list(self._bench_state(shape, seed).items())
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        with set_current_vllm_config(self.vllm_config), torch.no_grad():  # type: ignore[attr-defined]
            t0 = time.perf_counter()
            initialize_layerwise_reload(model)
            model.load_weights(items)
            t1 = time.perf_counter()
            finalize_layerwise_reload(model, self.model_runner.model_config)  # type: ignore[attr-defined]
            t2 = time.perf_counter()
        return {"seconds": t2 - t0, "load": t1 - t0, "finalize": t2 - t1}

    def bench_drop_state(self) -> dict[str, Any]:
        """Free the baseline's copy of the weights."""
        self._bench_weights, self._bench_key = {}, None
        return {}

    def bench_zmq_bind(self) -> dict[str, Any]:
        """Bind a PAIR socket on a free loopback port for the raw ceiling; returns its address."""
        import zmq

        from refit.transports.io_threads import io_context, io_cpus

        # the I/O thread runs where refit's zmq receiver puts its own (``io_cpus="auto"``)
        cpus = io_cpus("auto")
        self._bench_ctx = io_context(cpus) if cpus else None
        sock: Any = (self._bench_ctx or zmq.Context.instance()).socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        self._bench_sock = sock
        return {"address": f"tcp://127.0.0.1:{port}"}

    def bench_zmq_sink(self, frames: int, timeout: float) -> dict[str, Any]:
        """Receive ``frames`` frames zero-copy (each wait at most ``timeout`` s) and release each
        at once, then answer one byte (the first worker only: the trainer connects to it).
        ``cpu``: the CPU-seconds this process spent meanwhile (its ZMQ I/O thread's included)."""
        import zmq

        sock = self._bench_sock
        if getattr(self, "rank", 0) != 0:
            return {"bytes": 0, "cpu": 0.0}
        got, cpu0 = 0, time.process_time()
        for _ in range(frames):
            if not sock.poll(int(timeout * 1000), zmq.POLLIN):  # a frame or the timeout
                return {"bytes": got, "error": f"no frame within {timeout} s"}
            got += len(sock.recv(copy=False).buffer)  # released at once, as a push releases applied buckets
        sock.send(b"k")
        return {"bytes": got, "cpu": time.process_time() - cpu0}

    def bench_zmq_close(self) -> dict[str, Any]:
        """Close the raw ceiling's socket."""
        sock = getattr(self, "_bench_sock", None)
        if sock is not None:
            sock.close()
            self._bench_sock = None
        ctx = getattr(self, "_bench_ctx", None)
        if ctx is not None:
            ctx.term()
            self._bench_ctx = None
        return {}
