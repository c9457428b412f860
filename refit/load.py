"""Strict loading: validate the whole manifest, then apply bucket by bucket, then verify.

The :class:`Loader` is the transport-independent heart of every receiver. ``prepare`` resolves
every entry and collects *every* problem before a byte is loaded; ``apply`` copies one bucket's
local entries into their targets; ``finish`` checks that every local entry was applied exactly
once, runs the post-load hook and commits the version. A push that breaks after its first
applied bucket leaves the loader *torn* until a later push completes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from refit.errors import ResolveError, TornStateError, problem_list
from refit.meta import Manifest, Role, TensorMeta
from refit.pack import bucket_view, chunk_of, copy_many
from refit.report import RefitReport
from refit.resolve import Placement, Resolution, Resolver


def scale_problem(meta: TensorMeta, value: torch.Tensor) -> str:
    """'' if a scale's values are usable, else the problem.

    Rule: every scale element must be finite; an ``amax`` (name ending in ``amax``) must be
    >= 0, any other scale > 0 (a zero or negative scale silently zeroes or flips a layer).
    """
    if value.numel() == 0 or not value.dtype.is_floating_point:
        return ""
    v = value.float()
    if not bool(torch.isfinite(v).all()):
        return f"{meta.name}: scale has non-finite values"
    if meta.name.endswith("amax"):
        if bool((v < 0).any()):
            return f"{meta.name}: amax has negative values"
    elif bool((v <= 0).any()):
        return f"{meta.name}: scale has values <= 0"
    return ""


@dataclass
class _Push:
    """State of the push in progress."""

    version: int
    manifest: Manifest
    plan: list[list[tuple[TensorMeta, Resolution]]]  # per bucket, local + remote entries
    started: float
    next_bucket: int = 0
    applied: int = 0
    remote: int = 0
    staging: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class Loader:
    """Applies pushes into a target through a :class:`Resolver`, strictly.

    Attributes:
        version: the last committed version (0 before the first push).
        torn: True while the target holds a partially applied push.
    """

    def __init__(self, resolver: Resolver, *, require_complete: bool = False, name: str = "receiver") -> None:
        self.resolver = resolver
        self.require_complete = require_complete
        self.name = name
        self.version = 0
        self.torn = False
        self._push: _Push | None = None
        self._layouts: dict[str, Manifest] = {}

    def knows(self, digest: str) -> Manifest | None:
        """The manifest of a layout this loader has accepted before, by digest."""
        return self._layouts.get(digest)

    def check_serving(self) -> None:
        """Raise :class:`TornStateError` if the target holds a half-applied push."""
        if self.torn:
            raise TornStateError(
                f"{self.name} holds a partially applied push (last committed version {self.version}); push a complete update before serving"
            )

    def prepare(self, manifest: Manifest, version: int) -> list[str]:
        """Resolve every entry; returns the sorted problems (empty: accepted, ready to apply).

        Nothing is written to the target here. A push in progress is abandoned (torn if it had
        applied anything).
        """
        t0 = time.perf_counter()
        if self._push is not None:
            self.abort("a new push began before the previous one finished")
        problems: list[str] = []
        plan: list[list[tuple[TensorMeta, Resolution]]] = [[] for _ in manifest.bucket_sizes]
        keys: dict[str, str] = {}
        for meta in manifest.metas:
            res = self.resolver.resolve(meta)
            if res.problem:
                if meta.chunk == 0:
                    problems.append(res.problem)
                continue
            if res.placement is Placement.UNKNOWN:
                problems.append(f"{meta.name}: unknown")
                continue
            if res.placement is Placement.LOCAL and meta.chunk == 0:
                if res.dest is None and res.load is None:
                    problems.append(f"{meta.name}: resolver gave no buffer and no loader")
                    continue
                other = keys.setdefault(res.key, meta.name)
                if other != meta.name:
                    problems.append(f"{meta.name}: fills {res.key!r}, already filled by {other}")
            plan[meta.bucket].append((meta, res))
        if self.require_complete:
            missing = self.resolver.required_keys() - set(keys)
            problems += [f"{k}: missing from the push (require_complete=True)" for k in missing]
        if problems:
            return sorted(set(problems))
        self._push = _Push(version, manifest, plan, t0)
        self._push.seconds["resolve"] = time.perf_counter() - t0
        self._layouts[manifest.digest] = manifest
        return []

    @property
    def active(self) -> bool:
        return self._push is not None

    def apply(self, index: int, bucket: torch.Tensor) -> None:
        """Apply bucket ``index`` (a 1-D uint8 tensor holding at least its bytes).

        Raises:
            ResolveError: a scale in this bucket is invalid (the push is aborted; torn if an
                earlier bucket was applied), or buckets arrive out of order.
        """
        push = self._require_push()
        if index != push.next_bucket:
            self.abort(f"bucket {index} arrived, expected {push.next_bucket}")
            raise ResolveError(f"{self.name}: bucket {index} arrived out of order (expected {push.next_bucket})")
        t0 = time.perf_counter()
        entries = push.plan[index]
        views = [bucket_view(bucket, m) for m, _ in entries]
        bad = [p for (m, _), v in zip(entries, views) if m.role is Role.SCALE and (p := scale_problem(m, v))]
        if bad:
            self.abort("invalid scales")
            raise ResolveError(f"{self.name} refused bucket {index}:\n" + problem_list(bad), bad)
        self.torn = self.torn or bool(entries)  # from here on, the target may hold mixed data
        dsts: list[torch.Tensor] = []
        srcs: list[torch.Tensor] = []
        for (meta, res), view in zip(entries, views):
            if res.placement is Placement.REMOTE:
                push.remote += meta.chunk == meta.chunks - 1
                continue
            if res.dest is not None:
                dsts.append(chunk_of(res.dest, meta) if meta.is_chunked else res.dest)
                srcs.append(view)
                push.applied += meta.chunk == meta.chunks - 1
                continue
            load = res.load
            if load is None:  # prepare guarantees one of dest/load for LOCAL
                raise ResolveError(f"{meta.name}: no buffer and no loader")
            if not meta.is_chunked:
                load(view)
            else:
                whole = push.staging.setdefault(meta.name, torch.empty(meta.shape, dtype=meta.dtype, device=bucket.device))
                copy_many([chunk_of(whole, meta)], [view])
                if meta.chunk == meta.chunks - 1:
                    load(push.staging.pop(meta.name))
            push.applied += meta.chunk == meta.chunks - 1
        copy_many(dsts, srcs, non_blocking=bucket.device.type == "cpu" and any(d.is_cuda for d in dsts))
        push.next_bucket += 1
        push.seconds["apply"] = push.seconds.get("apply", 0.0) + time.perf_counter() - t0

    def finish(self) -> RefitReport:
        """Verify completeness, run the post-load hook, commit the version, return the report."""
        push = self._require_push()
        m = push.manifest
        if push.next_bucket != m.num_buckets:
            self.abort(f"finish after {push.next_bucket} of {m.num_buckets} buckets")
            raise TornStateError(f"{self.name}: push ended after {push.next_bucket} of {m.num_buckets} buckets")
        expected = sum(1 for b in push.plan for meta, r in b if meta.chunk == meta.chunks - 1 and r.placement is Placement.LOCAL)
        if push.applied != expected:
            self.abort("entries not applied exactly once")
            raise TornStateError(f"{self.name}: applied {push.applied} entries, expected {expected}")
        t0 = time.perf_counter()
        if any(d.is_cuda for b in push.plan for _, r in b if (d := r.dest) is not None):
            torch.cuda.synchronize()
        self.resolver.post_load()
        push.seconds["finish"] = time.perf_counter() - t0
        push.seconds["total"] = time.perf_counter() - push.started
        self.version, self.torn, self._push = push.version, False, None
        return RefitReport(
            version=push.version,
            bytes=m.total_bytes,
            buckets=m.num_buckets,
            tensors=m.num_tensors,
            seconds=push.seconds,
            loaded=push.applied,
            remote=push.remote,
            peer=self.name,
        )

    def abort(self, reason: str) -> None:
        """Abandon the push in progress. The target stays torn if anything was applied."""
        self._push = None

    def _require_push(self) -> _Push:
        if self._push is None:
            raise ResolveError(f"{self.name}: no accepted push in progress")
        return self._push
