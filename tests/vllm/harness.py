"""A worker extension for tests: failures armed on purpose (one per push phase), to prove that a
push failing anywhere never leaves a vLLM engine unusable (tests/vllm/test_fp8_engines.py).

Used as ``worker_extension_cls="tests.vllm.harness.HarnessExtension"``; test code only.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from refit.adapters.vllm import RefitWorkerExtension
from refit.adapters.vllm_worker import _replies

PHASES = ("resolve", "apply", "post_load")


class InjectedFault(RuntimeError):
    """The failure a test armed."""


def _once(what: str, restore: Any) -> Any:
    def fail(*args: Any, **kwargs: Any) -> Any:
        restore()
        raise InjectedFault(f"injected failure: {what}")

    return fail


class HarnessExtension(RefitWorkerExtension):
    @_replies
    def refit_test_fault(self, phase: str, layer: int = 1) -> dict[str, Any]:
        """Arm one failure for the next push:

        * ``resolve``: resolving a name raises (the push must be refused, nothing loaded);
        * ``apply``: vLLM's post-load processing of layer ``layer``'s QKV projection raises
          while the layer loads (layer 0 may already hold the new weights);
        * ``post_load``: layer ``layer``'s attention post-load step raises in the final step
          of the reload (where vLLM processes KV-cache scales).
        """
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        if phase == "resolve":
            resolver = self._refit_loader().resolver
            resolver._cache.clear()
            original = resolver._resolve
            resolver._resolve = _once("resolve", lambda: setattr(resolver, "_resolve", original))
        elif phase == "apply":
            qm = model.get_submodule(f"model.layers.{layer}.self_attn.qkv_proj").quant_method
            qm.process_weights_after_loading = _once("apply (qkv_proj post-load)", lambda: delattr(qm, "process_weights_after_loading"))
        elif phase == "post_load":
            attn = model.get_submodule(f"model.layers.{layer}.self_attn.attn")
            attn.process_weights_after_loading = _once("post_load (attention)", lambda: delattr(attn, "process_weights_after_loading"))
        else:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        return {}

    @_replies
    def refit_test_quantizers(self, names: list[str]) -> dict[str, Any]:
        """Install a stand-in for a ModelOpt quantizer (a module holding a float32 ``_amax``
        buffer of 0.0) at each qualified vLLM module name, e.g.
        ``model.layers.0.self_attn.attn.k_bmm_quantizer``."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        for name in names:
            parent, _, child = name.rpartition(".")
            quantizer = torch.nn.Module()
            quantizer.register_buffer("_amax", torch.zeros((), dtype=torch.float32))
            model.get_submodule(parent).add_module(child, quantizer)
        return {}

    @_replies
    def refit_test_modelopt(self, step: str) -> dict[str, Any]:
        """ModelOpt's own vLLM support on this worker's model: ``quantize`` (FP8 inputs and
        weights plus the FP8 KV config, ModelOpt's merge helper) and start collecting amax
        statistics (generate meanwhile), then ``calibrated`` (the amax buffers exist)."""
        import modelopt.torch.quantization as mtq
        from modelopt.torch.quantization.model_calib import enable_stats_collection, finish_stats_collection
        from modelopt.torch.quantization.plugins.vllm import disable_compilation

        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        if step == "quantize":
            cfg = mtq.utils.update_quant_cfg_with_kv_cache_quant(copy.deepcopy(mtq.FP8_DEFAULT_CFG), copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"]))
            with disable_compilation(model):
                mtq.quantize(model, cfg, None)
            enable_stats_collection(model)
        elif step == "calibrated":
            finish_stats_collection(model)
        else:
            raise ValueError(f"step must be 'quantize' or 'calibrated', got {step!r}")
        return {"amax": {n: float(b) for n, b in model.named_buffers() if n.endswith("_quantizer._amax")}}
