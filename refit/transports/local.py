"""``local``: sender and receiver in one process.

For refreshing an evaluation copy of a model, for tests, and as the reference every network
transport is checked against. The manifest still goes through the strict loader, so a local
push refuses exactly what a remote one would. Buckets live on the target's device (or the one
given) and are applied as soon as they are packed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from refit.errors import RefitError, ResolveError, problem_list
from refit.load import Loader
from refit.meta import Manifest
from refit.report import RefitReport
from refit.resolve import Resolver, TensorsResolver
from refit.transports.base import Sender


class LocalSender(Sender):
    """Pushes into ``target`` (a module, a dict of tensors, or any :class:`Resolver`) in-process.

    Args:
        target: what to load into (a :class:`Loader` is used as is, keeping its version).
        device: where staging buckets live; default: the device of the target's first tensor.
        require_complete: refuse pushes that do not cover every target tensor.
    """

    def __init__(
        self,
        target: torch.nn.Module | Mapping[str, torch.Tensor] | Resolver | Loader | None = None,
        *,
        device: str | torch.device | None = None,
        require_complete: bool = False,
    ) -> None:
        if target is None:
            raise RefitError("transport 'local' needs target=<module or dict of tensors>")
        if isinstance(target, Loader):  # an existing receiver state (version, torn) to push into
            self.loader = target
        else:
            resolver = target if hasattr(target, "resolve") else TensorsResolver(target)  # type: ignore[arg-type]
            self.loader = Loader(resolver, require_complete=require_complete, name="local")  # type: ignore[arg-type]
        if device is None:
            first = next(iter(getattr(self.loader.resolver, "tensors", {}).values()), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)
        self._bufs: list[torch.Tensor] = []

    def handshake(self, manifest: Manifest, version: int) -> None:
        problems = self.loader.prepare(manifest, version)
        if problems:
            raise ResolveError("local receiver refused the push; nothing was loaded:\n" + problem_list(problems), problems)

    def buffers(self, bucket_bytes: int, num_buffers: int) -> list[torch.Tensor]:
        if len(self._bufs) != num_buffers or self._bufs[0].numel() != bucket_bytes:
            self._bufs = [torch.empty(bucket_bytes, dtype=torch.uint8, device=self.device) for _ in range(num_buffers)]
        return self._bufs

    def wait_reusable(self, slot: int) -> None:
        return None  # applied synchronously in send()

    def send(self, index: int, slot: int, nbytes: int) -> None:
        self.loader.apply(index, self._bufs[slot], persistent=True)

    def finish(self) -> list[RefitReport]:
        return [self.loader.finish()]

    def abort(self, reason: str) -> None:
        self.loader.abort(reason)

    def close(self) -> None:
        self._bufs = []

    @property
    def version(self) -> int:
        return self.loader.version

    @property
    def torn(self) -> bool:
        return self.loader.torn


Transport = LocalSender
