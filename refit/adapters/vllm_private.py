"""Every vLLM name refit imports that is not vLLM's public API, in this one module, each with
where it lives in vLLM and the version it was checked against: **vllm 0.32.0** (the version CI
tests, the floor of the ``vllm`` extra).

A name is public when it is in its module's ``__all__`` or is documented user API; the adapter
imports those where it uses them. Every other vLLM name is imported here and nowhere else in
refit, so a vLLM upgrade that moves one breaks one import, and ``tests/test_vllm_private.py``
imports each of them from the installed vLLM and names the one that moved (it also checks that
no other refit module imports a private vLLM name).

Private names imported here (not in their module's ``__all__``; a module without one counts as
private):

| name | where it lives in vLLM 0.32.0 | used by |
|---|---|---|
| `get_tensor_model_parallel_world_size` | `vllm.distributed` (defined in `vllm.distributed.parallel_state`) | vllm_resolve |
| `get_pp_group` | `vllm.distributed.parallel_state` | vllm_worker |
| `LinearBase` | `vllm.model_executor.layers.linear` | vllm_probe |
| `ParallelLMHead`, `VocabParallelEmbedding` | `vllm.model_executor.layers.vocab_parallel_embedding` | vllm_tied |
| `LOADING_LAYERS`, `_place_kernel_tensors` | `vllm.model_executor.model_loader.reload.layerwise` | vllm_reload |
| `SKIP_LOAD_TENSORS` | `vllm.model_executor.model_loader.reload.meta` | vllm_shadow |
| `default_weight_loader` | `vllm.model_executor.model_loader.weight_utils` | vllm_shadow |
| `maybe_remap_kv_scale_name` | `vllm.model_executor.model_loader.weight_utils` | vllm_kv |
| `PPMissingLayer`, `StageMissingLayer`, `get_pp_missing_layer_names` | `vllm.model_executor.models.utils` | vllm_resolve |

Public vLLM names imported where they are used: `vllm.LLM`, `vllm.SamplingParams` (demos);
`vllm.config.set_current_vllm_config`; `vllm.model_executor.layers.attention.is_deferred_attention_layer`;
`vllm.model_executor.layers.fused_moe.UnquantizedFusedMoEMethod`; `initialize_layerwise_reload`,
`finalize_layerwise_reload` (`vllm.model_executor.model_loader.reload`), `get_layerwise_info`
(`...reload.layerwise`), `restore_layer_refs` (`...reload.sanitize`): all in their modules'
`__all__`; and the documented `LLM.collective_rpc` with `worker_extension_cls`.

Private attributes refit relies on: conventions of vLLM's objects, not importable names, so no
import checks them; the vLLM integration tests (`tests/vllm`) exercise each one.

| attribute | on | used by |
|---|---|---|
| `hf_to_vllm_mapper.map_name(name)` | the model class (HF name -> vLLM name) | vllm_resolve, vllm_kv |
| `load_weights(iterable of (name, tensor))` returning the loaded names | the model | vllm_load, vllm_probe |
| `packed_modules_mapping` | the model class (fused module -> shard names) | vllm_kv |
| `weight_loader`, `_weight_loader`, `weight_loader_numel` | parameters (vLLM's loader convention) | vllm_shadow |
| `online_process_loader` and its `__wrapped__` | a weight loader the reload wrapped | vllm_shadow |
| `restore_metadata`, `loaded_weights` | `LayerwiseInfo` (from `get_layerwise_info`) | vllm_shadow, vllm_load |
| `can_load()`, `load_numel`, `load_numel_total`, `kernel_tensors`, `reset()` | `LayerwiseInfo` | vllm_reload |
| `_do_torchao_reload`, `_original_do_torchao_reload` | the model, during a reload | vllm_reload |
| `quant_method.process_weights_after_loading(layer)` | layers | vllm_reload |
| `moe_kernel` | `UnquantizedFusedMoEMethod` | vllm_reload |
| `tp_rank`, `tp_size` | `LinearBase` layers and their parameters | vllm_probe |
| `_k_scale`, `_v_scale` and their `_float` / `_cpu` copies | attention layers | vllm_kv |
| `model_config.hf_text_config.tie_word_embeddings` | `VllmConfig` | vllm_tied |
| `rank`, `vllm_config`, `model_runner.get_model()` | the worker the extension is mixed into | vllm_worker |
| `intermediate_tensors`, `max_num_tokens`, `model_config`, `device` | the worker's `model_runner` (the CPU PP fix) | vllm_worker |
| `make_empty_intermediate_tensors(...)` | the model of a PP stage | vllm_worker |
| `llm_engine.engine_core.shutdown()` | `vllm.LLM` | demos.tiny_vllm |
"""

from __future__ import annotations

from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.distributed.parallel_state import get_pp_group
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.reload.layerwise import LOADING_LAYERS, _place_kernel_tensors
from vllm.model_executor.model_loader.reload.meta import SKIP_LOAD_TENSORS
from vllm.model_executor.model_loader.weight_utils import default_weight_loader, maybe_remap_kv_scale_name
from vllm.model_executor.models.utils import PPMissingLayer, StageMissingLayer, get_pp_missing_layer_names

CHECKED_AGAINST = "0.32.0"
"""The vLLM version every name above was checked against."""

place_kernel_tensors = _place_kernel_tensors
"""vLLM's ``_place_kernel_tensors(layer, info)``: put back the tensors a layer's kernels held
before a reload (used to rescue a failed reload, see ``vllm_reload``)."""

__all__ = [
    "CHECKED_AGAINST",
    "LOADING_LAYERS",
    "SKIP_LOAD_TENSORS",
    "LinearBase",
    "PPMissingLayer",
    "ParallelLMHead",
    "StageMissingLayer",
    "VocabParallelEmbedding",
    "default_weight_loader",
    "get_pp_group",
    "get_pp_missing_layer_names",
    "get_tensor_model_parallel_world_size",
    "maybe_remap_kv_scale_name",
    "place_kernel_tensors",
]
