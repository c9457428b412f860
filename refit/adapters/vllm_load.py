"""Loading an accepted push into a vLLM model: one ``load_weights`` call per bucket, and a copy
only of what vLLM still holds when the bucket's memory may be written again.

Why per bucket: each ``model.load_weights`` call builds the model's weights loader and walks
its modules; called once per tensor that costs more than the copies themselves (1.0 GB in 147
tensors on a 2-core CPU: 1.14-1.35 s per tensor, 0.67-0.71 s per 512 MiB bucket, 0.71-0.80 s
for vLLM's own single call). A bucket's tensors go in one call, in the order they were packed.

Why copies are rare: vLLM's layer-wise reload does not load a tensor when it arrives; it keeps a
reference until every tensor of that layer has arrived, then loads them all into the
re-materialized layer (a copy it makes anyway) and runs the layer's post-load step. So a view
of the bucket is enough while the layer completes inside the bucket, or when the bucket's
memory is never written again (a received zmq frame, or the bytes of an RPC, kept alive by the
views). Only when the bucket is a staging buffer the transport reuses (shared memory, gloo, a
pinned slot) are the views vLLM still holds after the call copied: the tensors of a layer that
spans buckets, and attention scales, which vLLM keeps until the end of the push. Rejected: a
copy of every tensor (0.25-0.37 s per GB, protecting nothing on the zmq CPU path) and predicting
from the plan which layers span buckets (vLLM's own bookkeeping says which views it holds).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

from refit.adapters.vllm_reload import LayerwiseReload
from refit.errors import ResolveError


class BucketLoads:
    """The loads of one bucket, run as one ``model.load_weights`` call at the bucket's end.

    Args:
        model: the worker's model.
        reload: the layer-wise reload of the push (begun at the first load).
        context: a factory of the context vLLM's loaders need.
    """

    def __init__(self, model: torch.nn.Module, reload: LayerwiseReload, context: Callable[[], AbstractContextManager[Any]]) -> None:
        self.model = model
        self.reload = reload
        self.context = context
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.targets: list[set[str]] = []  # per pending entry: the tensors (module.attr) it fills
        self.copied = 0  # bytes copied out of reused buckets so far (benchmarks read it)

    def add(self, name: str, t: torch.Tensor, targets: set[str]) -> None:
        """Queue ``name`` (a checkpoint name vLLM's ``load_weights`` takes) for this bucket."""
        self.pending.append((name, t))
        self.targets.append(targets)

    def flush(self, bucket: torch.Tensor | None, keep_views: bool) -> None:
        """Load the queued tensors; then, unless ``keep_views`` (the bucket's memory is never
        written again), copy every view of ``bucket`` that vLLM still holds.

        Raises:
            ResolveError: vLLM loaded nothing for a name the probe accepted (the engine is torn).
        """
        if not self.pending:
            return
        pending, targets = self.pending, self.targets
        self.pending, self.targets = [], []
        self.reload.begin()
        self.reload.touched |= {t.rpartition(".")[0] for ts in targets for t in ts}
        with self.context(), torch.no_grad():
            loaded = self.model.load_weights(pending)  # type: ignore[operator]
        if loaded is not None:  # every name must have reached a module it was probed into
            modules = {n.rpartition(".")[0] for n in loaded}
            missed = [name for (name, _), ts in zip(pending, targets, strict=True) if ts and modules.isdisjoint(t.rpartition(".")[0] for t in ts)]
            if missed:
                raise ResolveError(f"{', '.join(missed[:5])}: vLLM loaded nothing for names it accepted when probed; the engine is torn")
        if not keep_views and bucket is not None:
            self._copy_held_views(bucket)

    def _copy_held_views(self, bucket: torch.Tensor) -> None:
        storage = bucket.untyped_storage().data_ptr()
        for module in self.reload.touched:  # only a layer this push loaded into holds views
            for _, args in get_layerwise_info(self.model.get_submodule(module)).loaded_weights:
                for key, value in args.arguments.items():
                    if isinstance(value, torch.Tensor) and value.device == bucket.device and value.untyped_storage().data_ptr() == storage:
                        args.arguments[key] = value.clone()
                        self.copied += value.numel() * value.element_size()

    def clear(self) -> None:
        """Drop the queued loads without running them (a push was abandoned)."""
        self.pending, self.targets = [], []
