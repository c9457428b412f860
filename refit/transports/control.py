"""The push protocol over ZMQ control sockets, shared by ``zmq``, ``cuda_ipc`` and ``nccl``.

The sender's side, ``peers.PeerGroup``, has one DEALER socket per receiver: ``handshake``
offers the manifest (only its digest when the receiver accepted that layout before), gathers
every verdict and refuses the whole push if one receiver refuses; ``send_bucket`` /
``wait_slot`` implement the bounded window; ``finish`` collects each receiver's report.

This module is the receiver's side, :class:`ControlServer`: one ROUTER socket bound to loopback (or ``ipc://`` with
owner-only permissions). :meth:`ControlServer.receive` runs one push through a Loader; how a
bucket's bytes arrive is the transport's ``bucket_source``.

Every wait is bounded; a timeout raises :class:`TransportError` naming the peer, the phase and
the bucket. Message order per peer is FIFO (ZMQ guarantees it per connection), which is what
the acks rely on. See docs/protocol.md.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from typing import Any

import torch
import zmq

from refit.auth import DOMAIN, CurveAuth, check_auth
from refit.errors import ResolveError, TransportError, WireError, problem_list
from refit.load import Loader
from refit.report import RefitReport
from refit.transports.io_threads import IoCpus, io_context
from refit.transports.io_threads import io_cpus as io_thread_cpus
from refit.transports.peers import poll_ms
from refit.transports.receive_ahead import Ahead, Staged, socket_pair
from refit.wire import (
    Abort,
    Ack,
    Bucket,
    Done,
    FingerprintRequest,
    Fingerprints,
    Finish,
    Hello,
    Message,
    Probe,
    Status,
    Verdict,
    decode,
    encode,
    peek_push_id,
)

DEFAULT_ADDRESS = "tcp://127.0.0.1:*"
SETUP_FAILED = "transport set-up failed"  # how a refusal says the receiver could not join the transport


class _SenderAborted(TransportError):
    """The sender abandoned the push (no need to tell it)."""


Frames = list[Any]


def _deadline(timeout: float | None) -> float | None:
    """The ``time.monotonic()`` at which ``timeout`` seconds from now have passed (None: never)."""
    return None if timeout is None else time.monotonic() + timeout


# ---------------------------------------------------------------- receiver side

BucketSource = Callable[[Bucket, Frames], tuple[torch.Tensor, bool]]
"""A bucket's bytes from its header and frames, and whether they sit in a reused staging buffer
(so that whatever the loader leaves holding views of them must be copied out first)."""


CLOSE_LINGER_MS = 500  # how long close() lets already-sent replies reach their sender


class _Held:
    """What a :class:`ControlServer` releases, kept apart from it so that a server dropped
    without ``close()`` (caught in a reference cycle, say a traceback's) still releases it through
    its finalizer. Left to the garbage collector, a context it made itself would hang the process:
    pyzmq's ``Context.__del__`` waits in ``term()`` for a socket the collector has not closed yet."""

    def __init__(self, sock: zmq.Socket[Any], own_ctx: zmq.Context[Any] | None) -> None:
        self.sock = sock
        self.own_ctx = own_ctx  # None: the process-wide context, never ended here
        self.zap: Any = None  # the CURVE authenticator's thread
        self.wake: tuple[socket.socket, socket.socket] | None = None  # see ControlServer.wake_pair
        self.ipc_path: str | None = None  # the socket file an ipc:// bind made

    def release(self) -> None:
        self.sock.close(linger=CLOSE_LINGER_MS)
        for end in self.wake or ():
            end.close()
        if self.zap is not None:
            self.zap.stop()
        if self.own_ctx is not None:
            self.own_ctx.term()
        if self.ipc_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.ipc_path)


class ControlServer:
    """The receiver's control socket (ROUTER) and the protocol loop of one push.

    Args:
        address: ``tcp://HOST:PORT`` (port ``*`` picks a free one) or ``ipc:///path``.
            Default: loopback, free port.
        name: this receiver's name in reports and errors.
        auth: CURVE keys (:mod:`refit.auth`): only senders holding the expected client key are
            heard, and everything on the socket is encrypted. Default: unauthenticated.
        io_cpus: where the socket's ZMQ I/O thread runs (:mod:`refit.transports.io_threads`);
            default ``"inherit"``: the calling thread's CPUs.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        name: str = "receiver",
        auth: CurveAuth | None = None,
        io_cpus: IoCpus = "inherit",
    ) -> None:
        self.name = name
        auth = check_auth(auth)
        # ZAP handlers and I/O thread affinity are per context: an authenticated receiver, or one
        # whose I/O thread runs elsewhere, gets its own context (the process-wide one may run already)
        self.io_cpus = io_thread_cpus(io_cpus)  # None: the I/O thread runs where this thread may
        own = io_context(self.io_cpus) if self.io_cpus else (zmq.Context() if auth is not None else None)
        self.ctx = own or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self._held = _Held(self.sock, own)
        self._release = weakref.finalize(self, self._held.release)  # by close(), or when collected
        self._release.atexit = False  # at exit the process's end frees it all; a thread may still poll the socket
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if auth is not None:
            self._start_zap(auth)
        self.address = self._bind(address)
        self._peer: bytes | None = None  # identity of the sender of the push in progress
        self._busy = False  # a push is in progress: from its accepted Hello to its end
        self.strays = 0  # messages dropped as garbage while no push was in progress
        #: a message taken early (a Hello during a push, one received ahead): the next one served
        self.pending: tuple[Message, Frames] | None = None

    def _start_zap(self, auth: CurveAuth) -> None:
        """Make the socket a CURVE server whose ZAP handler admits only ``auth.client_public``."""
        from zmq.auth.thread import ThreadAuthenticator

        class _Known:
            def callback(self, domain: str, key: bytes) -> bool:
                return key == auth.client_public

        zap = self._held.zap = ThreadAuthenticator(self.ctx)
        zap.start()
        zap.configure_curve_callback(DOMAIN, credentials_provider=_Known())
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
                self._held.ipc_path = path  # removed on close
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
        """Send ``msg`` to the current sender (best effort: dropped, never raised, if the sender is gone)."""
        if self._peer is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.send_multipart([self._peer, encode(msg)], flags=zmq.NOBLOCK)

    def next_message(self, deadline: float | None, wake: socket.socket | None = None) -> tuple[Message, Frames] | None:
        """Next message of the current sender and its extra frames, or None once ``deadline``
        (``time.monotonic()``; None: never) has passed or ``wake`` became readable.

        Only the sender of the push in progress is heard: anyone else is answered that this
        receiver is busy, and their message is dropped. Garbage is answered with why (with its
        push id when readable) and dropped, except from the sender of the push in progress,
        whose stream it breaks (WireError). So no stray or hostile message can end a wait.
        """
        if self.pending is not None:
            got, self.pending = self.pending, None
            return got
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._poll(poll_ms(left), wake):
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

    def _poll(self, ms: int, wake: socket.socket | None) -> bool:
        """Whether a message is ready within ``ms`` (-1: no limit); False as soon as ``wake`` is readable."""
        if wake is None:
            return bool(self.sock.poll(ms))
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        ready = dict(poller.poll(ms))
        return wake not in ready and self.sock in ready

    def wake_pair(self) -> tuple[socket.socket, socket.socket]:
        """The socket pair that ends a wait of :meth:`next_message` on another thread (see
        :mod:`refit.transports.receive_ahead`); made once, closed with the server."""
        if self._held.wake is None:
            self._held.wake = socket_pair()
        return self._held.wake

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
        push_timeout: float | None = None,
        prefetch: Executor | None = None,
    ) -> RefitReport | None:
        """Run one message-driven push (buckets arrive as Bucket messages) through ``loader``.

        See ReceiverTransport.receive. ``on_hello(hello)`` runs the transport's set-up before
        the handshake is answered; ``after_apply(msg)`` runs between applying a bucket and
        acknowledging it (e.g. to record a GPU event: the ack releases the sender's buffer).
        ``timeout`` bounds the wait for a push to begin; ``push_timeout`` (default: ``timeout``)
        every wait once it has begun. With ``prefetch`` (an executor of one thread), the socket
        is that thread's while a bucket is applied: it receives the next message and, when it
        is a bucket of this push in another slot, gets its bytes from ``bucket_source`` (a
        staging copy off the applying thread); the applying thread takes the socket back
        before it acknowledges the bucket.
        Transports whose bytes do not travel as messages (a collective broadcast) compose
        :meth:`begin`, their own bucket loop and :meth:`end`.
        """
        in_push = timeout if push_timeout is None else push_timeout
        hello = self.begin(loader, timeout, on_hello, push_timeout=in_push)
        if hello is None:
            return None
        with self.guard(loader, hello):
            staged: Staged | None = None  # the bytes of the next bucket, got while the one before was applied
            next_bucket = 0
            while True:
                t0 = time.perf_counter()
                msg, frames, hello = self._in_push(loader, hello, in_push, f"buckets, bucket {next_bucket}")
                t1 = time.perf_counter()
                loader.note("wait", t1 - t0)
                if isinstance(msg, Finish):
                    return self._commit(loader, hello)
                if not isinstance(msg, Bucket):
                    raise WireError(f"{self.name}: unexpected {type(msg).__name__} in phase buckets")
                data, persistent = staged.bytes() if staged is not None and staged.msg is msg else bucket_source(msg, frames)
                ahead = None if prefetch is None else Ahead(self, msg, hello, bucket_source, in_push, prefetch)
                loader.note("stage", time.perf_counter() - t1)
                try:
                    loader.apply(msg.index, data, persistent=persistent, checksum=msg.checksum)
                    if after_apply is not None:
                        after_apply(msg)
                except BaseException:
                    if ahead is not None:  # the socket back before the guard answers; no copy still writing a slot
                        ahead.join(quiet=True)
                    raise
                t2 = time.perf_counter()
                staged = None if ahead is None else ahead.join()
                loader.note("stage", time.perf_counter() - t2)
                next_bucket = msg.index + 1
                self.reply(Ack(hello.push_id, msg.index))

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
            got = self.next_message(deadline)
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
            elif isinstance(msg, FingerprintRequest):  # refit verify
                self._answer_fingerprint(loader, msg)
            elif not isinstance(msg, Abort):
                self.reply(Abort(msg.push_id, f"{self.name}: no push in progress"))

    def _answer_fingerprint(self, loader: Loader, msg: FingerprintRequest) -> None:
        try:
            source, digests = loader.fingerprint()
            answer: Message = Fingerprints(msg.push_id, loader.version, source, digests, self.name)
        except Exception as exc:  # e.g. a target tensor of a dtype that cannot travel: say so, keep serving
            answer = Abort(msg.push_id, f"{self.name}: cannot fingerprint its tensors: {type(exc).__name__}: {exc}"[:1000])
        self.reply(answer)

    def bucket_header(self, loader: Loader, hello: Hello, timeout: float | None, index: int) -> Bucket:
        """The next message of the push, which must be bucket ``index``'s header (for transports
        whose bytes travel otherwise but whose checksums come as ``bucket`` messages: nccl)."""
        msg, _, _ = self._in_push(loader, hello, timeout, f"buckets, bucket {index}")
        if not isinstance(msg, Bucket) or msg.index != index:
            raise WireError(f"{self.name}: expected the header of bucket {index}, got {type(msg).__name__}")
        return msg

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
            got = self.next_message(_deadline(timeout))
            if got is None:
                raise TransportError(f"{self.name}: sender went silent for {timeout} s (phase {phase})")
            msg, frames = got
            if isinstance(msg, Abort) and msg.push_id == hello.push_id:
                raise _SenderAborted(f"{self.name}: sender aborted the push (phase {phase}): {msg.reason}")
            if msg.push_id == hello.push_id:
                return msg, frames, hello
            if isinstance(msg, Hello):  # the sender started over: abandon this push, serve that one next
                self.pending = (msg, frames)
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
            got = self.next_message(_deadline(timeout))
            if got is None or not isinstance(got[0], Hello) or got[0].manifest is None:
                raise TransportError(f"{self.name}: sender did not send the manifest it was asked for (phase handshake)")
            hello = got[0]
            manifest = hello.manifest
        if manifest is None or manifest.digest != hello.digest:
            self.reply(Verdict(hello.push_id, False, False, ("manifest does not match its digest",), self.name))
            raise WireError(f"{self.name}: manifest does not match its digest")
        problems = loader.prepare(manifest, hello.version, checksum=hello.checksum, record=hello.record)
        # echoing the checksum says this receiver verifies it (one that predates checksums omits it)
        self.reply(Verdict(hello.push_id, not problems, False, tuple(problems[:1000]), self.name, "" if problems else hello.checksum))
        if problems:
            raise ResolveError(f"{self.name} refused the push; nothing was loaded:\n" + problem_list(problems), problems)
        return hello

    def close(self) -> None:
        """Close the socket, stop the CURVE authenticator, and end the context if this server made it.

        Replies already sent (the Done of a push that just committed) still go out for up to
        ``CLOSE_LINGER_MS``: a receiver closed right after ``receive()`` returned must not leave
        its sender waiting out its timeout for a Done that was dropped."""
        self._release()
