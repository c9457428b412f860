"""``refit verify``: compare a saved state with what running receivers hold, from the shell.

For a debugging run: save the state the trainer pushed as a ``.safetensors`` file
(``safetensors.torch.save_file``; never a pickle: ``torch.load`` could run code), then ``refit verify --peer ADDRESS --state PATH``. Each receiver (a
``RefitReceiver`` that is serving) answers with the sha256 of its tensors; the command prints
one line per receiver and exits 0 when every one matches, 1 when a tensor differs (named), 2 on
an error. vLLM engines are verified from the trainer with ``Refitter(engine=...).verify``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from refit.api import Refitter
from refit.errors import RefitError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``verify`` sub-command of the ``refit`` command."""
    v = sub.add_parser("verify", help="compare a saved state's sha256 with what serving receivers hold")
    v.add_argument("--peer", action="append", required=True, metavar="ADDRESS", help="a receiver's address (its info()['address']), repeatable")
    v.add_argument("--state", required=True, metavar="PATH", help="the pushed state as a .safetensors file")
    v.add_argument("--transport", choices=["zmq", "cuda_ipc", "nccl"], default="zmq", help="the receivers' transport (default zmq)")
    v.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each receiver (default 30)")
    v.set_defaults(func=command)


def load_state(path: str) -> dict[str, torch.Tensor]:
    """The tensors of the ``.safetensors`` file ``path`` (no pickle: a safetensors file holds
    only a JSON header and raw bytes).

    Raises:
        RefitError: a missing or unreadable file, or the safetensors package is missing.
    """
    if not Path(path).is_file():
        raise RefitError(f"--state {path!r}: no such file; save the pushed state with safetensors.torch.save_file(state, path)")
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise RefitError("refit verify reads .safetensors files: pip install safetensors") from None
    try:
        loaded: dict[str, torch.Tensor] = load_file(path)
    except Exception as exc:  # a corrupt or foreign file
        raise RefitError(f"--state {path!r}: cannot read it as safetensors ({type(exc).__name__}: {exc})") from None
    return loaded


def command(args: argparse.Namespace) -> int:
    """Run ``refit verify``; returns the exit status."""
    state = load_state(args.state)
    options: dict[str, Any] = {"device": "cpu"} if args.transport != "zmq" else {}
    with Refitter(args.transport, peers=list(args.peer), timeout=args.timeout, **options) as r:
        results = r.verify(state)
    for res in results:
        print(res.summary())
    return 0 if all(res.ok for res in results) else 1
