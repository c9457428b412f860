"""Joining a broadcast group: the backend named in the rendezvous record."""

from __future__ import annotations

import torch

from refit.transports.collective import Backend, Communicator, Rendezvous, group_store
from refit.transports.gloo_group import GlooCommunicator
from refit.transports.nccl_group import NcclCommunicator


def connect(rdv: Rendezvous, store: torch.distributed.Store, rank: int, device: torch.device, *, host: str | None = None) -> Communicator:
    """Join the group described by ``rdv`` as ``rank`` (blocks until every rank joined).

    Args:
        rdv: the rendezvous record (the sender passes its own, rank ignored).
        store: the sender's store (or a client of it).
        rank: 0 for the sender.
        device: where this rank's buffers live (NCCL: the CUDA device to use).
        host: address this rank's gloo sockets listen on (default: ``rdv.host`` when it is a
            loopback address, else the host's default interface).

    Raises:
        GroupSetupFailed: a rank did not arrive within ``rdv.timeout``, or one marked the group
            failed (:func:`mark_failed`).
        TransportError: set-up failed here.
    """
    prefixed = group_store(store, rdv.group)
    if rdv.backend is Backend.GLOO:
        return GlooCommunicator(rdv, prefixed, rank, host=host)
    return NcclCommunicator(rdv, prefixed, rank, device)
