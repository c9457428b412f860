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
  through ``model.load_weights`` for that one name, so what is loaded is what was probed.
* REMOTE: the name (after the model's mapper) lies under a ``PPMissingLayer`` of this stage
  and the same name with a locally present sibling layer index probes fine (so a misspelled
  name under a remote layer is still refused here).
* UNKNOWN: anything else, with the reason (the probe's error, or "no loader took it").

Two vLLM behaviours are handled on top:

* An unquantized KV cache has 0-d ``attn._k_scale`` / ``_v_scale`` buffers and no ``k_scale``
  parameter, so vLLM's remap drops a pushed ``self_attn.k_scale`` with only a warning. Here it
  resolves to that buffer; the value is kept and re-written (buffer, ``_k_scale_float``,
  ``_k_scale_cpu``) after every post-load step, because vLLM resets those to 1.0 when the
  cache is not quantized.
* ModelOpt amax names (``k_bmm_quantizer._amax``, ``input_quantizer._amax``,
  ``weight_quantizer._amax``) are renamed to the scale vLLM loads (``k_scale``,
  ``input_scale``, ``weight_scale``) with ``scale = amax / 448`` (float8_e4m3fn max). Where a
  fused layer keeps one scale for several shards, vLLM's own post-load step merges the shard
  scales with max; nothing is merged here.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import is_deferred_attention_layer
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
from vllm.model_executor.model_loader.reload.meta import SKIP_LOAD_TENSORS
from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs
from vllm.model_executor.model_loader.weight_utils import default_weight_loader, maybe_remap_kv_scale_name
from vllm.model_executor.models.utils import PPMissingLayer, StageMissingLayer, get_pp_missing_layer_names

from refit.adapters.vllm_reads import CopyTrace, Reads, bounding_shape, covered
from refit.adapters.vllm_reload import LayerwiseReload
from refit.errors import ResolveError, TornStateError
from refit.load import Loader
from refit.meta import Manifest, TensorMeta
from refit.resolve import Placement, Resolution

FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
KV_SCALE_SUFFIXES = (".k_scale", ".v_scale", ".q_scale", ".kv_scale", ".k_cache.scale", ".v_cache.scale")
# ModelOpt quantizer state (as a QAT trainer holds it) -> the scale name vLLM loads.
MODELOPT_AMAX = (
    (re.compile(r"\.([kv])_bmm_quantizer\._amax$"), r".\1_scale"),
    (re.compile(r"\.input_quantizer\._amax$"), ".input_scale"),
    (re.compile(r"\.weight_quantizer\._amax$"), ".weight_scale"),
)


@dataclass(frozen=True)
class Hit:
    """One weight-loader call the probe recorded."""

    module: str  # qualified name of the module that owns the target tensor
    attr: str  # the tensor's attribute name on that module
    shard: str  # shard / expert ids the loader was called with ("" if none)
    numel: int  # elements the loader wrote

    @property
    def key(self) -> str:
        return f"{self.module}.{self.attr}" + (f"[{self.shard}]" if self.shard else "")


@dataclass
class _Probe:
    hits: list[Hit] = field(default_factory=list)
    error: str = ""
    reads: Reads = field(default_factory=Reads)  # what the loaders read of the probe input, every TP rank
    shape_problem: str = ""


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


class _Shadow:
    """Checkpoint-format meta view of a model whose loaders record instead of load."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.hits: list[Hit] = []
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
            mod._parameters, mod._buffers = dict(shadow[0]), dict(shadow[1])  # type: ignore[assignment,arg-type]
        try:
            yield
        finally:
            for mod, p, b in saved:
                mod._parameters, mod._buffers = p, b

    def layer_size(self, module: str) -> int:
        """Elements vLLM's layer-wise reload waits for before it processes ``module``."""
        mod = self.model.get_submodule(module)
        params, buffers = self.tensors[id(mod)]
        return sum(
            getattr(t, "weight_loader_numel", t.numel()) for n, t in {**params, **buffers}.items() if t is not None and n not in SKIP_LOAD_TENSORS
        )


class VllmResolver:
    """Resolver (see :class:`refit.resolve.Resolver`) for a vLLM model inside its worker.

    Args:
        model: the worker's model (``worker.model_runner.model``).
        vllm_config: the worker's ``VllmConfig`` (its ``model_config`` drives post-load steps).

    Raises:
        ResolveError: from :meth:`resolve` never (problems are returned in the Resolution);
            from a ``load`` callable if vLLM loaded nothing for a name the probe accepted.
    """

    def __init__(self, model: torch.nn.Module, vllm_config: Any) -> None:
        self.model = model
        self.vllm_config = vllm_config
        self._shadow = _Shadow(model)
        self._cache: dict[tuple[str, tuple[int, ...], torch.dtype], tuple[Resolution, list[Hit]]] = {}
        self._hits_by_key: dict[str, list[Hit]] = {}
        self._kv_values: dict[tuple[str, str], torch.Tensor] = {}  # (attention module, "_k_scale") -> value
        self._missing = [n.rstrip(".") for n in get_pp_missing_layer_names(model)]  # vLLM keeps a trailing dot
        first: dict[int, str] = {}
        self._aliases: dict[str, str] = {}  # tied name -> the first name of the same parameter
        for n, p in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(p), n) != n:
                self._aliases[n] = first[id(p)]
        self._reload = LayerwiseReload(model, getattr(vllm_config, "model_config", None), self._aliases)
        self._tp = get_tensor_model_parallel_world_size() if vllm_config is not None else 1
        self._tied: dict[str, tuple[str, str]] = {}  # tied output name -> (input embedding name, its key)
        self._pairs: dict[str, str] = {}  # this push: name -> the tied name it must equal (both pushed)
        self._stash: dict[frozenset[str], tuple[str, torch.Tensor]] = {}  # the first of a pair, until the second arrives

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
        for pattern, repl in MODELOPT_AMAX:
            if pattern.search(name):
                return self._resolve_amax(name, pattern.sub(repl, name), shape, dtype)
        probe = self._probe(name, shape, dtype)
        embed = self._tied_input(name, probe)
        if embed is None and probe.hits and not probe.error:
            problem = self._dtype_problem(name, dtype, probe.hits) or probe.shape_problem
            key = "+".join(h.key for h in probe.hits)
            return Resolution(Placement.LOCAL, load=self._loader(name, probe.hits), key=key, problem=problem), probe.hits
        if name.endswith(KV_SCALE_SUFFIXES):
            kv = self._resolve_kv_buffer(name, shape, dtype)
            if kv is not None:
                return kv, []
        remote = self._remote(name, shape, dtype)
        if remote is not None:
            return remote, []
        if embed is not None:
            # The output embedding of a tied model: vLLM's loader skips it (it shares the input
            # embedding). Its value is the input embedding's, so it loads as that name; pushed
            # together with the input embedding, the two must be equal (see _load_pair).
            res, hits = self._resolve(embed, shape, dtype)
            if res.placement is Placement.LOCAL and not res.problem:
                self._tied[name] = (embed, res.key)
                return Resolution(Placement.LOCAL, load=self._tied_loader(name, embed, hits), key=f"{res.key} (tied: {name})"), hits
            return Resolution(Placement.UNKNOWN, key=name, problem=f"{name}: the output embedding is tied to {embed}: {res.problem or 'unknown'}"), []
        if probe.error:
            expected = self._expected(name, shape, dtype)
            note = f"; expected {expected}" if expected else ""
            return Resolution(Placement.UNKNOWN, key=name, problem=f"{name}: {probe.error.rstrip('.')}{note}"), []
        return Resolution(Placement.UNKNOWN, key=name, problem=f"{name}: no parameter of this model takes it{self._suggest(name)}"), []

    def _tied_input(self, name: str, probe: _Probe) -> str | None:
        """The input embedding's name if ``name`` is the output embedding of a tied model
        (vLLM may load it into the shared parameter through lm_head, skip it, or not build
        lm_head at all)."""
        targets = {f"{h.module}.{h.attr}" for h in probe.hits}
        if targets and not probe.error and all(t in self._aliases for t in targets):
            return self._aliases[targets.pop()]
        if name in self._aliases:
            return self._aliases[name]
        if probe.hits and not probe.error:
            return None
        # HF's state_dict() of a tied model also lists its output embedding, a top-level module
        # (lm_head, embed_out, output); vLLM may skip that name or not build the module at all.
        cfg = getattr(getattr(self.vllm_config, "model_config", None), "hf_text_config", None)
        if not getattr(cfg, "tie_word_embeddings", False) or name.count(".") != 1 or not name.endswith(".weight"):
            return None
        embeds = [q for q, m in self.model.named_modules() if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)]
        return f"{embeds[0]}.weight" if len(embeds) == 1 else None

    # ---------------------------------------------------------------- probing

    def _probe_once(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> _Probe:
        self._shadow.hits.clear()
        probe = _Probe()
        source = torch.empty(shape, dtype=dtype, device="meta")
        self._shadow.source, self._shadow.reads = source, probe.reads
        try:
            with self._context(), self._shadow.active(), torch.no_grad():
                self.model.load_weights([(name, source)])  # type: ignore[operator]
        except Exception as exc:  # a model's load_weights signals unknown names in many ways
            detail = str(exc).splitlines()[0][:300] if str(exc).strip() else "rejected by the model's weight loader"
            probe.error = f"shape {list(shape)} / {dtype}: {type(exc).__name__}: {detail}"
        finally:
            self._shadow.source = None
        probe.hits = list(self._shadow.hits)
        return probe

    def _probe(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> _Probe:
        """Probe ``name`` as this rank and, where the loaders shard by tensor-parallel rank, as
        every other rank too; then check that the loaders read every pushed element."""
        probe = self._probe_once(name, shape, dtype)
        if probe.error or not probe.hits:
            return probe
        errors = self._probe_other_ranks(probe, name, shape, dtype)
        if errors is None or probe.reads.untraced:
            return probe  # the loaders' own checks are all that applies (see vllm_reads)
        n = 1
        for d in shape:
            n *= d
        read = covered(probe.reads.regions)
        if errors or (read is not None and read != n):
            targets = ", ".join(sorted({h.key for h in probe.hits}))
            detail = errors[0] if errors else f"vLLM's loaders would take {read} of its {n} elements and drop the rest"
            expected = self._expected(name, shape, dtype)
            note = f": expected {expected}" if expected else ""
            probe.shape_problem = f"{name}: shape {list(shape)} does not match {targets}{note} ({detail})"
        return probe

    def _probe_other_ranks(self, probe: _Probe, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[str] | None:
        """Probe as every other TP rank, adding their reads to ``probe``; returns their errors,
        or None where the reads of one rank cannot be checked against the whole tensor (a hit
        module shards by other means than ``tp_rank``: vocab embeddings check their own size,
        fused MoE experts are checked as vLLM's loader checks them)."""
        if self._tp == 1:
            return []
        modules = [self.model.get_submodule(m) for m in sorted({h.module for h in probe.hits})]
        if not all(isinstance(m, LinearBase) for m in modules):
            return None
        sharded = [m for m in modules if getattr(m, "tp_size", 1) > 1]
        errors = []
        for rank in range(self._tp):
            if not sharded or rank == getattr(sharded[0], "tp_rank", 0):
                continue
            with self._as_rank(sharded, rank):
                other = self._probe_once(name, shape, dtype)
            if other.reads.untraced:
                return None
            probe.reads.regions += other.reads.regions
            if other.error:
                errors.append(f"as tensor-parallel rank {rank} of {self._tp}: {other.error}")
        return errors

    @contextmanager
    def _as_rank(self, modules: list[torch.nn.Module], rank: int) -> Iterator[None]:
        """vLLM's linear layers (and their parameters) shard by their ``tp_rank`` attribute."""
        saved: list[tuple[Any, int]] = []
        try:
            for mod in modules:
                saved.append((mod, int(mod.tp_rank)))  # type: ignore[arg-type]
                mod.tp_rank = rank  # type: ignore[assignment]
                for t in self._shadow.tensors[id(mod)][0].values():
                    if t is not None and hasattr(t, "tp_rank"):
                        saved.append((t, t.tp_rank))
                        t.tp_rank = rank
            yield
        finally:
            for obj, r in reversed(saved):
                obj.tp_rank = r

    def _expected(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[int] | None:
        """The shape the loaders of every rank read of a roomier tensor of every rank read of a roomier tensor (larger in
        every dimension, then in one at a time, since loaders narrow some dimensions and check
        the others), or None. Meta tensors: no memory, only the probes' time, on refusals only."""
        tries = [tuple(2 * d + 1024 for d in shape)] + [shape[:i] + (2 * shape[i] + 1024,) + shape[i + 1 :] for i in range(len(shape))]
        for roomy in tries if len(shape) > 1 else tries[:1]:
            probe = self._probe_once(name, roomy, dtype)
            if probe.error or not probe.hits:
                continue
            errors = self._probe_other_ranks(probe, name, roomy, dtype)
            if errors is None or errors or probe.reads.untraced:
                continue
            expected = bounding_shape(probe.reads.regions, roomy)
            if expected is not None and expected != list(shape):
                return expected
        return None

    def _dtype_problem(self, name: str, dtype: torch.dtype, hits: list[Hit]) -> str:
        for h in hits:
            mod = self.model.get_submodule(h.module)
            params, buffers = self._shadow.tensors[id(mod)]
            target = {**params, **buffers}[h.attr]
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
            problem=f"{name}: {prefix} belongs to another pipeline stage, but the same name under the local "
            f"{parent}.{siblings[0]} is refused: {res.problem or 'unknown'}",
        )

    def _vllm_name(self, name: str) -> str:
        mapper = getattr(self.model, "hf_to_vllm_mapper", None)
        if mapper is not None:
            mapped = mapper.map_name(name)
            return mapped if mapped is not None else name
        return name

    def _resolve_kv_buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Resolution | None:
        # Unquantized KV cache: the scale lives in a 0-d `_k_scale` buffer of the attention
        # module. vLLM's own remap decides which module a checkpoint name belongs to.
        candidates = {}
        for qual, mod in self.model.named_modules():
            for x in ("k", "v", "q"):
                if isinstance(mod._buffers.get(f"_{x}_scale"), torch.Tensor) and f"{x}_scale" not in mod._parameters:
                    candidates[f"{qual}.{x}_scale"] = (qual, f"_{x}_scale")
        target = maybe_remap_kv_scale_name(name.replace(".kv_scale", ".k_scale"), candidates)
        if target is None or target not in candidates:
            return None
        module, attr = candidates[target]
        key = f"{module}.{attr}"
        if tuple(shape) not in ((), (1,)):
            return Resolution(Placement.LOCAL, key=key, problem=f"{name}: KV-cache scale must be 0-d or [1], got {list(shape)}")
        if dtype != torch.float32:
            return Resolution(Placement.LOCAL, key=key, problem=f"{name}: dtype {dtype} does not match {key} torch.float32; convert it on the sender")

        def keep(t: torch.Tensor) -> None:
            self._kv_values[(module, attr)] = t.detach().reshape(()).clone()

        return Resolution(Placement.LOCAL, load=keep, key=key)

    def _resolve_amax(self, name: str, scale_name: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Resolution, list[Hit]]:
        res, hits = self._resolve(scale_name, shape, dtype)
        if res.placement is not Placement.LOCAL or res.problem or res.load is None:
            problem = res.problem.replace(scale_name, f"{name} (as {scale_name})") if res.problem else ""
            return Resolution(res.placement, key=res.key or name, problem=problem), hits
        inner = res.load

        def load_amax(t: torch.Tensor) -> None:
            inner((t.float() / FP8_E4M3_MAX).to(t.dtype))

        return Resolution(Placement.LOCAL, load=load_amax, key=res.key), hits

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
        keys = {r.key for r in resolutions}
        self._pairs = {}
        for output, (embed, embed_key) in self._tied.items():
            tied_key = f"{embed_key} (tied: {output})"
            if tied_key in keys and embed_key in keys:
                self._pairs[output], self._pairs[embed] = embed, output
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

    def _loader(self, name: str, hits: list[Hit]) -> Callable[[torch.Tensor], None]:
        modules = {h.module for h in hits}

        def load(t: torch.Tensor) -> None:
            if name in self._pairs:
                self._load_pair(name, t, hits)
            else:
                self._load(name, t, modules)

        return load

    def _load(self, name: str, t: torch.Tensor, modules: set[str]) -> None:
        self._reload.begin()
        self._reload.touched |= modules
        # The online loaders of layer-wise reload keep the tensor until the whole layer
        # arrived, which may be after this bucket's memory is reused: give them a copy.
        with self._context(), torch.no_grad():
            loaded = self.model.load_weights([(name, t.clone())])  # type: ignore[operator]
        if loaded is not None and not loaded:
            raise ResolveError(f"{name}: vLLM loaded nothing for a name it accepted when probed; the engine is torn")

    def _tied_loader(self, output: str, embed: str, hits: list[Hit]) -> Callable[[torch.Tensor], None]:
        def load(t: torch.Tensor) -> None:
            if output in self._pairs:
                self._load_pair(output, t, hits)
            else:
                self._load(embed, t, {h.module for h in hits})

        return load

    def _load_pair(self, name: str, t: torch.Tensor, hits: list[Hit]) -> None:
        """A tied output embedding and its input embedding, both in one push: the first to arrive
        waits, the second must be bit-identical to it, then the value loads once. A mismatch is
        only visible once both arrived, after earlier buckets were applied: the push fails and
        the engine stays torn until a complete push lands (never a silent choice of one)."""
        other = self._pairs[name]
        pair = frozenset((name, other))
        first = self._stash.pop(pair, None)
        if first is None:
            self._stash[pair] = (name, t.detach().clone())
            return
        a, b = first[1], t.detach()
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)):
            raise TornStateError(
                f"{first[0]} and {name} differ, but they are tied (tie_word_embeddings): the output embedding is the "
                "input embedding. Push equal tensors, or only the input embedding; the engine is torn until a complete push lands"
            )
        embed = next((e for o, (e, _) in self._tied.items() if o in pair), name)
        self._load(embed, b, {h.module for h in hits})

    def post_load(self) -> None:
        """Finish layer-wise reload (post-load steps, repacking; see vllm_reload), then re-apply
        pushed KV-cache scales vLLM resets to 1.0 for unquantized caches."""
        self._stash.clear()
        with self._context():
            self._reload.finish()
        for (module, attr), value in self._kv_values.items():
            mod = self.model.get_submodule(module)
            getattr(mod, attr).copy_(value)
            if hasattr(mod, f"{attr}_float"):
                setattr(mod, f"{attr}_float", float(value))
            if hasattr(mod, f"{attr}_cpu"):
                setattr(mod, f"{attr}_cpu", value.detach().to("cpu").clone())

    def abandon(self) -> None:
        """A push broke: put back every layer not yet loaded (the engine stays torn)."""
        self._stash.clear()
        with self._context():
            self._reload.finish()

    def _context(self) -> Any:
        if self.vllm_config is None:
            return nullcontext()
        from vllm.config import set_current_vllm_config

        return set_current_vllm_config(self.vllm_config)


class VllmLoader(Loader):
    """A :class:`~refit.load.Loader` that also runs :meth:`VllmResolver.check_push` on the
    whole accepted push, and tells the resolver when a push is abandoned (so layers waiting
    in layer-wise reload are put back)."""

    resolver: VllmResolver

    def prepare(self, manifest: Manifest, version: int) -> list[str]:
        problems = super().prepare(manifest, version)
        if problems or not self.active:
            return problems
        # Resolutions are cached by the resolver, so asking again costs a dict lookup each.
        local = [r for m in manifest.metas if m.chunk == 0 and (r := self.resolver.resolve(m)).placement is Placement.LOCAL]
        problems = self.resolver.check_push(local)
        if problems:
            self.abort("refused: partial layers")  # nothing was applied: not torn
        return sorted(problems)

    def abort(self, reason: str) -> None:
        super().abort(reason)
        self.resolver.abandon()
