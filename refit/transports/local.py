"""``local``: sender and receiver in one process.

For refreshing an evaluation copy of a model, for tests, and as the reference every network
transport is checked against. The manifest still goes through the strict loader, so a local
push refuses exactly what a remote one would. Buckets live on the target's device (or the one
given) and are applied as soon as they are packed.

On a GPU, for a module or dict target (pure copies into its tensors), the buckets are applied
on a stream of their own, so applying bucket ``i`` overlaps packing bucket ``i + 1`` (as it
does when the receiver is another device or process): each copy's tail, and the gap before the
next copy starts, is filled by the other stream's copies.
Events order the two: a bucket is applied after it was packed, and a buffer is packed again
only after it was applied. ``finish`` joins the streams before it commits.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from typing_extensions import override

from refit.errors import RefitError, ResolveError, problem_list
from refit.load import Loader
from refit.meta import Manifest
from refit.report import RefitReport
from refit.resolve import Resolver, TensorsResolver
from refit.transports.base import Sender
from refit.wire import Fingerprints


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
            resolver = target if hasattr(target, "resolve") else TensorsResolver(target)
            self.loader = Loader(resolver, require_complete=require_complete, name="local")  # type: ignore[arg-type]
        if device is None:
            first = next(iter(getattr(self.loader.resolver, "tensors", {}).values()), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)
        self._bufs: list[torch.Tensor] = []
        self._apply: torch.cuda.Stream | None = None  # the GPU stream buckets are applied on
        self._packed: list[torch.cuda.Event] = []  # per buffer: recorded after it was packed
        self._applied: list[torch.cuda.Event] = []  # per buffer: after it was applied

    supports_checksum = True

    @override
    def handshake(self, manifest: Manifest, version: int) -> None:
        problems = self.loader.prepare(manifest, version, checksum=self.checksum or "", record=self.record)
        if problems:
            raise ResolveError("local receiver refused the push; nothing was loaded:\n" + problem_list(problems), problems)

    @override
    def buffers(self, bucket_bytes: int, num_buffers: int) -> list[torch.Tensor]:
        if len(self._bufs) != num_buffers or self._bufs[0].numel() != bucket_bytes:
            self._drain()
            self._bufs = [torch.empty(bucket_bytes, dtype=torch.uint8, device=self.device) for _ in range(num_buffers)]
            if self.device.type == "cuda" and isinstance(self.loader.resolver, TensorsResolver):
                # other resolvers may run load hooks that allocate: those stay on the caller's stream
                if self._apply is None:
                    self._apply = torch.cuda.Stream(self.device)
                self._packed = [torch.cuda.Event() for _ in self._bufs]
                self._applied = [torch.cuda.Event() for _ in self._bufs]
        return self._bufs

    @override
    def wait_reusable(self, slot: int) -> None:
        if self._apply is not None:  # packing waits on the GPU until the buffer was applied
            torch.cuda.current_stream(self.device).wait_event(self._applied[slot])  # no-op before its first record

    @override
    def send(self, index: int, slot: int, nbytes: int, checksum: bytes | None = None) -> None:
        if self._apply is None:
            self.loader.apply(index, self._bufs[slot], persistent=True, checksum=checksum)
            return
        self._packed[slot].record(torch.cuda.current_stream(self.device))
        self._apply.wait_event(self._packed[slot])
        try:
            with torch.cuda.stream(self._apply):
                self.loader.apply(index, self._bufs[slot], persistent=True, checksum=checksum)
        finally:  # also after a refusal: copies already queued must end before the buffer is reused
            self._applied[slot].record(self._apply)

    @override
    def finish(self) -> list[RefitReport]:
        if self._apply is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._apply)
        return [self.loader.finish()]

    def _drain(self) -> None:
        """Wait for the apply stream before its buffers are freed or replaced."""
        if self._apply is not None:
            self._apply.synchronize()

    @override
    def committed_versions(self) -> list[int] | None:
        return [self.loader.version]

    @override
    def fingerprints(self) -> list[Fingerprints] | None:
        source, digests = self.loader.fingerprint()
        return [Fingerprints(0, self.loader.version, source, digests, self.loader.name)]

    @override
    def abort(self, reason: str) -> None:
        self.loader.abort(reason)

    @override
    def close(self) -> None:
        self._drain()
        self._bufs = []

    @property
    def version(self) -> int:
        """The loader's committed version (0 before the first push)."""
        return self.loader.version

    @property
    def torn(self) -> bool:
        """True if a push failed after a bucket was applied: the target holds a mix of versions until the next complete push."""
        return self.loader.torn

