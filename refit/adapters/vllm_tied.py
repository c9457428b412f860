"""Tied embeddings (``tie_word_embeddings``): vLLM keeps one parameter for the input and the
output embedding, so every form of push is served as pushed.

* the input embedding alone: loaded; the output embedding serves it (vllm_reload re-packs
  lm_head's CPU GEMM kernel afterwards);
* the output embedding alone (``lm_head.weight``): loaded as the input embedding (it is the
  same value);
* both, as ``model.state_dict()`` of a tied HF model gives them: they must be bit-identical
  and the value is loaded once. A mismatch is only visible once both arrived, after earlier
  buckets were applied, so the push fails (``TornStateError``) and the engine stays torn until
  a complete push lands: never a silent choice of one of the two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from refit.adapters.vllm_private import ParallelLMHead, VocabParallelEmbedding
from refit.adapters.vllm_shadow import Hit, Probe
from refit.errors import TornStateError


def tied_input(name: str, probe: Probe, aliases: dict[str, str], model: torch.nn.Module, vllm_config: Any) -> str | None:
    """The input embedding's name if ``name`` is the output embedding of a tied model (vLLM
    may load it into the shared parameter through lm_head, skip it, or not build lm_head at
    all); None otherwise."""
    targets = {f"{h.module}.{h.attr}" for h in probe.hits}
    if targets and not probe.error and all(t in aliases for t in targets):
        return aliases[targets.pop()]
    if name in aliases:
        return aliases[name]
    if probe.hits and not probe.error:
        return None
    # HF's state_dict() of a tied model also lists its output embedding, a top-level module
    # (lm_head, embed_out, output); vLLM may skip that name or not build the module at all.
    cfg = getattr(getattr(vllm_config, "model_config", None), "hf_text_config", None)
    if not getattr(cfg, "tie_word_embeddings", False) or name.count(".") != 1 or not name.endswith(".weight"):
        return None
    embeds = [q for q, m in model.named_modules() if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)]
    return f"{embeds[0]}.weight" if len(embeds) == 1 else None


Load = Callable[[str, torch.Tensor, set[str]], None]  # (name to load as, tensor, the tensors (module.attr) it fills)


class TiedPairs:
    """The tied output embeddings a resolver accepted, and the pairs of the push in progress."""

    def __init__(self) -> None:
        self.outputs: dict[str, tuple[str, str]] = {}  # tied output name -> (input embedding name, its key)
        self.pairs: dict[str, str] = {}  # this push: name -> the tied name it must equal (both pushed)
        self._stash: dict[frozenset[str], tuple[str, torch.Tensor]] = {}  # the first of a pair, until the second arrives

    def note(self, output: str, embed: str, embed_key: str) -> str:
        """Record an accepted tied output name; returns the key of its resolution."""
        self.outputs[output] = (embed, embed_key)
        return f"{embed_key} (tied: {output})"

    def begin_push(self, keys: set[str]) -> None:
        """A push with these resolution keys was accepted: find the pairs pushed together."""
        self.pairs = {}
        self._stash.clear()
        for output, (embed, embed_key) in self.outputs.items():
            if f"{embed_key} (tied: {output})" in keys and embed_key in keys:
                self.pairs[output], self.pairs[embed] = embed, output

    def loader(self, name: str, load_as: str, hits: list[Hit], load: Load) -> Callable[[torch.Tensor], None]:
        """The loader of ``name`` (loaded as ``load_as``): through the pair check when both
        names of the pair are in the push."""
        targets = {f"{h.module}.{h.attr}" for h in hits}

        def run(t: torch.Tensor) -> None:
            if name in self.pairs:
                self._load_pair(name, t, targets, load)
            else:
                load(load_as, t, targets)

        return run

    def _load_pair(self, name: str, t: torch.Tensor, targets: set[str], load: Load) -> None:
        """The first of a pair to arrive waits (a copy: its bucket may be reused); the second
        must be bit-identical to it, then the value loads once."""
        other = self.pairs[name]
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
        embed = next((e for o, (e, _) in self.outputs.items() if o in pair), name)
        load(embed, b, targets)

    def clear(self) -> None:
        """Drop the stashed first halves of pairs (at the end of a push, or when it is abandoned)."""
        self._stash.clear()
