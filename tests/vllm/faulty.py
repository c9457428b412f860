"""A worker extension that fails on purpose: one armed failure per push phase, to prove that a
push failing anywhere never leaves a vLLM engine unusable (tests/vllm/test_never_bricked.py).

Used as ``worker_extension_cls="tests.vllm.faulty.FaultyExtension"``; test code only.
"""

from __future__ import annotations

from typing import Any

from refit.adapters.vllm import RefitWorkerExtension, _replies

PHASES = ("resolve", "apply", "post_load")


class InjectedFault(RuntimeError):
    """The failure a test armed."""


def _once(what: str, restore: Any) -> Any:
    def fail(*args: Any, **kwargs: Any) -> Any:
        restore()
        raise InjectedFault(f"injected failure: {what}")

    return fail


class FaultyExtension(RefitWorkerExtension):
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
