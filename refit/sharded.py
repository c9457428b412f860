"""Gathering sharded (``DTensor`` / FSDP2) parameters for a push, one tensor at a time.

``DTensor.full_tensor()`` is a collective: every rank of the tensor's mesh must call it, for
the same tensor, in the same order. A push runs on one rank (the *leader*) and decides the
order itself (scales first, chunked tensors materialized when their first chunk is packed, a
refused push stops half-way), so the other ranks cannot predict it. Here the leader drives:
before each gather it broadcasts the tensor's index; every other rank sits in :meth:`serve`,
receives the index and joins that gather (into a full tensor it drops at once). When the push
ends, successfully or not, the leader broadcasts a stop and the followers return.

Rejected: every rank iterating the same sources in the same order and running the fills into
scratch buffers. That relies on the order of fills inside ``Refitter.push`` (planning, chunking,
refusals), an internal detail; a mismatch there deadlocks, or worse, silently mixes shards of two
tensors of one shape. One 8-byte broadcast per tensor is negligible next to the gather itself.

Before the first gather, the ranks compare a digest of the tensors' names, shapes, dtypes and
placements, so sources built differently on two ranks fail loudly instead of hanging.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from refit.errors import RefitError

_STOP = -1


def is_dtensor(value: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 and TP parameters)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


class ShardedGathers:
    """Leader-driven gathers of a fixed, ordered list of ``DTensor``s (see module doc).

    Every rank of ``group`` builds one with the same ``(name, dtensor)`` list, in the same
    order. The leader runs a push inside :meth:`lead`; every other rank calls :meth:`serve`.

    Args:
        tensors: ``(name, dtensor)`` pairs, identical (names, shapes, dtypes, placements) on
            every rank.
        group: the process group spanning every mesh the tensors live on (default: WORLD).
        leader: the global rank that pushes (default 0).

    Raises:
        RefitError: torch.distributed is not initialized while there are tensors to gather.

    Example:
        >>> gathers = ShardedGathers([])   # no DTensors: gather() is never called
        >>> gathers.names
        []
    """

    def __init__(self, tensors: Sequence[tuple[str, Any]], *, group: Any = None, leader: int = 0) -> None:
        self.names = [n for n, _ in tensors]
        self._tensors = [t for _, t in tensors]
        self.group, self.leader = group, leader
        self._leading = False
        if self._tensors and not torch.distributed.is_initialized():
            raise RefitError(f"{self.names[0]}: a DTensor needs torch.distributed to be initialized (init_process_group) before it can be gathered")

    @property
    def _multi(self) -> bool:
        return bool(self._tensors) and torch.distributed.get_world_size(self.group) > 1

    def _device(self) -> torch.device:
        # the control messages go over the tensors' own backend (gloo: CPU, NCCL: their GPU)
        return self._tensors[0].to_local().device

    def _broadcast(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self._device())
        torch.distributed.broadcast(t, src=self.leader, group=self.group)
        return int(t.item())

    def _check_same_everywhere(self) -> None:
        """All ranks compare a digest of what they are about to gather (one all-gather)."""
        text = "\n".join(f"{n}|{tuple(t.shape)}|{t.dtype}|{t.placements}" for n, t in zip(self.names, self._tensors))
        mine = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
        world = torch.distributed.get_world_size(self.group)
        got = [torch.zeros(1, dtype=torch.int64, device=self._device()) for _ in range(world)]
        torch.distributed.all_gather(got, torch.tensor([mine], dtype=torch.int64, device=self._device()), group=self.group)
        differ = [r for r, g in enumerate(got) if int(g.item()) != mine]
        if differ:
            raise RefitError(
                f"the sharded tensors differ between ranks (ranks {differ} disagree with this one on names, shapes, dtypes or "
                f"placements of {len(self.names)} DTensors): build the source from the same model with the same options on every rank"
            )

    @contextlib.contextmanager
    def lead(self) -> Iterator[None]:
        """On the leader, around the push: followers join each gather; a stop is sent at the end,
        whether the push succeeded or raised.

        Raises:
            RefitError: called on another rank than the leader, or the ranks' tensors differ.
        """
        if self._multi:
            rank = torch.distributed.get_rank()
            if rank != self.leader:
                raise RefitError(f"lead() runs on the leader (rank {self.leader}); rank {rank} must call serve() instead")
            self._check_same_everywhere()
        self._leading = True
        try:
            yield
        finally:
            self._leading = False
            if self._multi:
                self._broadcast(_STOP)

    def serve(self) -> int:
        """On every rank but the leader: join the leader's gathers until its push ends.

        Returns:
            How many gathers this rank joined.

        Raises:
            RefitError: called on the leader, or the ranks' tensors differ.
        """
        if not self._multi:
            return 0
        rank = torch.distributed.get_rank()
        if rank == self.leader:
            raise RefitError(f"rank {rank} is the leader: push inside lead(), serve() is for the other ranks")
        self._check_same_everywhere()
        served = 0
        while (index := self._broadcast(0)) != _STOP:
            if not 0 <= index < len(self._tensors):
                raise RefitError(f"the leader asked for sharded tensor #{index}, but this rank has {len(self._tensors)}: the sources differ")
            with torch.no_grad():
                self._tensors[index].full_tensor()  # this rank's part of the collective; the result is dropped
            served += 1
        return served

    def gather(self, index: int) -> torch.Tensor:
        """The full tensor of ``tensors[index]`` on the leader (a new tensor on its device).

        Raises:
            RefitError: called outside :meth:`lead` while other ranks must join.
        """
        if self._multi:
            if not self._leading:
                raise RefitError(
                    f"{self.names[index]}: a sharded tensor is gathered by every rank together; push inside "
                    "`with source.lead():` on the leader while every other rank calls source.serve()"
                )
            self._broadcast(index)
        with torch.no_grad():
            return self._tensors[index].full_tensor()
