"""One push through vLLM's layer-wise reload, and what refit adds so the engine serves exactly
what was pushed.

vLLM's ``initialize_layerwise_reload`` / ``finalize_layerwise_reload`` restore every layer to
checkpoint format, load, re-run each completed layer's post-load step and copy the results into
the tensors the kernels hold. Three gaps of vLLM 0.32 on an update (each found by generation
against HF, each with a test in tests/vllm):

* **Unquantized fused MoE** (``UnquantizedFusedMoEMethod``): its post-load step runs the
  experts' own ``process_weights_after_loading`` (the CPU grouped-GEMM prepack) only when
  ``moe_kernel`` is None, i.e. on the first load; on an update the unpacked weights are copied
  into the packed kernel tensors and the engine serves garbage. Here ``moe_kernel`` is set aside
  for the reload, so an updated MoE layer is processed exactly as on the first load (a new
  kernel, prepacked weights); layers the push did not touch get their kernel back.
* **Tied embeddings**: a model that ties ``lm_head`` to ``embed_tokens`` holds one parameter in
  two modules; the CPU backend packs it into lm_head's GEMM kernel (``cpu_linear``) only when
  lm_head itself is processed, which a reload of ``embed_tokens`` does not do. Here every module
  sharing a parameter with a reloaded module that was not itself reloaded has its quantization
  method's post-load step run again (``UnquantizedEmbeddingMethod``: re-pack from the new value).
* **A failure inside the reload** (a layer's post-load step raising, a load failing half-way)
  leaves vLLM's layers on the meta device or half-processed, and every later push fails the
  same way: the engine is bricked. Here every layer still waiting in the reload gets back the
  tensors its kernels hold (old values for a layer the push had not finished, new ones for a
  layer it had), attention layers' float copies of their scales are re-read from their
  buffers, and the reload state is cleared: the engine is torn (each layer whole, some old and
  some new) and the next push reloads normally.
* **Log noise**: vLLM warns ``<Layer>: Failed to load weights`` for every layer a reload did not
  fill (``RotaryEmbedding`` on every push, untouched layers on a partial push). refit checks
  coverage itself (whole layers, every name resolved), so the warning is dropped for layers the
  push did not touch and kept for a layer it loaded into.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import UnquantizedFusedMoEMethod
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload
from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

from refit.adapters.vllm_kv import sync_scale_copies
from refit.adapters.vllm_private import LOADING_LAYERS, place_kernel_tensors


class LayerwiseReload:
    """vLLM's layer-wise reload for one push at a time.

    Args:
        model: the worker's model.
        model_config: its ``ModelConfig`` (attention post-load steps need it).
        aliases: qualified parameter name -> the first name of the same parameter (tied).
    """

    def __init__(self, model: torch.nn.Module, model_config: Any, aliases: dict[str, str]) -> None:
        self.model = model
        self.model_config = model_config
        self.aliases = aliases
        self.active = False
        self.touched: set[str] = set()  # modules this push loaded into
        self._moe_kernels: dict[int, tuple[Any, Any]] = {}  # id(quant_method) -> (quant_method, its kernel)

    def begin(self) -> None:
        """Start a reload (at the first loaded tensor of a push)."""
        if self.active:
            return
        self.touched = set()
        for mod in self.model.modules():
            qm = getattr(mod, "quant_method", None)
            if isinstance(qm, UnquantizedFusedMoEMethod) and qm.moe_kernel is not None:
                self._moe_kernels[id(qm)] = (qm, qm.moe_kernel)
                qm.moe_kernel = None  # so a reloaded layer takes the first-load path (see module doc)
        initialize_layerwise_reload(self.model)
        self.active = True

    def finish(self) -> None:
        """Finalize the reload: untouched layers get their tensors back, touched ones were
        processed; then the MoE kernels and tied modules are put right."""
        if not self.active:
            return
        self.active = False
        for qual, mod in self.model.named_modules():
            info = get_layerwise_info(mod)
            if info.can_load() and info.load_numel <= 0 and qual not in self.touched:
                info.load_numel_total = 0  # not a failure: this push did not carry the layer
        try:
            finalize_layerwise_reload(self.model, self.model_config)
        except BaseException:
            self._put_back()
            raise
        finally:
            self._restore_moe_kernels()
        self._repack_tied()

    def rescue(self) -> None:
        """End a reload that failed or was abandoned without running any post-load step: every
        layer still waiting gets its kernels' tensors back (see the module doc)."""
        if not self.active:
            return
        self.active = False
        try:
            self._put_back()
        finally:
            self._restore_moe_kernels()

    def _put_back(self) -> None:
        if hasattr(self.model, "_original_do_torchao_reload"):
            self.model._do_torchao_reload = self.model._original_do_torchao_reload
        for mod in self.model.modules():
            info = get_layerwise_info(mod)
            if not info.can_load():
                continue
            if info.kernel_tensors is not None:
                place_kernel_tensors(mod, info)
            info.reset()
            sync_scale_copies(mod)
        LOADING_LAYERS.clear()

    def _restore_moe_kernels(self) -> None:
        for qm, kernel in self._moe_kernels.values():
            if qm.moe_kernel is None:  # not reloaded: keep the kernel it had
                qm.moe_kernel = kernel
        self._moe_kernels.clear()

    def _repack_tied(self) -> None:
        done: set[int] = set()
        for alias, first in self.aliases.items():
            owner, other = first.rpartition(".")[0], alias.rpartition(".")[0]
            if owner not in self.touched or other in self.touched:
                continue
            mod = self.model.get_submodule(other)
            qm = getattr(mod, "quant_method", None)
            if mod is self.model.get_submodule(owner) or id(mod) in done or qm is None or not hasattr(qm, "process_weights_after_loading"):
                continue
            done.add(id(mod))
            qm.process_weights_after_loading(mod)
