"""Resolve HF-style names against a live vLLM model, using the model's own loading code.

How a name is resolved. vLLM already knows, per model, how a checkpoint name becomes a
parameter: its ``hf_to_vllm_mapper``, the q/k/v and gate/up stacking (kept in the mapper for
some models, in a ``stacked_params_mapping`` inside ``load_weights`` for others), MoE expert
mappings, KV-scale renames (``maybe_remap_kv_scale_name``), tied embeddings and PP ownership.
Rather than re-deriving any of that in tables (which drift with every vLLM release), the
resolver *probes*: it swaps a shadow of the model into place whose tensors are meta tensors
in checkpoint ("model") format and whose ``weight_loader`` s record each call, then runs the
model's own ``load_weights`` on one meta tensor of the pushed shape. Each recorded call names a
target parameter, its shard id / expert id, and how many elements the loader wrote (running
the real loader on meta tensors also runs its shape checks). No byte of the model is read or
written, and the shadow is swapped out again before ``resolve`` returns.

Classification:

* LOCAL: the probe reached at least one weight loader without error. Loading later goes
  through ``model.load_weights`` with that name (one call per bucket), so what is loaded is
  what was probed.
* REMOTE: the name (after the model's mapper) lies under a ``PPMissingLayer`` of this stage
  and the same name with a locally present sibling layer index probes fine (so a misspelled
  name under a remote layer is still refused here).
* UNKNOWN: anything else, with the reason (the probe's error, or "no loader took it").

Where each part lives: the shadow (``vllm_shadow``), probing as every tensor-parallel rank
and the exact-shape check (``vllm_probe``, ``vllm_reads``), tied embeddings (``vllm_tied``),
unquantized KV-cache scales and ModelOpt amax buffers (``vllm_kv``), loading per bucket
(``vllm_load``) and vLLM's layer-wise reload with what refit adds to it (``vllm_reload``).

Why layer-wise reload: the CPU backend repacks linear weights into kernel formats (in float32
the parameters become empty ``[0]`` tensors), and quantization methods do the same on GPU, so a
direct copy into live parameters is wrong. vLLM's layer-wise reload restores each layer to
checkpoint format, loads it, and re-runs its post-load processing once the layer is complete.
It re-materializes a layer from uninitialized memory, so a push that covers only part of a
layer (e.g. ``q_proj`` without ``k_proj``) would leave garbage in the rest; :meth:`check_push`
refuses such pushes before anything is loaded.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from vllm.model_executor.layers.attention import is_deferred_attention_layer

from refit.adapters.vllm_kv import KV_SCALE_SUFFIXES, AmaxBuffers, KvBuffers, is_amax_name
from refit.adapters.vllm_load import BucketLoads
from refit.adapters.vllm_private import PPMissingLayer, StageMissingLayer, get_pp_missing_layer_names, get_tensor_model_parallel_world_size
from refit.adapters.vllm_probe import Prober
from refit.adapters.vllm_reload import LayerwiseReload
from refit.adapters.vllm_shadow import Hit, Probe, Shadow
from refit.adapters.vllm_tied import TiedPairs, tied_input
from refit.meta import TensorMeta
from refit.resolve import Placement, Resolution
from refit.scales import is_amax, is_scale

__all__ = ["Hit", "VllmResolver"]


class VllmResolver:
    """Resolver (see :class:`refit.resolve.Resolver`) for a vLLM model inside its worker.

    Args:
        model: the worker's model (``worker.model_runner.model``).
        vllm_config: the worker's ``VllmConfig`` (its ``model_config`` drives post-load steps).

    Raises:
        ResolveError: from :meth:`resolve` never (problems are returned in the Resolution);
            from :meth:`end_bucket` if vLLM loaded nothing for a name the probe accepted.
    """

    #: vLLM copies every tensor it is handed into its layers before the push ends (see
    #: ``Resolver``): the loader may reuse the buffers it assembles chunked tensors in
    loads_copied = True

    def __init__(self, model: torch.nn.Module, vllm_config: Any) -> None:
        self.model = model
        self.vllm_config = vllm_config
        self._shadow = Shadow(model)
        self._cache: dict[tuple[str, tuple[int, ...], torch.dtype], tuple[Resolution, list[Hit]]] = {}
        self._hits_by_key: dict[str, list[Hit]] = {}
        self._missing = [n.rstrip(".") for n in get_pp_missing_layer_names(model)]  # vLLM keeps a trailing dot
        first: dict[int, str] = {}
        self._aliases: dict[str, str] = {}  # tied name -> the first name of the same parameter
        for n, p in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(p), n) != n:
                self._aliases[n] = first[id(p)]
        self._reload = LayerwiseReload(model, getattr(vllm_config, "model_config", None), self._aliases)
        tp = get_tensor_model_parallel_world_size() if vllm_config is not None else 1
        self._prober = Prober(model, self._shadow, tp, self._context)
        self._tied = TiedPairs()
        self._kv = KvBuffers(model)
        self._amax = AmaxBuffers(model)
        self.loads = BucketLoads(model, self._reload, self._context)

    # ---------------------------------------------------------------- resolution

    def resolve(self, meta: TensorMeta) -> Resolution:
        """Classify one manifest entry (cached per name, shape and dtype)."""
        ck = (meta.name, meta.shape, meta.dtype)
        if ck not in self._cache:
            self._cache[ck] = self._resolve(meta.name, meta.shape, meta.dtype)
            res, hits = self._cache[ck]
            self._hits_by_key[res.key] = hits
        return self._cache[ck][0]

    def _resolve(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Resolution, list[Hit]]:
        if is_amax_name(name):
            return self._resolve_amax(name, shape, dtype)
        probe = self._prober.probe(name, shape, dtype)
        embed = tied_input(name, probe, self._aliases, self.model, self.vllm_config)
        if embed is None and probe.hits and not probe.error:
            problem = self._dtype_problem(name, dtype, probe.hits) or probe.shape_problem
            key = "+".join(h.key for h in probe.hits)
            return Resolution(Placement.LOCAL, load=self._tied.loader(name, name, probe.hits, self._load), key=key, problem=problem), probe.hits
        if name.endswith(KV_SCALE_SUFFIXES):
            kv = self._kv.resolve(name, shape, dtype)
            if kv is not None:
                return kv, []
        remote = self._remote(name, shape, dtype)
        if remote is not None:
            return remote, []
        if embed is not None:
            # The output embedding of a tied model: vLLM's loader skips it (it shares the input
            # embedding). Its value is the input embedding's, so it loads as that name; pushed
            # together with the input embedding, the two must be equal (see vllm_tied).
            res, hits = self._resolve(embed, shape, dtype)
            if res.placement is Placement.LOCAL and not res.problem:
                key = self._tied.note(name, embed, res.key)
                return Resolution(Placement.LOCAL, load=self._tied.loader(name, embed, hits, self._load), key=key), hits
            return Resolution(Placement.UNKNOWN, key=name, problem=f"{name}: the output embedding is tied to {embed}: {res.problem or 'unknown'}"), []
        if probe.error:
            return Resolution(Placement.UNKNOWN, key=name, problem=self._probe_problem(name, shape, dtype, probe)), []
        return Resolution(Placement.UNKNOWN, key=name, problem=f"{name}: no parameter of this model takes it{self._suggest(name)}"), []

    def _probe_problem(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, probe: Probe) -> str:
        """Why vLLM's loading code refused ``name``, in terms a trainer can act on."""
        if probe.reached:  # a parameter's loader took it and refused: name the parameter and its shape
            module, attr = probe.reached[0]
            target = self._shadow.target(module, attr)
            expected = self._prober.expected(name, shape, dtype)
            want = f"expected {expected}" if expected else f"the parameter is {list(target.shape)} {target.dtype}"
            return f"{name}: shape {list(shape)} / {dtype} does not fit {module}.{attr} ({want}); vLLM's loader said: {probe.error}"
        mapped = self._vllm_name(name)
        parent = mapped.rpartition(".")[0]
        try:
            layer = self.model.get_submodule(parent)
        except AttributeError:
            layer = None
        if is_scale(name) and layer is not None:  # a scale for a layer this engine does not quantize that way
            held = sorted(n for n, _ in layer.named_parameters(recurse=False)) + sorted(n for n, _ in layer.named_buffers(recurse=False))
            return (
                f"{name}: this engine has no {mapped.rpartition('.')[2]} for {parent} ({type(layer).__name__} holds {', '.join(held) or 'nothing'}): "
                "its quantization config does not create that scale; push it only to an engine quantized that way, or leave it out"
            )
        return f"{name}: {probe.error.rstrip('.')}{self._suggest(name)}"

    def _dtype_problem(self, name: str, dtype: torch.dtype, hits: list[Hit]) -> str:
        for h in hits:
            target = self._shadow.target(h.module, h.attr)
            if target.dtype != dtype:
                return f"{name}: dtype {dtype} does not match {h.module}.{h.attr} {target.dtype}; convert it on the sender"
        return ""

    def _remote(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Resolution | None:
        if not self._missing:
            return None
        mapped = self._vllm_name(name)
        prefix = next((p for p in self._missing if mapped == p or mapped.startswith(p + ".")), None)
        if prefix is None:
            return None
        m = re.fullmatch(r"(.*\.)?(\w+)\.(\d+)", prefix)
        if m is None:
            # A missing module with no local sibling (embed_tokens, norm, lm_head on the
            # stages that lack them): only the module path can be checked here.
            return Resolution(Placement.REMOTE, key=name)
        parent, index = f"{m.group(1) or ''}{m.group(2)}", m.group(3)
        container = self.model.get_submodule(parent)
        siblings = [n for n, c in container.named_children() if n.isdigit() and not isinstance(c, (PPMissingLayer, StageMissingLayer))]
        token = f"{m.group(2)}.{index}."
        if not siblings or token not in name:
            return Resolution(Placement.REMOTE, key=name)
        for sibling in siblings:
            res, _ = self._resolve(name.replace(token, f"{m.group(2)}.{sibling}.", 1), shape, dtype)
            if res.placement is Placement.LOCAL and not res.problem:
                return Resolution(Placement.REMOTE, key=name)
        return Resolution(
            Placement.UNKNOWN,
            key=name,
            problem=f"{name}: {prefix} belongs to another pipeline stage, but the same name for the local "
            f"{parent}.{sibling} is refused there: {res.problem or 'unknown'}",
        )

    def _vllm_name(self, name: str) -> str:
        mapper = getattr(self.model, "hf_to_vllm_mapper", None)
        if mapper is not None:
            mapped = mapper.map_name(name)
            return mapped if mapped is not None else name
        return name

    def _resolve_amax(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Resolution, list[Hit]]:
        """A ModelOpt amax: its quantizer's buffer here, else remote, else refused (fail closed)."""
        mapped = self._vllm_name(name)
        res = self._amax.resolve(name, mapped, shape, dtype) or self._remote(name, shape, dtype)
        return res or Resolution(Placement.UNKNOWN, key=name, problem=self._amax.missing(name, mapped)), []

    def describe(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, Any]:
        """What a push of ``name`` (``shape``, ``dtype``) would meet here, without loading:
        ``kind`` (weight, scale, amax, remote, unknown), the target's ``dtype`` and the
        ``shape`` to send (the expected one where ``shape`` is refused), the vLLM ``key`` and
        the ``problem`` a push would be refused with (``""``: accepted)."""
        res, hits = self._resolve(name, shape, dtype)
        sent, target = list(shape), None
        if res.placement is Placement.UNKNOWN and not is_amax_name(name):  # a refused shape: what would fit?
            probe = self._prober.once(name, shape, dtype)
            if probe.reached:
                module, attr = probe.reached[0]
                target = self._shadow.target(module, attr)
                expected = self._prober.expected(name, shape, dtype)
                whole = name.rpartition(".")[0].rpartition(".")[2] == module.rpartition(".")[2]  # not a shard of a fused parameter
                sent = expected or (list(target.shape) if whole else sent)
                res = Resolution(Placement.LOCAL, key=f"{module}.{attr}", problem=res.problem)
        out: dict[str, Any] = {"key": res.key, "problem": res.problem, "shape": sent, "dtype": None}
        if res.placement is Placement.REMOTE:
            return out | {"kind": "remote"}
        if res.placement is not Placement.LOCAL:
            return out | {"kind": "unknown"}
        out["kind"] = "amax" if is_amax(name) else "scale" if is_scale(name) else "weight"
        if target is None and hits:
            target = self._shadow.target(hits[0].module, hits[0].attr)
        elif target is None:  # a KV-cache or amax buffer, by its qualified name
            module, _, attr = res.key.partition("[")[0].rpartition(".")  # a fused buffer's key names the shard
            target = getattr(self.model.get_submodule(module), attr)
            if res.problem and "shape" in res.problem:
                out["shape"] = list(target.shape)
        out["dtype"] = str(target.dtype).removeprefix("torch.")
        return out

    def _suggest(self, name: str) -> str:
        from refit.resolve import suggest

        names = [n for n, _ in self.model.named_parameters()] + [n for n, _ in self.model.named_buffers()]
        return suggest(self._vllm_name(name), names)

    # ---------------------------------------------------------------- checks before loading

    def check_push(self, resolutions: list[Resolution]) -> list[str]:
        """Problems of a whole accepted push: layers it would load only partly.

        Layer-wise reload rebuilds a layer from uninitialized memory once it started loading
        it, so every loadable element of a touched layer must be in the push. Attention layers
        are exempt: vLLM rebuilds their scales from sentinels and applies its own rules for
        missing ones (a lone ``k_scale`` is duplicated to ``v_scale``).
        """
        self._tied.begin_push({r.key for r in resolutions})
        filled: dict[str, int] = {}
        for res in resolutions:
            for h in self._hits_by_key.get(res.key, []):
                filled[h.module] = filled.get(h.module, 0) + h.numel
        problems = []
        for module, n in sorted(filled.items()):
            if is_deferred_attention_layer(self.model.get_submodule(module)):
                continue
            total = self._shadow.layer_size(module)
            if n < total:
                have = sorted({h.key for r in resolutions for h in self._hits_by_key.get(r.key, []) if h.module == module})
                problems.append(
                    f"{module}: the push fills {n} of its {total} elements ({', '.join(have)}); vLLM reloads "
                    "whole layers, so push every tensor of this layer (all of q/k/v, gate/up, weight and bias) or none"
                )
        return problems

    def required_keys(self) -> set[str]:
        """Not enumerable without the checkpoint's names; completeness is checked per layer."""
        return set()

    # ---------------------------------------------------------------- loading

    def _load(self, name: str, t: torch.Tensor, targets: set[str]) -> None:
        # Queued: the bucket's tensors go into one load_weights call at its end (end_bucket).
        self.loads.add(name, t, targets)

    def end_bucket(self, bucket: torch.Tensor, *, keep_views: bool) -> None:
        """Load the bucket's queued tensors in one call (see vllm_load); ``keep_views``: the
        bucket's memory is never written again, so vLLM may keep views of it."""
        self.loads.flush(bucket, keep_views)

    def post_load(self) -> None:
        """Finish layer-wise reload (post-load steps, repacking; see vllm_reload), then re-apply
        pushed KV-cache scales vLLM resets to 1.0 for unquantized caches."""
        self._tied.clear()
        self.loads.flush(None, True)  # nothing queued after the last bucket; kept for callers without end_bucket
        with self._context():
            self._reload.finish()
        self._kv.reapply()
        self._amax.write()

    def abandon(self) -> None:
        """A push broke: every layer it had not finished gets its tensors back, unprocessed
        (the engine stays torn: each layer whole, old or new)."""
        self._tied.clear()
        self.loads.clear()
        self._amax.pending.clear()
        self._reload.rescue()

    def _context(self) -> AbstractContextManager[Any]:
        if self.vllm_config is None:
            return nullcontext()
        from vllm.config import set_current_vllm_config

        return set_current_vllm_config(self.vllm_config)
