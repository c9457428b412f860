"""Probing one name: run the model's own ``load_weights`` on a meta tensor of the pushed shape
inside the shadow (``vllm_shadow``), as this tensor-parallel rank and as every other one, and
check that the loaders read every pushed element (``vllm_reads``).

Why every rank: vLLM's linear layers shard by their ``tp_rank``, so a rank alone sees only its
own rows; a tensor that fits this rank's shard but not another's must be refused by every
rank, or one rank would load while the other refuses. The expected shape in a refusal is
learned by probing a roomier meta tensor (no memory; only on refusals).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from refit.adapters.vllm_private import LinearBase
from refit.adapters.vllm_reads import bounding_shape, covered
from refit.adapters.vllm_shadow import Probe, Shadow


class Prober:
    """Probes names against ``model`` through ``shadow``.

    Args:
        model: the worker's model.
        shadow: its checkpoint-format shadow.
        tp: the tensor-parallel world size.
        context: a factory of the context vLLM's loaders need (the current vLLM config).
    """

    def __init__(self, model: torch.nn.Module, shadow: Shadow, tp: int, context: Callable[[], AbstractContextManager[Any]]) -> None:
        self.model = model
        self.shadow = shadow
        self.tp = tp
        self.context = context

    def once(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Probe:
        """One probe as this rank (no coverage check)."""
        self.shadow.hits.clear()
        self.shadow.reached.clear()
        probe = Probe()
        source = torch.empty(shape, dtype=dtype, device="meta")
        self.shadow.source, self.shadow.reads = source, probe.reads
        try:
            with self.context(), self.shadow.active(), torch.no_grad():
                self.model.load_weights([(name, source)])  # type: ignore[operator]
        except Exception as exc:  # a model's load_weights signals unknown names in many ways
            detail = str(exc).splitlines()[0][:300] if str(exc).strip() else "rejected by the model's weight loader"
            probe.error = f"shape {list(shape)} / {dtype}: {type(exc).__name__}: {detail}"
        finally:
            self.shadow.source = None
        probe.hits = list(self.shadow.hits)
        probe.reached = list(self.shadow.reached)
        return probe

    def probe(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Probe:
        """Probe ``name`` as this rank and, where the loaders shard by tensor-parallel rank, as
        every other rank too; then check that the loaders read every pushed element."""
        probe = self.once(name, shape, dtype)
        if probe.error or not probe.hits:
            return probe
        errors = self._other_ranks(probe, name, shape, dtype)
        if errors is None or probe.reads.untraced:
            return probe  # the loaders' own checks are all that applies (see vllm_reads)
        n = 1
        for d in shape:
            n *= d
        read = covered(probe.reads.regions)
        if errors or (read is not None and read != n):
            targets = ", ".join(sorted({h.key for h in probe.hits}))
            detail = errors[0] if errors else f"vLLM's loaders would take {read} of its {n} elements and drop the rest"
            expected = self.expected(name, shape, dtype)
            note = f": expected {expected}" if expected else ""
            probe.shape_problem = f"{name}: shape {list(shape)} does not match {targets}{note} ({detail})"
        return probe

    def _other_ranks(self, probe: Probe, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[str] | None:
        """Probe as every other TP rank, adding their reads to ``probe``; returns their errors,
        or None where the reads of one rank cannot be checked against the whole tensor (a hit
        module shards by other means than ``tp_rank``: vocab embeddings check their own size,
        fused MoE experts are checked as vLLM's loader checks them)."""
        if self.tp == 1:
            return []
        modules = [self.model.get_submodule(m) for m in sorted({h.module for h in probe.hits})]
        if not all(isinstance(m, LinearBase) for m in modules):
            return None
        sharded = [m for m in modules if getattr(m, "tp_size", 1) > 1]
        errors = []
        for rank in range(self.tp):
            if not sharded or rank == getattr(sharded[0], "tp_rank", 0):
                continue
            with self._as_rank(sharded, rank):
                other = self.once(name, shape, dtype)
            if other.reads.untraced:
                return None
            probe.reads.regions += other.reads.regions
            if other.error:
                errors.append(f"as tensor-parallel rank {rank} of {self.tp}: {other.error}")
        return errors

    @contextmanager
    def _as_rank(self, modules: list[torch.nn.Module], rank: int) -> Iterator[None]:
        """vLLM's linear layers (and their parameters) shard by their ``tp_rank`` attribute."""
        saved: list[tuple[Any, int]] = []
        try:
            for mod in modules:
                saved.append((mod, int(mod.tp_rank)))  # type: ignore[arg-type]
                mod.tp_rank = rank  # type: ignore[assignment]
                for t in self.shadow.tensors[id(mod)][0].values():
                    if t is not None and hasattr(t, "tp_rank"):
                        saved.append((t, t.tp_rank))
                        t.tp_rank = rank
            yield
        finally:
            for obj, r in reversed(saved):
                obj.tp_rank = r

    def expected(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[int] | None:
        """The shape the loaders of every rank read of a roomier tensor (larger in every
        dimension, then in one at a time, since loaders narrow some dimensions and check the
        others), or None. Meta tensors: no memory, only the probes' time, on refusals only."""
        tries = [tuple(2 * d + 1024 for d in shape)] + [shape[:i] + (2 * shape[i] + 1024,) + shape[i + 1 :] for i in range(len(shape))]
        for roomy in tries if len(shape) > 1 else tries[:1]:
            probe = self.once(name, roomy, dtype)
            if probe.error or not probe.hits:
                continue
            errors = self._other_ranks(probe, name, roomy, dtype)
            if errors is None or errors or probe.reads.untraced:
                continue
            expected = bounding_shape(probe.reads.regions, roomy)
            if expected is not None and expected != list(shape):
                return expected
        return None
