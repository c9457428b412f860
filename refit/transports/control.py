"""The push protocol over ZMQ control sockets, shared by ``zmq``, ``cuda_ipc`` and ``nccl``.

Sender side, :class:`PeerGroup`: one DEALER socket per receiver. ``handshake`` offers the
manifest (only its digest when the receiver accepted that layout before), gathers every verdict
and refuses the whole push if one receiver refuses. ``send_bucket`` / ``wait_slot`` implement
the bounded window (a staging buffer is reused only after every receiver acknowledged the bucket
in it). ``finish`` collects each receiver's report.

Receiver side, :class:`ControlServer`: one ROUTER socket bound to loopback (or ``ipc://`` with
owner-only permissions). :meth:`ControlServer.receive` runs one push through a Loader; how a
bucket's bytes arrive is the transport's ``bucket_source``.

Every wait is bounded; a timeout raises :class:`TransportError` naming the peer, the phase and
the bucket. Message order per peer is FIFO (ZMQ guarantees it per connection), which is what
the acks rely on. See docs/protocol.md.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import zmq

from refit.auth import DOMAIN, CurveAuth, check_auth
from refit.errors import ResolveError, TransportError, WireError, problem_list
from refit.load import Loader
from refit.meta import Manifest
from refit.report import RefitReport
from refit.wire import Abort, Ack, Bucket, Done, Finish, Hello, Message, Probe, Status, Verdict, decode, encode, peek_push_id

DEFAULT_ADDRESS = "tcp://127.0.0.1:*"
SETUP_FAILED = "transport set-up failed"  # how a refusal says the receiver could not join the transport


class _SenderAborted(TransportError):
    """The sender abandoned the push (no need to tell it)."""


Frames = list[Any]


def _ms(timeout: float | None) -> int:
    return -1 if timeout is None else max(0, int(timeout * 1000))


def _deadline(timeout: float | None) -> float | None:
    """The ``time.monotonic()`` at which ``timeout`` seconds from now have passed (None: never)."""
    return None if timeout is None else time.monotonic() + timeout


Peers = Sequence[str | Mapping[str, Any]] | str | Mapping[str, Any]


def peer_infos(peers: Peers, transport: str) -> list[dict[str, Any]]:
    """Receivers as ``info()`` dicts, from what a user may pass for ``peers``: one or many of
    an address string or what the receiver's ``info()`` returned (the same on every transport).

    Raises:
        TransportError: a peer of another form, or an info without an ``address``.
    """
    if isinstance(peers, str | Mapping):
        peers = [peers]
    if not isinstance(peers, Sequence):
        raise TransportError(f"{transport}: peers must be a list of receiver addresses or info() dicts, got {type(peers).__name__}")
    infos = []
    for p in peers:
        info = dict(p) if isinstance(p, Mapping) else {"address": p}
        if not isinstance(info.get("address"), str) or not info["address"]:
            raise TransportError(f"{transport}: each peer is a receiver's address or its info() dict (with an 'address'); got {p!r:.200}")
        infos.append(info)
    return infos


class Peer:
    """Control connection from the sender to one receiver (a DEALER socket)."""

    def __init__(self, ctx: zmq.Context[Any], address: str, timeout: float, auth: CurveAuth | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self.auth = auth
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, _ms(timeout))
        if auth is not None:  # a CURVE client: the receiver admits only the key it expects
            self.sock.curve_serverkey = auth.server_public
            self.sock.curve_publickey = auth.client_public
            self.sock.curve_secretkey = auth.secret_of("client")
        self.sock.connect(address)
        self.digests: set[str] = set()  # layouts this receiver accepted
        self.acked = -1

    def send(self, msg: Message, *data: Any) -> None:
        try:
            self.sock.send_multipart([encode(msg), *data], copy=False)
        except zmq.Again:
            raise TransportError(f"receiver {self.address}: could not send {type(msg).__name__} within {self.timeout} s") from None

    def recv(self, phase: str, bucket: int | None = None) -> Message:
        """Next message from this receiver, or TransportError after ``timeout``."""
        if not self.sock.poll(_ms(self.timeout)):
            where = f", bucket {bucket}" if bucket is not None else ""
            hint = ""
            if phase.startswith("handshake"):  # a receiver that rejects our key says nothing: say what to check
                hint = (
                    "; it rejects senders whose CURVE key it does not expect: check that auth= holds the keys the receiver uses"
                    if self.auth is not None
                    else "; is it running and reachable? A receiver started with auth= drops senders without its key: pass the same auth="
                )
            raise TransportError(f"receiver {self.address} did not answer within {self.timeout} s (phase {phase}{where}){hint}")
        frames = self.sock.recv_multipart()
        try:
            return decode(frames[0])
        except WireError as exc:
            raise TransportError(f"receiver {self.address} sent an invalid message in phase {phase}: {exc}") from exc

    def close(self) -> None:
        self.sock.close(linger=0)


class PeerGroup:
    """The sender's side of the protocol, to every receiver of one push."""

    def __init__(self, addresses: Sequence[str], *, timeout: float, ctx: zmq.Context[Any] | None = None, auth: CurveAuth | None = None) -> None:
        if not addresses:
            raise TransportError("no receivers: pass peers=[address, ...] (each receiver's info()['address'])")
        auth = check_auth(auth)
        self.ctx = ctx or zmq.Context.instance()
        self.timeout = timeout
        self.peers = [Peer(self.ctx, a, timeout, auth) for a in addresses]
        self.push_id = 0
        self._in_slot: dict[int, int] = {}  # staging slot -> last bucket sent from it (this push)

    def handshake(
        self,
        manifest: Manifest,
        version: int,
        num_buffers: int,
        extra: Callable[[int], bytes] | None = None,
        after_hello: Callable[[], None] | None = None,
    ) -> None:
        """Offer the push to every receiver; return when all accepted.

        ``extra(i)`` is the transport's set-up payload for receiver ``i`` (IPC handles, a
        rendezvous); ``after_hello()`` runs once every Hello is sent, before the verdicts are
        awaited (e.g. to join a collective group the receivers join on Hello).

        Raises:
            ResolveError: one or more receivers refused (all are told to abort).
            TransportError: a receiver did not answer.
        """
        self.push_id = random.getrandbits(62)
        extras = [extra(i) if extra is not None else b"" for i in range(len(self.peers))]
        for p, x in zip(self.peers, extras):
            p.acked = -1
            known = manifest.digest in p.digests
            p.send(Hello(self.push_id, version, manifest.digest, None if known else manifest, num_buffers, x))
        refusals: list[str] = []
        try:
            if after_hello is not None:
                after_hello()
            for p, x in zip(self.peers, extras):
                verdict = self._verdict(p, manifest, version, num_buffers, x)
                if verdict.accept:
                    p.digests.add(manifest.digest)
                else:
                    refusals += [f"[{verdict.peer}] {x}" for x in verdict.problems]
        except TransportError:
            self.abort("handshake failed")
            raise
        if refusals:
            self.abort("a receiver refused the push")
            raise ResolveError(
                f"push refused by {len({r.split(']')[0] for r in refusals})} receiver(s); nothing was loaded:\n" + problem_list(refusals),
                refusals,
            )

    def committed_versions(self) -> list[int]:
        """Every receiver's committed version (see :meth:`versions`); what the senders built on
        a PeerGroup answer for ``Sender.committed_versions``."""
        return [s.version for s in self.versions()]

    def versions(self) -> list[Status]:
        """Every receiver's committed version (and torn state), asked between pushes.

        Raises:
            TransportError: a receiver did not answer within ``timeout`` or is busy with
                another sender's push.
        """
        self.push_id = random.getrandbits(62)
        for p in self.peers:
            p.send(Probe(self.push_id))
        out = []
        for p in self.peers:
            msg = self._expect(p, "handshake (version probe)")
            if not isinstance(msg, Status):
                raise TransportError(f"receiver {p.address}: expected its status, got {type(msg).__name__}")
            out.append(msg)
        return out

    def _verdict(self, p: Peer, manifest: Manifest, version: int, num_buffers: int, extra: bytes) -> Verdict:
        for _ in range(2):
            msg = self._expect(p, "handshake")
            if not isinstance(msg, Verdict):
                raise TransportError(f"receiver {p.address}: expected a verdict, got {type(msg).__name__}")
            if not msg.need_manifest:
                return msg
            p.digests.discard(manifest.digest)
            p.send(Hello(self.push_id, version, manifest.digest, manifest, num_buffers, extra))
        raise TransportError(f"receiver {p.address} asked for the manifest twice")

    def _expect(self, p: Peer, phase: str, bucket: int | None = None) -> Message:
        """Next message of this push from ``p`` (stale ones skipped); an Abort raises."""
        deadline = time.monotonic() + self.timeout
        while True:
            msg = p.recv(phase, bucket)
            if msg.push_id != self.push_id:
                if time.monotonic() > deadline:
                    raise TransportError(f"receiver {p.address}: only stale messages (phase {phase})")
                continue
            if isinstance(msg, Abort):
                where = f", bucket {bucket}" if bucket is not None else ""
                raise TransportError(f"receiver {p.address} aborted the push (phase {phase}{where}): {msg.reason}")
            return msg

    def send_bucket(self, index: int, nbytes: int, slot: int, *data: Any) -> None:
        for p in self.peers:
            p.send(Bucket(self.push_id, index, nbytes, slot), *data)
        self._in_slot[slot] = index

    def wait_slot(self, slot: int) -> bool:
        """Block until every receiver acknowledged the last bucket sent from ``slot`` in this
        push; False if none was (the slot is free at once)."""
        index = self._in_slot.get(slot)
        if index is None:
            return False
        self.wait_acked(index)
        return True

    def wait_acked(self, index: int) -> None:
        """Block until every receiver acknowledged bucket ``index`` (and all before it)."""
        for p in self.peers:
            while p.acked < index:
                msg = self._expect(p, "buckets", p.acked + 1)
                if not isinstance(msg, Ack) or msg.index != p.acked + 1:
                    raise TransportError(f"receiver {p.address}: expected ack of bucket {p.acked + 1}, got {msg}")
                p.acked = msg.index

    def finish(self, *, send_finish: bool = True) -> list[RefitReport]:
        """Collect every receiver's Done (after telling each that the stream is complete,
        unless the transport's receivers know it themselves: ``send_finish=False``)."""
        self._in_slot.clear()  # every bucket is acknowledged before Done
        for p in self.peers if send_finish else ():
            p.send(Finish(self.push_id))
        reports = []
        for p in self.peers:
            while True:
                msg = self._expect(p, "finish")
                if isinstance(msg, Ack):  # trailing acks of the last buckets
                    p.acked = msg.index
                    continue
                if not isinstance(msg, Done):
                    raise TransportError(f"receiver {p.address}: expected done, got {type(msg).__name__}")
                reports.append(msg.report)
                break
        return reports

    def abort(self, reason: str) -> None:
        self._in_slot.clear()  # nothing of this push is waited for again
        for p in self.peers:
            with contextlib.suppress(Exception):
                p.sock.send_multipart([encode(Abort(self.push_id, reason[:1000]))], flags=zmq.NOBLOCK)

    def close(self) -> None:
        for p in self.peers:
            p.close()
        self.peers = []


# ---------------------------------------------------------------- receiver side

BucketSource = Callable[[Bucket, Frames], torch.Tensor]


class ControlServer:
    """The receiver's control socket (ROUTER) and the protocol loop of one push.

    Args:
        address: ``tcp://HOST:PORT`` (port ``*`` picks a free one) or ``ipc:///path``.
            Default: loopback, free port.
        name: this receiver's name in reports and errors.
        auth: CURVE keys (:mod:`refit.auth`): only senders holding the expected client key are
            heard, and everything on the socket is encrypted. Default: unauthenticated.
    """

    def __init__(
        self, address: str = DEFAULT_ADDRESS, *, name: str = "receiver", ctx: zmq.Context[Any] | None = None, auth: CurveAuth | None = None
    ) -> None:
        self.name = name
        auth = check_auth(auth)
        self._zap: Any = None
        self._own_ctx = auth is not None and ctx is None
        # ZAP handlers are per context (one per process-wide instance): an authenticated
        # receiver gets its own context, so receivers with different keys can share a process
        self.ctx = zmq.Context() if self._own_ctx else (ctx or zmq.Context.instance())
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if auth is not None:
            self._start_zap(auth)
        self.address = self._bind(address)
        self._peer: bytes | None = None  # identity of the sender of the push in progress
        self._busy = False  # a push is in progress: from its accepted Hello to its end
        self.strays = 0  # messages dropped as garbage while no push was in progress
        self._pending: tuple[Message, Frames] | None = None  # a Hello that arrived during a push

    def _start_zap(self, auth: CurveAuth) -> None:
        """Make the socket a CURVE server whose ZAP handler admits only ``auth.client_public``."""
        from zmq.auth.thread import ThreadAuthenticator

        class _Known:
            def callback(self, domain: str, key: bytes) -> bool:
                return key == auth.client_public

        self._zap = ThreadAuthenticator(self.ctx)
        self._zap.start()
        self._zap.configure_curve_callback(DOMAIN, credentials_provider=_Known())
        self.sock.zap_domain = DOMAIN.encode()
        self.sock.curve_secretkey = auth.secret_of("server")
        self.sock.curve_publickey = auth.server_public
        self.sock.curve_server = True

    def _bind(self, address: str) -> str:
        """Bind; the address a sender can use (``0.0.0.0`` is reported as this host's address)."""
        try:
            if address.startswith("ipc://"):
                path = address[len("ipc://") :]
                old = os.umask(0o077)  # the socket file is created owner-only
                try:
                    self.sock.bind(address)
                finally:
                    os.umask(old)
                os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
            else:
                self.sock.bind(address)
            bound = str(self.sock.getsockopt_string(zmq.LAST_ENDPOINT))
            if bound.startswith("tcp://0.0.0.0:"):  # every interface: tell senders one they can reach
                bound = f"tcp://{socket.gethostbyname(socket.gethostname())}:{bound.rsplit(':', 1)[1]}"
        except (zmq.ZMQError, OSError) as exc:  # socket.gaierror is an OSError
            self.close()
            raise TransportError(
                f"{self.name}: cannot bind {address!r}: {exc}. Use tcp://<an address of this host>:<port or *> "
                "(default tcp://127.0.0.1:*, loopback only) or ipc:///<path>"
            ) from None
        return bound

    def reply(self, msg: Message) -> None:
        if self._peer is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.send_multipart([self._peer, encode(msg)], flags=zmq.NOBLOCK)

    def _next(self, deadline: float | None) -> tuple[Message, Frames] | None:
        """Next message of the current sender and its extra frames, or None once ``deadline``
        (``time.monotonic()``; None: never) has passed.

        Only the sender of the push in progress is heard: anyone else is answered that this
        receiver is busy, and their message is dropped. Garbage is answered with why (with its
        push id when readable) and dropped, except from the sender of the push in progress,
        whose stream it breaks (WireError). So no stray or hostile message can end a wait.
        """
        if self._pending is not None:
            got, self._pending = self._pending, None
            return got
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.sock.poll(_ms(left)):
                return None
            frames = self.sock.recv_multipart(copy=False)
            ident = frames[0].bytes
            if self._busy and ident != self._peer:  # another sender while a push is in progress
                self._refuse(ident, frames, f"{self.name} is busy with another push")
                continue
            try:
                if len(frames) < 2:
                    raise WireError("message with no header frame")
                msg = decode(frames[1].buffer)
            except WireError as exc:
                self._refuse(ident, frames, f"{self.name}: {exc}")
                if self._busy:  # the sender of the push in progress garbled its own stream
                    raise WireError(f"{self.name}: {exc}") from None
                self.strays += 1
                continue
            self._peer = ident
            return msg, frames[2:]

    def _refuse(self, ident: bytes, frames: Frames, reason: str) -> None:
        """Answer a message that is not heard with an Abort saying why (best effort)."""
        push_id = peek_push_id(frames[1].buffer) if len(frames) >= 2 else 0
        with contextlib.suppress(zmq.ZMQError):
            self.sock.send_multipart([ident, encode(Abort(push_id, reason[:1000]))], flags=zmq.NOBLOCK)

    def receive(
        self,
        loader: Loader,
        timeout: float | None,
        bucket_source: BucketSource,
        *,
        on_hello: Callable[[Hello], None] | None = None,
        after_apply: Callable[[Bucket], None] | None = None,
        persistent: bool = False,
        push_timeout: float | None = None,
    ) -> RefitReport | None:
        """Run one message-driven push (buckets arrive as Bucket messages) through ``loader``.

        See ReceiverTransport.receive. ``on_hello(hello)`` runs the transport's set-up before
        the handshake is answered; ``after_apply(msg)`` runs between applying a bucket and
        acknowledging it (e.g. to record a GPU event: the ack releases the sender's buffer);
        ``persistent`` says the buckets ``bucket_source`` returns are reused staging buffers.
        ``timeout`` bounds the wait for a push to begin; ``push_timeout`` (default: ``timeout``)
        every wait once it has begun.
        Transports whose bytes do not travel as messages (a collective broadcast) compose
        :meth:`begin`, their own bucket loop and :meth:`end`.
        """
        in_push = timeout if push_timeout is None else push_timeout
        hello = self.begin(loader, timeout, on_hello, push_timeout=in_push)
        if hello is None:
            return None
        with self.guard(loader, hello):
            next_bucket = 0
            while True:
                msg, frames, hello = self._in_push(loader, hello, in_push, f"buckets, bucket {next_bucket}")
                if isinstance(msg, Bucket):
                    loader.apply(msg.index, bucket_source(msg, frames), persistent=persistent)
                    if after_apply is not None:
                        after_apply(msg)
                    next_bucket = msg.index + 1
                    self.reply(Ack(hello.push_id, msg.index))
                elif isinstance(msg, Finish):
                    return self._commit(loader, hello)
                else:
                    raise WireError(f"{self.name}: unexpected {type(msg).__name__} in phase buckets")

    def begin(
        self,
        loader: Loader,
        timeout: float | None,
        on_hello: Callable[[Hello], None] | None = None,
        *,
        push_timeout: float | None,
    ) -> Hello | None:
        """Wait up to ``timeout`` for a push and answer its handshake (waiting up to
        ``push_timeout`` for any further message of it).

        ``on_hello(hello)`` runs first (transport set-up from ``hello.extra``). Messages of no
        push (a late Abort of an earlier one) are skipped; a :class:`Probe` is answered with this
        receiver's committed version. Returns the accepted Hello, or None if no push began.

        Raises:
            ResolveError: the push was refused (the sender was told; nothing is loaded).
        """
        deadline = _deadline(timeout)
        self._busy = False  # a new wait: no push is in progress
        while True:
            got = self._next(deadline)
            if got is None:
                return None
            msg = got[0]
            if isinstance(msg, Hello):
                self._busy = True  # from now on only this Hello's sender is heard
                try:
                    return self._accept(loader, msg, push_timeout, on_hello)
                except BaseException:
                    self._busy = False
                    raise
            if isinstance(msg, Probe):  # a sender numbering its pushes asks where we are
                self.reply(Status(msg.push_id, loader.version, loader.torn, self.name))
            elif not isinstance(msg, Abort):
                self.reply(Abort(msg.push_id, f"{self.name}: no push in progress"))

    def end(self, loader: Loader, hello: Hello, timeout: float | None, *, expect_finish: bool = True) -> RefitReport:
        """Wait for Finish, commit, reply Done (after a transport's own bucket loop). With
        ``expect_finish=False`` (a transport whose bucket loop proves the stream complete),
        commit at once."""
        with self.guard(loader, hello):
            if not expect_finish:
                return self._commit(loader, hello)
            t0 = time.perf_counter()
            msg, _, hello = self._in_push(loader, hello, timeout, "finish")
            loader.note("wait_finish", time.perf_counter() - t0)
            if not isinstance(msg, Finish):
                raise WireError(f"{self.name}: expected finish, got {type(msg).__name__}")
            return self._commit(loader, hello)

    @contextlib.contextmanager
    def guard(self, loader: Loader, hello: Hello) -> Iterator[None]:
        """On any failure inside: abandon the push (torn if applied) and tell the sender."""
        self._busy = True
        try:
            yield
        except BaseException as exc:
            loader.abort(str(exc))
            if not isinstance(exc, _SenderAborted):
                text = str(exc) if str(exc).startswith(self.name) else f"{self.name}: {exc}"
                self.reply(Abort(hello.push_id, text[:1000]))
            raise
        finally:
            self._busy = False

    def _in_push(self, loader: Loader, hello: Hello, timeout: float | None, phase: str) -> tuple[Message, Frames, Hello]:
        """Next message of the push in progress; stale ones are skipped, a sender's Abort or
        silence raises TransportError."""
        while True:
            got = self._next(_deadline(timeout))
            if got is None:
                raise TransportError(f"{self.name}: sender went silent for {timeout} s (phase {phase})")
            msg, frames = got
            if isinstance(msg, Abort) and msg.push_id == hello.push_id:
                raise _SenderAborted(f"{self.name}: sender aborted the push (phase {phase}): {msg.reason}")
            if msg.push_id == hello.push_id:
                return msg, frames, hello
            if isinstance(msg, Hello):  # the sender started over: abandon this push, serve that one next
                self._pending = (msg, frames)
                raise TransportError(f"{self.name}: a new push began during phase {phase}; the previous one is abandoned")

    def _commit(self, loader: Loader, hello: Hello) -> RefitReport:
        report = loader.finish()
        self.reply(Done(hello.push_id, report))
        return report

    def _accept(self, loader: Loader, hello: Hello, timeout: float | None, on_hello: Callable[[Hello], None] | None) -> Hello:
        """Answer a Hello (asking for the manifest when only a digest came); raise on refusal."""
        if on_hello is not None:
            try:
                on_hello(hello)
            except Exception as exc:
                self.reply(Verdict(hello.push_id, False, False, (f"{SETUP_FAILED}: {exc}"[:1000],), self.name))
                raise
        manifest = hello.manifest or loader.knows(hello.digest)
        if manifest is None:
            self.reply(Verdict(hello.push_id, False, True, (), self.name))
            got = self._next(_deadline(timeout))
            if got is None or not isinstance(got[0], Hello) or got[0].manifest is None:
                raise TransportError(f"{self.name}: sender did not send the manifest it was asked for (phase handshake)")
            hello = got[0]
            manifest = hello.manifest
        if manifest is None or manifest.digest != hello.digest:
            self.reply(Verdict(hello.push_id, False, False, ("manifest does not match its digest",), self.name))
            raise WireError(f"{self.name}: manifest does not match its digest")
        problems = loader.prepare(manifest, hello.version)
        self.reply(Verdict(hello.push_id, not problems, False, tuple(problems[:1000]), self.name))
        if problems:
            raise ResolveError(f"{self.name} refused the push; nothing was loaded:\n" + problem_list(problems), problems)
        return hello

    def close(self) -> None:
        self.sock.close(linger=0)
        if self._zap is not None:
            self._zap.stop()
            self._zap = None
        if self._own_ctx:
            self.ctx.term()
            self._own_ctx = False
        address = getattr(self, "address", "")  # None yet if the bind failed
        if address.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(address[len("ipc://") :])
