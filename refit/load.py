"""Strict loading: validate the whole manifest, then apply bucket by bucket, then verify.

The :class:`Loader` is the transport-independent heart of every receiver. ``prepare`` resolves
every entry and collects *every* problem before a byte is loaded; ``apply`` copies one bucket's
local entries into their targets; ``finish`` checks that every local entry was applied exactly
once, runs the post-load hook and commits the version. A push that breaks after its first
applied bucket leaves the loader *torn* until a later push completes.

With per-bucket checksums on (the Hello names the algorithm), ``apply`` recomputes each bucket's
checksum and refuses a bucket whose bytes differ from the sender's before applying any of it.
With ``record`` on, it keeps a sha256 of every local tensor it received (``fingerprint``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from refit.apply_plan import BucketPlan, Run, Step, bucket_steps, local_keys
from refit.digest import digest_header
from refit.errors import IntegrityError, RefitError, ResolveError, TornStateError, WireError, problem_list
from refit.integrity import Checksum, check_bucket
from refit.meta import Manifest, TensorMeta
from refit.pack import chunk_of, copy_many, host_bytes
from refit.report import RefitReport
from refit.resolve import Placement, Resolution, Resolver


class _Prepared(NamedTuple):
    """A layout's resolution, kept while the layout repeats."""

    digest: str
    steps: list[list[Step]]  # per bucket
    local: int  # entries this receiver loads


@dataclass
class _Push:
    """State of the push in progress."""

    version: int
    manifest: Manifest
    plan: list[list[Step]]  # per bucket
    started: float
    next_bucket: int = 0
    partial: bool = False  # bucket next_bucket is being applied
    applied: int = 0
    remote: int = 0
    staging: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    checksum: Checksum | None = None  # every bucket is checked with it before it is applied
    record: bool = False  # keep a sha256 of every local tensor received
    hashing: dict[str, Any] = field(default_factory=dict)  # a chunked tensor's sha256 in progress
    received: dict[str, bytes] = field(default_factory=dict)  # committed into Loader at finish


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
        self._prepared: _Prepared | None = None  # the last layout's resolution
        self._bucket_plans: dict[tuple[int, int, int, torch.device], BucketPlan] = {}  # for persistent buffers
        self._torn_keys: set[str] = set()  # what broken pushes may have half-written
        self._received: dict[str, bytes] = {}  # name -> sha256 of what committed pushes delivered (record)
        self._wholes: dict[str, torch.Tensor] = {}  # chunked host tensors' assembly buffers, kept (see _whole)
        #: True when no bucket handed to ``apply`` is ever written again (a fresh frame per
        #: bucket, kept alive by its views): a resolver may then keep views of it past
        #: ``apply`` instead of copying them (see ``Resolver``'s optional ``end_bucket``).
        self.buckets_stay = False

    def knows(self, digest: str) -> Manifest | None:
        """The manifest of a layout this loader has accepted before, by digest."""
        return self._layouts.get(digest)

    def check_serving(self) -> None:
        """Raise :class:`TornStateError` if the target holds a half-applied push."""
        if self.torn:
            keys = sorted(self._torn_keys)
            which = f"; possibly mixed: {', '.join(keys[:5])}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else "") if keys else ""
            raise TornStateError(
                f"{self.name} holds a partially applied push (last committed version {self.version}){which}; "
                "push a complete update of those tensors before serving"
            )

    def prepare(self, manifest: Manifest, version: int, *, checksum: str = "", record: bool = False) -> list[str]:
        """Resolve every entry; returns the sorted problems (empty: accepted, ready to apply).

        Nothing is written to the target here. A push in progress is abandoned (torn if it had
        applied anything). The resolution of a layout is kept, so a repeated layout is accepted
        without resolving again, unless the resolver says ``stable = False`` or
        :meth:`invalidate` was called. ``version`` must be greater than the committed
        :attr:`version` (see :meth:`reset_version`); else the push is refused, its other
        problems listed too. ``checksum`` (an algorithm of :mod:`refit.integrity`, ``""`` for
        none) makes every bucket of the push carry a checksum that ``apply`` verifies;
        ``record`` keeps a sha256 of every local tensor received (see :meth:`fingerprint`).
        """
        t0 = time.perf_counter()
        if self._push is not None:
            self.abort("a new push began before the previous one finished")
        stale = self._version_problems(version)
        cached = self._prepared
        if cached is None or cached.digest != manifest.digest or not getattr(self.resolver, "stable", True):
            problems, steps, local = self._resolve(manifest)
            if problems:
                return stale + problems
            cached = self._prepared = _Prepared(manifest.digest, steps, local)
            self._bucket_plans.clear()
            self._wholes.clear()  # kept for one layout at a time
        if stale:
            return stale
        check_push = getattr(self.resolver, "check_push", None)
        if check_push is not None:  # the resolver's rules for a whole push (e.g. whole layers)
            problems = check_push([r for m in manifest.metas if m.chunk == 0 and (r := self.resolver.resolve(m)).placement is Placement.LOCAL])
            if problems:
                self._abandon()
                return sorted(problems)
        # a target that can hash what it stores (fingerprints()) needs no record of what arrived
        record = record and not hasattr(self.resolver, "fingerprints")
        self._push = _Push(version, manifest, cached.steps, t0, checksum=Checksum(checksum) if checksum else None, record=record)
        self._push.seconds["resolve"] = time.perf_counter() - t0
        self._layouts[manifest.digest] = manifest
        return []

    def _version_problems(self, version: int) -> list[str]:
        # Versions only increase on a receiver: a push numbered at or below the committed one
        # comes from a trainer that restarted numbering (or from a second trainer), and loading
        # it silently would let an older update overwrite a newer one.
        if version > self.version:
            return []
        return [
            f"version {version} is not greater than {self.name}'s committed version {self.version} "
            "(versions only increase; is a second trainer pushing to this receiver?): omit version= so the "
            f"Refitter numbers its pushes after the receivers', pass a version above {self.version}, "
            "or call reset_version() on this receiver to go back on purpose"
        ]

    def reset_version(self, version: int = 0) -> None:
        """Make the next push acceptable if its version is greater than ``version`` (default 0:
        any version), e.g. to roll an engine back to an older checkpoint's numbering on purpose.

        Raises:
            RefitError: ``version`` is not an int in [0, 2**63), or a push is in progress.
        """
        if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version < 1 << 63:
            raise RefitError(f"reset_version takes an int in [0, 2**63), got {version!r:.80}")
        if self._push is not None:
            raise RefitError(f"{self.name}: cannot reset the version while a push is in progress; call it between pushes")
        self.version = version

    def invalidate(self) -> None:
        """Forget cached resolutions (call when the target's tensors were re-created)."""
        self._prepared = None
        self._bucket_plans.clear()

    def _resolve(self, manifest: Manifest) -> tuple[list[str], list[list[Step]], int]:
        problems: list[str] = []
        resolutions: list[Resolution] = []
        keys: dict[str, str] = {}
        local = 0
        for meta in manifest.metas:
            res = self.resolver.resolve(meta)
            resolutions.append(res)
            if meta.chunk:
                continue
            if res.problem:
                problems.append(res.problem)
            elif res.placement is Placement.UNKNOWN:
                problems.append(f"{meta.name}: unknown")
            elif res.placement is Placement.LOCAL:
                if res.dest is None and res.load is None:
                    problems.append(f"{meta.name}: resolver gave no buffer and no loader")
                    continue
                if res.dest is not None and meta.is_chunked and not res.dest.is_contiguous():
                    problems.append(f"{meta.name}: its target is not contiguous; a tensor split over buckets needs a contiguous target")
                    continue
                other = keys.setdefault(res.key, meta.name)
                if other != meta.name:
                    problems.append(f"{meta.name}: fills {res.key!r}, already filled by {other}")
                local += 1
        if self.require_complete:
            missing = self.resolver.required_keys() - set(keys)
            problems += [f"{k}: missing from the push (require_complete=True)" for k in missing]
        if problems:
            return sorted(set(problems)), [], 0
        steps: list[list[Step]] = []
        k = 0
        for metas, pieces in zip(manifest.by_bucket, manifest.segments, strict=True):
            steps.append(bucket_steps(metas, pieces, resolutions[k : k + len(metas)]))
            k += len(metas)
        return [], steps, local

    def accepted(self) -> list[tuple[TensorMeta, Resolution]]:
        """(meta, resolution) of every entry of the push in progress (first chunks only)."""
        push = self._require_push()
        out: list[tuple[TensorMeta, Resolution]] = []
        for steps in push.plan:
            for step in steps:
                if isinstance(step, Run):
                    out += zip(step.metas, step.resolutions)
                elif step.meta.chunk == 0:
                    out.append((step.meta, step.res))
        return out

    @property
    def active(self) -> bool:
        """True while a push is in progress (prepared and not yet finished or aborted)."""
        return self._push is not None

    def note(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` to ``stage`` in the report of the push in progress (a transport's
        own stages: waiting for the go word, for buckets, for the sender's finish)."""
        if self._push is not None:
            self._push.seconds[stage] = self._push.seconds.get(stage, 0.0) + seconds

    def apply(self, index: int, bucket: torch.Tensor, *, persistent: bool = False, checksum: bytes | None = None) -> None:
        """Apply bucket ``index`` (a 1-D uint8 tensor holding at least its bytes).

        Scales in the bucket are validated before anything of it is applied (scales are
        planned first, so normally before any weight). ``persistent=True`` says ``bucket`` is
        a staging buffer reused across pushes: its views and copy plan are then built once per
        layout and kept (they hold a reference to the buffer). ``checksum`` is the sender's
        checksum of the bucket's bytes, required when the push was prepared with one.

        Raises:
            IntegrityError: the bucket's bytes do not match ``checksum`` (nothing of it is
                applied; the push is aborted, torn if an earlier bucket was applied).
            ResolveError: a scale in this bucket is invalid (the push is aborted; torn if an
                earlier bucket was applied), or buckets arrive out of order.
        """
        push = self._require_push()
        if index != push.next_bucket:
            self.abort(f"bucket {index} arrived, expected {push.next_bucket}")
            raise ResolveError(f"{self.name}: bucket {index} arrived out of order (expected {push.next_bucket})")
        t0 = time.perf_counter()
        if bucket.dim() != 1 or bucket.dtype != torch.uint8 or bucket.numel() < push.manifest.bucket_sizes[index]:
            self.abort(f"bucket {index} is malformed")
            raise WireError(
                f"{self.name}: bucket {index} holds {bucket.numel()} bytes ({bucket.dtype}), the manifest says {push.manifest.bucket_sizes[index]}"
            )
        if push.checksum is not None:  # before anything of the bucket is applied
            t1 = time.perf_counter()
            problem = check_bucket(
                push.checksum, bucket[: push.manifest.bucket_sizes[index]], checksum, self.name, index, push.manifest.by_bucket[index]
            )
            push.seconds["checksum"] = push.seconds.get("checksum", 0.0) + time.perf_counter() - t1
            if problem:
                self.abort(f"bucket {index} failed its checksum")
                raise IntegrityError(problem)
        key = (index, bucket.data_ptr(), bucket.numel(), bucket.device)
        plan = self._bucket_plans.get(key) if persistent else None
        if plan is None:
            plan = BucketPlan(push.plan[index], bucket)
            if persistent:
                self._bucket_plans[key] = plan
        bad = plan.scale_problems()
        if bad:
            self.abort("invalid scales")
            raise ResolveError(f"{self.name} refused bucket {index}:\n" + problem_list(bad), bad)
        if plan.local:
            self.torn = True  # from here on the target may hold mixed data
        push.partial = True
        plan.copies.run(non_blocking=bucket.device.type == "cpu" and plan.to_cuda)
        for dests, srcs in plan.runs:
            torch._foreach_copy_(dests, srcs)
        for step, view in plan.loads:
            meta, load = step.meta, step.res.load
            if load is None:  # invariant: prepare gives LOCAL entries a buffer or a loader
                raise ResolveError(f"{meta.name}: no buffer and no loader")
            if not meta.is_chunked:
                load(view)
                continue
            if meta.name not in push.staging:  # the whole tensor, assembled from its chunks
                push.staging[meta.name] = self._whole(meta, bucket.device)
            whole = push.staging[meta.name]
            copy_many([chunk_of(whole, meta)], [view])
            if meta.chunk == meta.chunks - 1:
                load(push.staging.pop(meta.name))
        end_bucket = getattr(self.resolver, "end_bucket", None)
        if end_bucket is not None:  # a resolver that batches its loads per bucket
            end_bucket(bucket, keep_views=self.buckets_stay and not persistent)
        if push.record:
            self._record(push, index, bucket)
        push.applied += plan.applied
        push.remote += plan.remote
        push.next_bucket += 1
        push.partial = False
        push.seconds["apply"] = push.seconds.get("apply", 0.0) + time.perf_counter() - t0

    def finish(self) -> RefitReport:
        """Verify completeness, run the post-load hook, commit the version, return the report."""
        push = self._require_push()
        m = push.manifest
        if push.next_bucket != m.num_buckets:
            self.abort(f"finish after {push.next_bucket} of {m.num_buckets} buckets")
            raise TornStateError(f"{self.name}: push ended after {push.next_bucket} of {m.num_buckets} buckets")
        expected = self._prepared.local if self._prepared is not None else -1
        if push.applied != expected:
            self.abort("entries not applied exactly once")
            raise TornStateError(f"{self.name}: applied {push.applied} entries, expected {expected}")
        t0 = time.perf_counter()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # non-blocking host-to-device copies must land before commit
        self.resolver.post_load()
        push.seconds["finish"] = time.perf_counter() - t0
        push.seconds["total"] = time.perf_counter() - push.started
        if self._torn_keys:  # a complete push rewrote what broken ones left mixed
            for steps in push.plan:
                self._torn_keys.difference_update(local_keys(steps))
        self.version, self._push = push.version, None
        self.torn = bool(self._torn_keys)
        if push.record:
            self._received.update(push.received)
        else:  # what an unrecorded push wrote is not what was recorded before
            self._forget(push)
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

    def _whole(self, meta: TensorMeta, device: torch.device) -> torch.Tensor:
        """A buffer to assemble chunked ``meta`` in. On the host, when the resolver copies what
        it loads (``loads_copied``), the buffer is kept for the next push: a fresh one would
        cost a page fault per 4 KiB every push (0.1-0.2 s for a 525 MB embedding on the CPU
        box, docs/benchmarks.md). Device memory is left to PyTorch's caching allocator."""
        if device.type != "cpu" or not getattr(self.resolver, "loads_copied", False):
            return torch.empty(meta.shape, dtype=meta.dtype, device=device)
        held = self._wholes.get(meta.name)
        if held is None or tuple(held.shape) != meta.shape or held.dtype != meta.dtype:
            held = self._wholes[meta.name] = torch.empty(meta.shape, dtype=meta.dtype)
        return held

    def _record(self, push: _Push, index: int, bucket: torch.Tensor) -> None:
        """Keep the sha256 of every local tensor (chunk) of bucket ``index``, as received."""
        local: list[TensorMeta] = []
        for step in push.plan[index]:
            if isinstance(step, Run):
                local.extend(step.metas)
            elif step.res.placement is Placement.LOCAL:
                local.append(step.meta)
        if not local:  # another stage's bucket: nothing to read back
            return
        lo, hi = min(m.offset for m in local), max(m.offset + m.nbytes for m in local)
        data = host_bytes(bucket[lo:hi].cpu().contiguous())  # one copy of the span this receiver holds
        for m in local:
            h = push.hashing.pop(m.name, None) or digest_header(m.dtype, m.shape)
            h.update(data[m.offset - lo : m.offset + m.nbytes - lo])
            if m.chunk == m.chunks - 1:
                push.received[m.name] = h.digest()
            else:
                push.hashing[m.name] = h

    def _forget(self, push: _Push) -> None:
        if self._received:
            for m in push.manifest.metas:
                self._received.pop(m.name, None)

    def fingerprint(self) -> tuple[str, dict[str, bytes]]:
        """``(source, name -> sha256)`` of what this receiver holds, for ``refit verify``.

        ``stored``: the target's tensors as they are now (a resolver with ``fingerprints()``,
        e.g. a module or dict target). Otherwise ``received``: what committed pushes delivered,
        recorded while applying pushes sent with ``record`` (the vLLM adapter: its stored
        tensors are fused or repacked, so they are not compared). ``none``: neither.
        """
        own = getattr(self.resolver, "fingerprints", None)
        if own is not None:
            return "stored", own()
        if self._received:
            return "received", dict(self._received)
        return "none", {}

    def abort(self, reason: str) -> None:
        """Abandon the push in progress. The target stays torn if anything was applied, until
        a committed push has rewritten everything the broken one touched."""
        push, self._push = self._push, None
        if push is not None:
            self._forget(push)  # its recorded digests would not say what the target holds now
        if push is not None and self.torn:
            for steps in push.plan[: push.next_bucket + push.partial]:  # with the bucket an error interrupted
                self._torn_keys.update(local_keys(steps))
        self._abandon()

    def _abandon(self) -> None:
        abandon = getattr(self.resolver, "abandon", None)
        if abandon is not None:
            abandon()

    def _require_push(self) -> _Push:
        if self._push is None:
            raise ResolveError(f"{self.name}: no accepted push in progress")
        return self._push
