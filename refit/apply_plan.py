"""How one bucket is applied (:class:`~refit.load.Loader`'s inner part): one step per tensor,
one step per run of 0-d scales (a strided view, one validation, one multi-tensor copy), the
views into the bucket and the copies into the targets, planned once per layout and buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refit.meta import TensorMeta
from refit.pack import CopyPlan, bucket_view, chunk_of
from refit.resolve import Placement, Resolution
from refit.scales import amax_mask, is_checked, run_problems, run_view, value_problem


@dataclass(frozen=True)
class One:
    """One entry of a bucket: where it goes (``dest`` is the precomputed target view)."""

    meta: TensorMeta
    res: Resolution
    dest: torch.Tensor | None


@dataclass(frozen=True)
class Run:
    """A run of 0-d entries, all local with a direct buffer: one strided view, one validation,
    one multi-tensor copy."""

    metas: tuple[TensorMeta, ...]
    dests: list[torch.Tensor]
    scale: bool
    amax: torch.Tensor | None
    device: torch.device | None  # the dests' common device, None if they differ
    resolutions: tuple[Resolution, ...]


Step = One | Run


def local_keys(steps: list[Step]) -> list[str]:
    """Keys of the local targets a bucket's steps write."""
    keys: list[str] = []
    for step in steps:
        if isinstance(step, Run):
            keys += [r.key for r in step.resolutions]
        elif step.res.placement is Placement.LOCAL:
            keys.append(step.res.key)
    return keys


class BucketPlan:
    """Everything ``apply`` does with one bucket of one layout: views, scale checks, copies.

    Built per bucket, or once per layout and staging buffer when the buffer is persistent.
    """

    def __init__(self, steps: list[Step], bucket: torch.Tensor) -> None:
        # scales to validate: (names of a run, its values, its amax mask on their device) or (name, value, None)
        self.checks: list[tuple[list[str] | str, torch.Tensor, torch.Tensor | None]] = []
        self.runs: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self.loads: list[tuple[One, torch.Tensor]] = []
        dsts: list[torch.Tensor] = []
        srcs: list[torch.Tensor] = []
        self.applied = self.remote = 0
        for step in steps:
            if isinstance(step, Run):
                v = run_view(bucket, step.metas)
                if step.scale:
                    amax = None if step.amax is None else step.amax.to(v.device)
                    self.checks.append(([m.name for m in step.metas], v, amax))
                if step.device == v.device:  # same dtype and device: one multi-tensor copy
                    self.runs.append((step.dests, list(v.unbind())))
                else:
                    dsts += step.dests
                    srcs += v.unbind()
                self.applied += len(step.dests)
                continue
            meta, res = step.meta, step.res
            v = bucket_view(bucket, meta)
            last = meta.chunk == meta.chunks - 1
            if is_checked(meta):  # a scale or amax, by role or by name
                self.checks.append((meta.name, v, None))
            if res.placement is Placement.REMOTE:
                self.remote += last
                continue
            self.applied += last
            if step.dest is not None:
                dsts.append(step.dest)
                srcs.append(v)
            else:
                self.loads.append((step, v))
        self.local = bool(dsts or self.runs or self.loads)
        self.to_cuda = any(d.is_cuda for d in dsts)
        self.copies = CopyPlan(dsts, srcs)

    def scale_problems(self) -> list[str]:
        """Problems of the bucket's scales and amax as they arrived (non-finite, non-positive, negative amax); empty if all
        are valid. Read from the bucket, so call it before the bucket is reused.
        """
        bad: list[str] = []
        for names, v, amax in self.checks:
            if isinstance(names, list):
                bad += run_problems(names, v, amax)
            elif p := value_problem(names, v):
                bad.append(p)
        return bad


def bucket_steps(metas: Sequence[TensorMeta], pieces: Sequence[tuple[int, int, bool]], resolutions: list[Resolution]) -> list[Step]:
    """A bucket's steps; ``pieces`` are its runs and single tensors (``Manifest.segments``)."""
    steps: list[Step] = []
    for i, j, is_run in pieces:
        part = resolutions[i:j]
        if is_run and all(r.placement is Placement.LOCAL and r.dest is not None for r in part):
            run = tuple(metas[i:j])
            checked = list(map(is_checked, run))  # scales and amax, by role or by name: validated
            scale = all(checked)
            if scale or not any(checked):
                dests = [r.dest for r in part if r.dest is not None]
                devices = {d.device for d in dests}
                device = devices.pop() if len(devices) == 1 else None
                steps.append(Run(run, dests, scale, amax_mask([m.name for m in run]) if scale else None, device, tuple(part)))
                continue
        for m, r in zip(metas[i:j], part):
            dest = None if r.dest is None else (chunk_of(r.dest, m) if m.is_chunked else r.dest)
            steps.append(One(m, r, dest))
    return steps
