"""Optional CURVE authentication of the control channel (and of ``zmq``'s bucket bytes): an
authenticated push lands bit for bit on every transport; a sender without the key or with a
wrong one gets a TransportError within its timeout that says to check the key, and the
receiver keeps serving and then accepts the right sender."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
import zmq

from refit import RefitError, Refitter, TransportError
from refit.auth import CurveAuth
from refit.digest import digest
from refit.receiver import RefitReceiver

SECRET = "correct horse battery staple"
TRANSPORTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # receiver and sender options
    "zmq": ({}, {}),
    "cuda_ipc": ({"device": "cpu"}, {"device": "cpu"}),
    "nccl": ({"device": "cpu"}, {"device": "cpu", "backend": "gloo"}),
}


@pytest.mark.unit
def test_keys_from_one_secret_and_checks() -> None:
    a, b = CurveAuth.from_secret(SECRET), CurveAuth.from_secret(SECRET.encode())
    assert a == b and len(a.server_public) == 40 and a.server_public != a.client_public
    assert zmq.curve_public(a.secret_of("server")) == a.server_public
    assert CurveAuth.from_secret("another secret, 16+ chars").client_public != a.client_public
    assert "secret_of" not in repr(a) and a.secret_of("client").decode() not in repr(a)
    with pytest.raises(RefitError, match="at least 16 characters"):
        CurveAuth.from_secret("short")
    with pytest.raises(RefitError, match="Z85-encoded CURVE key"):
        CurveAuth(server_public=b"x", client_public=a.client_public)
    sender_only = CurveAuth(server_public=a.server_public, client_public=a.client_public, client_secret=a.client_secret)
    with pytest.raises(RefitError, match="a receiver needs CurveAuth.server_secret"):
        RefitReceiver({"w": torch.zeros(1)}, "zmq", auth=sender_only)
    with pytest.raises(RefitError, match="auth must be a refit.auth.CurveAuth"):
        RefitReceiver({"w": torch.zeros(1)}, "zmq", auth=SECRET)


@pytest.mark.integration
@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_only_the_sender_with_the_key_is_heard(transport: str) -> None:
    rx_opts, tx_opts = TRANSPORTS[transport]
    auth = CurveAuth.from_secret(SECRET)
    target = {f"w{i}": torch.zeros(64, 128) for i in range(3)}
    rx = RefitReceiver(target, transport, name="rx", auth=auth, **rx_opts)
    t = threading.Thread(target=rx.serve, kwargs={"poll": 0.2}, daemon=True)
    t.start()
    try:
        timeout = 1.0
        wrong = CurveAuth.from_secret("not the engine's secret at all")
        for bad, hint in ((None, "pass the same auth="), (wrong, "check that auth= holds the keys")):
            t0 = time.monotonic()
            with Refitter(transport, peers=[rx.info()], timeout=timeout, auth=bad, **tx_opts) as r:
                with pytest.raises(TransportError, match=f"did not answer within {timeout} s .*{hint}"):
                    r.push({k: torch.ones_like(v) for k, v in target.items()})
            assert time.monotonic() - t0 < timeout + 5
        assert rx.version == 0 and not rx.torn and rx.last_error is None  # nothing reached it
        g = torch.Generator().manual_seed(3)
        pushed = {k: torch.randn(v.shape, generator=g) for k, v in target.items()}
        with Refitter(transport, peers=[rx.info()], timeout=20, auth=auth, bucket_bytes=64 << 10, **tx_opts) as r:
            assert r.push(pushed).version == 1
        assert digest(target) == digest(pushed) and rx.version == 1
    finally:
        rx.stop()
        t.join(10)
        rx.close()
