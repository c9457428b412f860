"""Optional CURVE authentication and encryption of the ZMQ control channel.

Without it, a receiver's socket is open to any process that can reach it (loopback by default,
owner-only for ``ipc://``): such a process can offer a push while the receiver is idle (during
a push only that push's sender is heard). With ``auth=``, the receiver's socket is a CURVE
server that admits only clients holding the expected key (checked by a ZAP handler before any
message reaches refit), and every control message (and every ``zmq`` bucket) is encrypted.

One record, :class:`CurveAuth`, serves both sides: receivers need the server key pair and the
clients' public keys, senders the client key pair and the server's public key. The simplest
set-up derives all of them from one shared secret (:meth:`CurveAuth.from_secret`), so trainer
and engines share one string (an environment variable, a secret store) and no key files.

Why CURVE and not TLS: it is built into libzmq (``zmq.has("curve")``), needs no certificates,
and authenticates both directions. Rejected: a token in ``Hello`` (it would be checked after
the socket already accepted and decoded the message, and it travels in the clear).

Covered: the control channel of every transport, and the bucket bytes of ``zmq``. Not covered:
``cuda_ipc`` buckets (same host, the IPC handles travel over the authenticated channel) and the
``nccl`` data path (the rendezvous store and gloo/NCCL sockets: keep them on a trusted network).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from refit.errors import RefitError

DOMAIN = "refit"  # the ZAP domain of refit's sockets


def _z85_key(v: Any, what: str) -> bytes:
    if isinstance(v, str):
        v = v.encode("ascii", "replace")
    if not isinstance(v, bytes) or len(v) != 40:
        raise RefitError(f"{what} must be a Z85-encoded CURVE key (40 characters, as zmq.curve_keypair() makes), got {type(v).__name__}")
    return v


@dataclass(frozen=True, kw_only=True)
class CurveAuth:
    """CURVE keys for refit's ZMQ sockets (Z85-encoded, 40 bytes each).

    Args:
        server_public: the receivers' public key (both sides).
        server_secret: the receivers' secret key (receivers only).
        client_public: the senders' public key: a sender presents it, a receiver admits it.
        client_secret: the senders' secret key (senders only).

    Example:
        >>> auth = CurveAuth.from_secret(os.environ["REFIT_SECRET"])  # doctest: +SKIP
        >>> rx = RefitReceiver(model, "zmq", auth=auth)  # doctest: +SKIP
        >>> Refitter("zmq", peers=[rx.info()], auth=auth)  # doctest: +SKIP
    """

    server_public: bytes
    client_public: bytes
    server_secret: bytes | None = None
    client_secret: bytes | None = None

    def __post_init__(self) -> None:
        for name in ("server_public", "client_public", "server_secret", "client_secret"):
            v = getattr(self, name)
            if v is not None or name.endswith("public"):
                object.__setattr__(self, name, _z85_key(v, f"CurveAuth.{name}"))

    @classmethod
    def from_secret(cls, secret: str | bytes) -> CurveAuth:
        """Both sides' key pairs derived from one shared secret (at least 16 characters).

        Raises:
            RefitError: the secret is too short, or this libzmq lacks CURVE.
        """
        zmq = _zmq()
        raw = secret.encode() if isinstance(secret, str) else secret
        if not isinstance(raw, bytes) or len(raw) < 16:
            raise RefitError("the shared secret must be at least 16 characters (e.g. secrets.token_hex(16))")
        keys = {}
        for side in ("server", "client"):
            # any 32 bytes are a valid Curve25519 secret key (libsodium clamps them)
            sk = zmq.utils.z85.encode(hashlib.sha256(b"refit-curve-" + side.encode() + b"\0" + raw).digest())
            keys[f"{side}_secret"], keys[f"{side}_public"] = sk, zmq.curve_public(sk)
        return cls(**keys)

    def secret_of(self, side: str) -> bytes:
        """The secret key ``side`` (``"server"`` or ``"client"``) must hold.

        Raises:
            RefitError: this record lacks it.
        """
        v = self.server_secret if side == "server" else self.client_secret
        if v is None:
            who = "a receiver" if side == "server" else "a sender"
            raise RefitError(f"{who} needs CurveAuth.{side}_secret; pass it, or build both sides with CurveAuth.from_secret()")
        return v

    def __repr__(self) -> str:  # never print secrets into logs
        return f"CurveAuth(server_public={self.server_public!r}, client_public={self.client_public!r}, secrets=...)"


def _zmq() -> Any:
    import zmq
    import zmq.utils.z85

    if not zmq.has("curve"):
        raise RefitError("this libzmq was built without CURVE; install pyzmq from its wheels (they include it) to use auth=")
    return zmq


def check_auth(auth: object) -> CurveAuth | None:
    """``auth`` as given (None: unauthenticated), or a RefitError naming what was passed."""
    if auth is not None and not isinstance(auth, CurveAuth):
        raise RefitError(f"auth must be a refit.auth.CurveAuth (e.g. CurveAuth.from_secret(...)) or None, got {type(auth).__name__}")
    if auth is not None:
        _zmq()
    return auth
