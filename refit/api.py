"""``Refitter``: the trainer-side entry point."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

import torch

from refit.collect import Collector, StateLike
from refit.errors import PlanError, RefitError
from refit.integrity import check_checksum_option, pick
from refit.meta import Manifest
from refit.options import check_options, check_timeout
from refit.pack import Lazy
from refit.plan import DEFAULT_ALIGNMENT, DEFAULT_BUCKET_BYTES, PlanEntry, check_layout_options, default_tail_bytes, plan
from refit.report import RefitReport
from refit.send import stream
from refit.transports import load_transport
from refit.transports.base import EngineHandle, Progress, Sender
from refit.verify import VerifyResult, compare, sender_fingerprints


class Refitter:
    """Pushes a trainer's weights and their quantization scales to receivers.

    Args:
        transport: ``"local"``, ``"zmq"``, ``"cuda_ipc"`` or ``"nccl"`` (imported on first use),
            or a ready :class:`~refit.transports.base.Sender`.
        bucket_bytes: capacity of one staging bucket (default 512 MiB).
        alignment: byte alignment of tensors inside a bucket (power of two, default 256).
        tail_bytes: the buckets at the end are cut so that the last holds about this many bytes
            (at most twice): the receivers' apply of the last bucket overlaps nothing, so a
            short one ends the push sooner. Default 64 MiB when ``bucket_bytes`` is at least
            256 MiB, else 0 (every bucket filled up to ``bucket_bytes``).
        num_buffers: staging buffers in flight (default 2): memory per side is
            ``num_buffers * bucket_bytes`` whatever the model size.
        progress: optional ``progress(buckets_done, buckets_total)`` callback.
        engine: optional :class:`~refit.transports.base.EngineHandle` (e.g. the vLLM adapter's):
            its workers join the transport now and receive every push.
        receiver_options: options for the engine's receivers (with ``engine``).
        timeout: seconds any wait for a receiver may take before ``TransportError``.
        first_version: the version of the first push that omits ``version=`` (later ones
            count up from it). Default: the Refitter asks the receivers for their committed
            versions before its first such push and continues after the highest, so a
            restarted trainer just works. A receiver refuses a version not greater than its
            committed one (see ``RefitReceiver.reset_version``).
        checksum: per-bucket checksums, verified by each receiver before it applies a bucket
            (a mismatch refuses the push: :class:`~refit.IntegrityError`, see
            docs/reliability.md): ``None`` (off, the default), ``"auto"`` (``xxh3`` for host
            staging buffers, ``sum64`` for device ones), ``"xxh3"`` or ``"sum64"``.
        record_digests: receivers keep a sha256 of every tensor as received, for
            :meth:`verify` against targets that store tensors in another form (vLLM). Costs one
            sha256 pass over every byte on each receiver.
        **options: passed to the transport (e.g. ``target=`` for local, ``peers=`` for zmq).

    Example:
        >>> model = torch.nn.Linear(4, 4)
        >>> with Refitter("local", target=model) as r:
        ...     report = r.push({"weight": torch.ones(4, 4), "bias": torch.zeros(4)})
        >>> bool((model.weight == 1).all())
        True
    """

    def __init__(
        self,
        transport: str | Sender = "local",
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        alignment: int = DEFAULT_ALIGNMENT,
        tail_bytes: int | None = None,
        num_buffers: int = 2,
        progress: Progress | None = None,
        engine: EngineHandle | None = None,
        receiver_options: Mapping[str, Any] | None = None,
        timeout: float = 120.0,
        first_version: int | None = None,
        checksum: str | None = None,
        record_digests: bool = False,
        **options: Any,
    ) -> None:
        check_layout_options(bucket_bytes, alignment)
        if tail_bytes is None:
            tail_bytes = default_tail_bytes(bucket_bytes)
        plan([], bucket_bytes=bucket_bytes, alignment=alignment, tail_bytes=tail_bytes)  # checks tail_bytes
        if first_version is not None:
            _check_version(first_version, "first_version")
        if isinstance(num_buffers, bool) or not isinstance(num_buffers, int) or not 1 <= num_buffers <= 64:
            raise RefitError(f"num_buffers must be an int in [1, 64], got {num_buffers!r}")
        timeout = check_timeout(timeout, "timeout")  # type: ignore[assignment]
        checksum = check_checksum_option(checksum)
        if not isinstance(record_digests, bool):
            raise RefitError(f"record_digests must be True or False, got {record_digests!r:.80}")
        if isinstance(transport, Sender):
            halves, sender_class = None, type(transport)
        else:
            halves = load_transport(transport)
            sender_class = halves.sender
        if (checksum is not None or record_digests) and not sender_class.supports_checksum:
            raise RefitError(
                f"transport {sender_class.__name__} cannot carry checksums or record_digests; use local, zmq, cuda_ipc or nccl, "
                "or pass checksum=None, record_digests=False"
            )
        if progress is not None and not callable(progress):
            raise RefitError(f"progress must be a callable progress(buckets_done, buckets_total), got {type(progress).__name__}")
        self.engine, self.timeout = engine, timeout
        if isinstance(transport, Sender):
            if options:
                raise RefitError(f"options {sorted(options)} go to the transport's constructor; pass them there, not with a ready Sender")
            self.sender = transport
        else:
            halves = halves or load_transport(transport)  # loaded above: this only narrows the type
            if engine is not None:
                # checked before the workers are told to join, not after
                check_options(halves.sender, options, f"transport {transport!r}")
                check_options(halves.receiver_class(), dict(receiver_options or {}), f"the {transport!r} receiver (receiver_options)")
                infos = engine.open(transport, dict(receiver_options or {}))
                self.sender = halves.sender.for_receivers(infos, timeout=timeout, **options)
            else:
                if transport != "local":
                    options.setdefault("timeout", timeout)
                check_options(halves.sender, options, f"transport {transport!r}")
                self.sender = halves.sender(**options)
        self.transport = transport if isinstance(transport, str) else type(transport).__name__
        self.bucket_bytes, self.alignment, self.tail_bytes, self.num_buffers = bucket_bytes, alignment, tail_bytes, num_buffers
        self.sender.checksum = pick(checksum, self.sender.device)
        self.sender.record = record_digests
        self.sender.configure(bucket_bytes, num_buffers)
        self.progress = progress
        self._next_version = first_version  # None: ask the receivers before the first push
        self._last: tuple[list[PlanEntry], Manifest] | None = None
        self._collect = Collector()

    @property
    def manifest(self) -> Manifest | None:
        """The layout of the last push (bucket sizes, offsets), or None before the first."""
        return self._last[1] if self._last is not None else None

    def plan(self, entries: list[PlanEntry]) -> Manifest:
        """The manifest for ``entries``; reused while names, shapes and dtypes do not change."""
        if self._last is not None and (self._last[0] is entries or self._last[0] == entries):
            return self._last[1]
        manifest = plan(entries, bucket_bytes=self.bucket_bytes, alignment=self.alignment, tail_bytes=self.tail_bytes)
        self._last = (entries, manifest)
        return manifest

    def push(self, state: StateLike, scales: Mapping[str, torch.Tensor | Lazy] | None = None, *, version: int | None = None) -> RefitReport:
        """Push ``state`` (name -> tensor or :class:`~refit.Lazy`) and ``scales`` (name -> tensor).

        Args:
            state: the weights: a mapping or an iterable of ``(name, tensor)`` pairs (e.g.
                ``model.named_parameters()``); a value may be a :class:`~refit.Lazy`.
            scales: quantization state (weight scales, activation amax, KV-cache scales), planned
                and checked ahead of the weights; scales and amax found in ``state`` by name are
                treated the same way.
            version: the version the receivers commit; it must be greater than each one's
                committed version. Default: the next of this Refitter's numbering (see
                ``first_version``).

        Returns:
            The sender's :class:`RefitReport`, with each receiver's report in ``receivers``.

        Raises:
            PlanError: invalid input (nothing sent).
            ResolveError: a receiver refused (nothing loaded anywhere).
            TransportError: the stream broke or timed out (receivers that had applied a bucket
                are torn until the next complete push).
        """
        t0 = time.perf_counter()
        got = self._collect(state, scales)
        if not got.entries:
            raise PlanError("nothing to push: state and scales are both empty; nothing was sent")
        manifest = self.plan(got.entries)
        if version is not None:
            _check_version(version, "version")
        t1 = time.perf_counter()
        pending: Future[list[RefitReport]] | None = None
        accepted = False
        v = 0  # the version of this push, fixed by handshake()

        def handshake() -> None:  # called by stream() once the first bucket is packed
            nonlocal pending, accepted, v
            if self.engine is not None:  # only now: a push that fails before this leaves the workers idle
                pending = self.engine.begin_receive(self.timeout)
            v = self._number() if version is None else version
            self.sender.handshake(manifest, v)
            accepted = True
            if version is not None and (self._next_version is None or self._next_version <= version):
                self._next_version = version + 1  # numbering continues after an explicit version

        try:
            try:
                with torch.no_grad():  # sources may require grad (parameters); packing is not part of any graph
                    stages = stream(
                        self.sender,
                        manifest,
                        got.sources,
                        num_buffers=self.num_buffers,
                        handshake=handshake,
                        progress=self.progress,
                        blocks=got.blocks,
                    )
                t3 = time.perf_counter()
                receivers = self.sender.finish()
            except BaseException as exc:
                if accepted:  # before that, nothing reached a receiver (a refusal ends the push there)
                    self.sender.abort(f"sender failed: {type(exc).__name__}: {exc}")
                raise
        except BaseException:
            if pending is not None:  # let the workers' receive calls end before re-raising
                with contextlib.suppress(BaseException):
                    pending.result(timeout=self.timeout + 30)
            raise
        if pending is not None:
            receivers = pending.result(timeout=self.timeout + 30) or receivers
        t4 = time.perf_counter()
        return RefitReport(
            version=v,
            bytes=manifest.total_bytes,
            buckets=manifest.num_buckets,
            tensors=manifest.num_tensors,
            # stream includes the handshake; a transport may add stages of its own (e.g. drain)
            seconds={"plan": t1 - t0, **stages, "stream": t3 - t1, "finish": t4 - t3, **self.sender.stages, "total": t4 - t0},
            receivers=receivers,
        )

    def verify(self, state: StateLike, scales: Mapping[str, torch.Tensor | Lazy] | None = None) -> list[VerifyResult]:
        """Compare a sha256 fingerprint of ``state`` and ``scales`` (as for :meth:`push`) with
        each receiver's, between pushes: a debugging aid (``refit verify``), not for every step.

        Each receiver answers with the digest of every tensor it holds (``stored``), or of what
        it received when its target stores tensors in another form (``received``: the vLLM
        workers, recorded only for pushes made with ``record_digests=True``); see
        :mod:`refit.verify`. With an ``engine``, each worker answers through its extension.

        Returns:
            One :class:`~refit.verify.VerifyResult` per receiver (per worker for vLLM):
            ``ok``, and the names that differ or are missing.

        Raises:
            PlanError: invalid ``state`` or ``scales``.
            RefitError: this transport cannot ask its receivers.
            TransportError: a receiver did not answer in time or is busy with a push.
        """
        mine = sender_fingerprints(Collector()(state, scales).sources)
        rpc = getattr(self.engine, "rpc", None)
        if rpc is not None:  # the vLLM workers: not listening between pushes, asked through their extension
            answers = []
            for reply in rpc("refit_fingerprint"):
                if "error" in reply:
                    raise RefitError(f"verify: {reply['error'].get('worker', 'a worker')}: {reply['error'].get('message', reply['error'])}")
                digests = {k: bytes.fromhex(v) for k, v in reply["digests"].items()}
                answers.append(compare(mine, reply["peer"], reply["version"], reply["source"], digests))
            return answers
        got = self.sender.fingerprints()
        if got is None:
            raise RefitError(f"transport {self.transport} cannot ask its receivers for fingerprints; verify works with local, zmq, cuda_ipc and nccl")
        return [compare(mine, f.peer, f.version, f.source, f.digests) for f in got]

    def _number(self) -> int:
        """The next version (consumed even if the push fails: a receiver never sees one twice)."""
        if self._next_version is None:
            committed = self.sender.committed_versions() or [0]
            self._next_version = max(committed) + 1
        v, self._next_version = self._next_version, self._next_version + 1
        if v >= 1 << 63:
            raise RefitError(f"version {v} does not fit the wire (at most 2**63 - 1); reset_version() the receivers and pass first_version=1")
        return v

    def close(self) -> None:
        """Release the sender's sockets and buffers and close the engine handle, if any (the engines keep running)."""
        self._collect.clear()
        self.sender.close()
        if self.engine is not None:
            self.engine.close()

    def __enter__(self) -> Refitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_version(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 1 << 63:
        raise RefitError(f"{what} must be an int in [1, 2**63) (versions start at 1; 0 means nothing committed), got {value!r:.80}")
