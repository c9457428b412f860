"""The resolver's shadow of a vLLM model: checkpoint-format meta tensors whose weight loaders
record each call instead of loading.

Why a shadow: the live tensors may have been repacked by the backend (CPU oneDNN: empty
``[0]`` weights) or deleted by a quantization method (consumed ``k_scale`` parameters), but
vLLM recorded every layer's checkpoint-format tensors (as meta tensors) when it built the
model. Swapping those in for a moment lets the model's own ``load_weights`` run on a meta
tensor of the pushed shape: every recorded call names the target parameter, its shard id and
how much was written, and no byte of the model is read or written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

from refit.adapters.vllm_private import SKIP_LOAD_TENSORS, default_weight_loader
from refit.adapters.vllm_reads import CopyTrace, Reads


@dataclass(frozen=True)
class Hit:
    """One weight-loader call the probe recorded."""

    module: str  # qualified name of the module that owns the target tensor
    attr: str  # the tensor's attribute name on that module
    shard: str  # shard / expert ids the loader was called with ("" if none)
    numel: int  # elements the loader wrote

    @property
    def key(self) -> str:
        """``module.attr``, with ``[shard]`` when the loader was called with shard or expert ids."""
        return f"{self.module}.{self.attr}" + (f"[{self.shard}]" if self.shard else "")


@dataclass
class Probe:
    """What one probe of a name found: the loader calls, vLLM's error, what was read."""

    hits: list[Hit] = field(default_factory=list)
    error: str = ""
    reads: Reads = field(default_factory=Reads)  # what the loaders read of the probe input, every TP rank
    shape_problem: str = ""
    reached: list[tuple[str, str]] = field(default_factory=list)  # (module, attr) whose loader was called, even if it raised


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor with ``t``'s shape, strides, class and attributes (weight_loader etc.)."""
    m = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="meta")
    m.__class__ = t.__class__
    m.__dict__ = dict(t.__dict__)
    return m


def _shard_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Printable shard / expert ids of a loader call (everything but the two tensors)."""
    parts = [repr(a) for a in args[2:] if not isinstance(a, torch.Tensor)]
    parts += [f"{k}={v!r}" for k, v in sorted(kwargs.items()) if not isinstance(v, torch.Tensor) and k != "return_success"]
    return ",".join(parts)


class Shadow:
    """Checkpoint-format meta view of a model whose loaders record instead of load."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.hits: list[Hit] = []
        self.reached: list[tuple[str, str]] = []  # loaders called by the probe in progress, even those that raised
        self.source: torch.Tensor | None = None  # the probe input of the probe in progress
        self.reads = Reads()
        self.tensors: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        for qual, mod in model.named_modules(remove_duplicate=False):
            if id(mod) in self.tensors:
                continue
            params, buffers = self._model_format(mod)
            for attr, t in {**params, **buffers}.items():
                if t is not None:
                    self._record(qual, attr, t, mod)
            self.tensors[id(mod)] = (params, buffers)

    @staticmethod
    def _model_format(mod: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        # vLLM recorded each layer's checkpoint-format tensors (as meta tensors) when it built
        # the model; live tensors may since have been repacked (CPU: empty [0] weights) or
        # deleted (consumed k_scale parameters). Tensors created later are taken live.
        rec_p, rec_b = get_layerwise_info(mod).restore_metadata
        # None entries stay None (e.g. an unused `_expert_map`): loaders test for them.
        params = {n: None if t is None else _meta_like(t) for n, t in {**mod._parameters, **rec_p}.items()}
        buffers = {n: None if t is None else _meta_like(t) for n, t in {**mod._buffers, **rec_b}.items()}
        for t in (*params.values(), *buffers.values()):
            if t is not None:
                restore_layer_refs(t, mod)  # re-bind loaders vLLM detached from the layer
        return params, buffers  # type: ignore[return-value]

    def _record(self, qual: str, attr: str, t: torch.Tensor, mod: torch.nn.Module) -> None:
        original: Callable[..., Any] = getattr(t, "weight_loader", None) or default_weight_loader
        while getattr(original, "__name__", "") == "online_process_loader":  # a reload's wrapper
            original = original.__wrapped__  # type: ignore[attr-defined]
        hits = self.hits
        shadow = self

        def recording_loader(*args: Any, **kwargs: Any) -> Any:
            shadow.reached.append((qual, attr))
            with CopyTrace(shadow.source, shadow.reads) as count:
                ret = original(*args, **kwargs)
            cap = getattr(t, "weight_loader_numel", t.numel())
            hits.append(Hit(qual, attr, _shard_of(args, kwargs), min(count.numel, cap)))
            return ret

        try:
            t.weight_loader = recording_loader  # type: ignore[attr-defined]
        except AttributeError:  # a parameter class with a read-only loader property
            t._weight_loader = recording_loader  # type: ignore[attr-defined]

    @contextmanager
    def active(self) -> Iterator[None]:
        """Swap the shadow in (whole ``_parameters`` / ``_buffers`` dicts), then back."""
        saved = []
        for mod in self.model.modules():
            shadow = self.tensors.get(id(mod))
            if shadow is None:
                continue
            saved.append((mod, mod._parameters, mod._buffers))
            mod._parameters, mod._buffers = dict(shadow[0]), dict(shadow[1])  # type: ignore[arg-type]
        try:
            yield
        finally:
            for mod, p, b in saved:
                mod._parameters, mod._buffers = p, b

    def target(self, module: str, attr: str) -> torch.Tensor:
        """The checkpoint-format meta tensor ``module.attr``."""
        params, buffers = self.tensors[id(self.model.get_submodule(module))]
        return {**params, **buffers}[attr]

    def layer_size(self, module: str) -> int:
        """Elements vLLM's layer-wise reload waits for before it processes ``module``."""
        mod = self.model.get_submodule(module)
        params, buffers = self.tensors[id(mod)]
        return sum(
            getattr(t, "weight_loader_numel", t.numel()) for n, t in {**params, **buffers}.items() if t is not None and n not in SKIP_LOAD_TENSORS
        )
