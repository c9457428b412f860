"""The set-up barrier of a collective group: one outcome for every rank, decided in the store."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from refit.transports.collective import GroupSetupFailed, barrier, group_store, mark_failed

pytestmark = pytest.mark.unit


def arrive(store: torch.distributed.Store, ranks: list[int], world: int, timeout: float) -> dict[int, tuple[str, float]]:
    """Ranks ``ranks`` of a group of ``world`` arrive at the barrier together; what each got."""
    keys = group_store(store, "g")
    out: dict[int, tuple[str, float]] = {}

    def one(rank: int) -> None:
        t0 = time.monotonic()
        try:
            barrier(keys, "init", world, rank, timeout, f"rank {rank}")
            out[rank] = ("go", time.monotonic() - t0)
        except GroupSetupFailed as exc:
            out[rank] = (str(exc), time.monotonic() - t0)

    threads = [threading.Thread(target=one, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    return out


def test_every_rank_arrives() -> None:
    store = torch.distributed.HashStore()
    assert {r: v[0] for r, v in arrive(store, [0, 1, 2], 3, 5.0).items()} == {0: "go", 1: "go", 2: "go"}
    mark_failed(store, "g", "too late")  # once every rank arrived, a mark changes nothing
    assert arrive(store, [3], 3, 5.0)[3][0] == "go"


def test_a_missing_rank_fails_everyone_and_a_late_one_too() -> None:
    store = torch.distributed.HashStore()
    got = arrive(store, [0, 1], 3, 0.5)
    for rank in (0, 1):
        text, took = got[rank]
        assert "rank(s) [2] of 3 did not arrive within 0.5 s (phase set-up)" in text and took < 3, got
    late = arrive(store, [2], 3, 5.0)[2]  # it would complete the count: it must not go on alone
    assert "rank(s) [2] of 3 did not arrive" in late[0] and late[1] < 1, late


def test_a_marked_failure_stops_the_waiting_ranks_at_once_and_the_first_mark_wins() -> None:
    store = torch.distributed.HashStore()
    threading.Timer(0.2, mark_failed, (store, "g", "rx1 (rank 2) could not join: no device")).start()
    got = arrive(store, [0, 1], 3, 30.0)
    for rank in (0, 1):
        text, took = got[rank]
        assert text == f"rank {rank}: rx1 (rank 2) could not join: no device (phase set-up)" and took < 5, got
    mark_failed(store, "g", "another reason")
    assert "no device" in arrive(store, [2], 3, 5.0)[2][0]
    mark_failed(torch.distributed.HashStore(), "other", "x")  # never raises
