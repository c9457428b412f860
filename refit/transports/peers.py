"""The sender's side of the push protocol: one DEALER socket per receiver (:class:`Peer`) and
the push's control messages to all of them (:class:`PeerGroup`): the handshake, the bounded
window of unacknowledged buckets, the reports, and the version probe. The receiver's side is
``control.ControlServer``; docs/protocol.md has the messages."""


from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import zmq

from refit.auth import CurveAuth, check_auth
from refit.errors import ResolveError, TransportError, WireError, problem_list
from refit.meta import Manifest
from refit.report import RefitReport
from refit.wire import Abort, Ack, Bucket, Done, FingerprintRequest, Fingerprints, Finish, Hello, Message, Probe, Status, Verdict, decode, encode


def poll_ms(timeout: float | None) -> int:
    """A timeout in seconds as ZMQ milliseconds (None: wait forever, -1)."""
    return -1 if timeout is None else max(0, int(timeout * 1000))


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


_MAYBE_COMMITTED = (
    "; the receiver may have committed the push before its answer was lost: its version and status say"
    " (a Refitter never reuses a version, so pushing again is safe)"
)


class Peer:
    """Control connection from the sender to one receiver (a DEALER socket)."""

    def __init__(self, ctx: zmq.Context[Any], address: str, timeout: float, auth: CurveAuth | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self.auth = auth
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, poll_ms(timeout))
        if auth is not None:  # a CURVE client: the receiver admits only the key it expects
            self.sock.curve_serverkey = auth.server_public
            self.sock.curve_publickey = auth.client_public
            self.sock.curve_secretkey = auth.secret_of("client")
        self.sock.connect(address)
        self.digests: set[str] = set()  # layouts this receiver accepted
        self.acked = -1

    def send(self, msg: Message, *data: Any) -> None:
        """Send msg with data frames after it, without copying them.

        Raises:
            TransportError: nothing took the message within the timeout (receiver unreachable or the CURVE handshake failed).
        """
        try:
            self.sock.send_multipart([encode(msg), *data], copy=False)
        except zmq.Again:  # nothing connected to take it: unreachable, or the CURVE handshake failed
            what = f"could not send {type(msg).__name__}: no connection"
            raise TransportError(f"receiver {self.address} did not answer within {self.timeout} s ({what}){self._unheard()}") from None

    def recv(self, phase: str, bucket: int | None = None, timeout: float | None = None) -> Message:
        """Next message from this receiver, or TransportError after ``timeout`` (default: the peer's)."""
        if not self.sock.poll(poll_ms(self.timeout if timeout is None else timeout)):
            where = f", bucket {bucket}" if bucket is not None else ""
            hint = self._unheard() if phase.startswith("handshake") else _MAYBE_COMMITTED if phase == "finish" else ""
            raise TransportError(f"receiver {self.address} did not answer within {self.timeout} s (phase {phase}{where}){hint}")
        frames = self.sock.recv_multipart()
        try:
            return decode(frames[0])
        except WireError as exc:
            hint = _MAYBE_COMMITTED if phase == "finish" else ""
            raise TransportError(f"receiver {self.address} sent an invalid message in phase {phase}: {exc}{hint}") from exc

    def _unheard(self) -> str:
        """What to check when a receiver says nothing (one that rejects our key is silent)."""
        if self.auth is not None:
            return "; it rejects senders whose CURVE key it does not expect: check that auth= holds the keys the receiver uses"
        return "; is it running and reachable? A receiver started with auth= drops senders without its key: pass the same auth="

    def close(self) -> None:
        """Close the socket, dropping unsent messages."""
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
        self._hello: tuple[str, bool] = ("", False)  # the push's checksum algorithm and record flag
        self._in_slot: dict[int, int] = {}  # staging slot -> last bucket sent from it (this push)

    def handshake(
        self,
        manifest: Manifest,
        version: int,
        num_buffers: int,
        extra: Callable[[int], bytes] | None = None,
        after_hello: Callable[[], None] | None = None,
        *,
        checksum: str = "",
        record: bool = False,
    ) -> None:
        """Offer the push to every receiver; return when all accepted.

        ``extra(i)`` is the transport's set-up payload for receiver ``i`` (IPC handles, a
        rendezvous); ``after_hello()`` runs once every Hello is sent, before the verdicts are
        awaited (e.g. to join a collective group the receivers join on Hello). ``checksum``
        (an algorithm name, ``""`` for none) announces per-bucket checksums: a receiver that
        does not echo it in its verdict cannot verify them, and the push stops there.
        ``record`` asks the receivers to keep a sha256 of every tensor they receive.

        Raises:
            ResolveError: one or more receivers refused (all are told to abort).
            TransportError: a receiver did not answer.
        """
        self.push_id = random.getrandbits(62)
        extras = [extra(i) if extra is not None else b"" for i in range(len(self.peers))]
        for p, x in zip(self.peers, extras):
            p.acked = -1
            known = manifest.digest in p.digests
            p.send(Hello(self.push_id, version, manifest.digest, None if known else manifest, num_buffers, x, checksum, record))
        self._hello = (checksum, record)
        refusals: list[str] = []
        try:
            if after_hello is not None:
                after_hello()
            for p, x in zip(self.peers, extras):
                verdict = self._verdict(p, manifest, version, num_buffers, x)
                if verdict.accept and verdict.checksum != checksum:
                    raise TransportError(
                        f"receiver {p.address} ({verdict.peer}) does not verify {checksum} checksums (it predates them): "
                        "upgrade refit on the receivers, or push with checksum=None"
                    )
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

    def fingerprints(self) -> list[Fingerprints]:
        """Every receiver's per-tensor sha256 (``refit verify``), asked between pushes.

        Raises:
            TransportError: a receiver did not answer within ``timeout``, is busy with another
                sender's push, or could not fingerprint its tensors.
        """
        self.push_id = random.getrandbits(62)
        for p in self.peers:
            p.send(FingerprintRequest(self.push_id))
        out = []
        for p in self.peers:
            msg = self._expect(p, "verify (fingerprint)")
            if not isinstance(msg, Fingerprints):
                raise TransportError(f"receiver {p.address}: expected its fingerprints, got {type(msg).__name__}")
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
            p.send(Hello(self.push_id, version, manifest.digest, manifest, num_buffers, extra, *self._hello))
        raise TransportError(f"receiver {p.address} asked for the manifest twice")

    def _expect(self, p: Peer, phase: str, bucket: int | None = None, timeout: float | None = None) -> Message:
        """Next message of this push from ``p`` (stale ones skipped) within ``timeout`` (default:
        the group's); an Abort raises."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            msg = p.recv(phase, bucket, timeout)
            if msg.push_id != self.push_id:
                if time.monotonic() > deadline:
                    raise TransportError(f"receiver {p.address}: only stale messages (phase {phase})")
                continue
            if isinstance(msg, Abort):
                where = f", bucket {bucket}" if bucket is not None else ""
                raise TransportError(f"receiver {p.address} aborted the push (phase {phase}{where}): {msg.reason}")
            if (isinstance(msg, Ack) and msg.index <= p.acked) or (isinstance(msg, Verdict) and phase != "handshake"):
                continue  # a repeat of a message already handled (a faulty link may deliver one twice)
            return msg

    def send_bucket(self, index: int, nbytes: int, slot: int, *data: Any, checksum: bytes | None = None) -> None:
        """Send bucket ``index``'s header (and its bytes, if given) to every receiver."""
        for p in self.peers:
            p.send(Bucket(self.push_id, index, nbytes, slot, checksum), *data)
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
        reports: list[RefitReport] = []
        failed: list[str] = []
        deadline = time.monotonic() + self.timeout  # one bound for the whole phase, however many receivers
        for p in self.peers:
            try:
                reports.append(self._done(p, deadline))
            except TransportError as exc:
                failed.append(str(exc))
        if failed:
            # Each receiver commits on its own: say which did, so the caller knows what serves what.
            others = "; ".join(f"{r.peer} committed version {r.version}" for r in reports) or "none committed"
            raise TransportError("; ".join(failed) + f" (the other receivers: {others})")
        return reports

    def _done(self, p: Peer, deadline: float) -> RefitReport:
        while True:
            msg = self._expect(p, "finish", timeout=max(deadline - time.monotonic(), 0.05))
            if isinstance(msg, Ack):  # trailing acks of the last buckets
                p.acked = max(p.acked, msg.index)
                continue
            if not isinstance(msg, Done):
                raise TransportError(f"receiver {p.address}: expected done, got {type(msg).__name__}")
            return msg.report

    def abort(self, reason: str) -> None:
        """Tell every receiver the push is abandoned (best effort, never blocks or raises)."""
        self._in_slot.clear()  # nothing of this push is waited for again
        for p in self.peers:
            with contextlib.suppress(Exception):
                p.sock.send_multipart([encode(Abort(self.push_id, reason[:1000]))], flags=zmq.NOBLOCK)

    def close(self) -> None:
        """Close the connection to every receiver."""
        for p in self.peers:
            p.close()
        self.peers = []
