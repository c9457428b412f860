"""``Refitter.verify`` / ``refit verify``: the sender's sha256 fingerprint against each
receiver's, after a push, on every transport: all match after a clean push; a tensor altered on
the receiver afterwards is reported by name; targets that store tensors in another form compare
what they received (``record_digests``)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from refit import Refitter
from refit.cli import main as cli_main
from refit.errors import PlanError, WireError
from refit.receiver import RefitReceiver
from refit.resolve import Resolution, TensorsResolver
from refit.verify import compare
from refit.wire import FingerprintRequest, Fingerprints, decode, encode

RX_TX: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "zmq": ({}, {}),
    "cuda_ipc": ({"device": "cpu"}, {"device": "cpu"}),
    "nccl": ({"device": "cpu"}, {"device": "cpu", "backend": "gloo"}),
}


def state(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    weights = {f"layers.{i}.w": torch.randn(32, 64, generator=g) for i in range(4)}
    weights["emb"] = torch.randn(5000, 8, generator=g).to(torch.bfloat16)  # chunked over 2 buckets
    scales = {f"layers.{i}.w_scale": torch.rand((), generator=g) + 0.5 for i in range(3)}
    return weights, scales


def zeros(seed: int = 0) -> dict[str, torch.Tensor]:
    w, s = state(seed)
    return {k: torch.zeros_like(v) for k, v in {**w, **s}.items()}


class Opaque:
    """A resolver whose target stores tensors in another form (like vLLM's fused ones): it has
    no ``fingerprints``, so a receiver can only report what it received."""

    stable = True

    def __init__(self, target: dict[str, torch.Tensor]) -> None:
        self.inner = TensorsResolver(target)

    def resolve(self, meta: Any) -> Resolution:
        return self.inner.resolve(meta)

    def required_keys(self) -> set[str]:
        return self.inner.required_keys()

    def post_load(self) -> None:
        pass


@contextlib.contextmanager
def refitter(transport: str, target: Any, **kw: Any) -> Iterator[Refitter]:
    if transport == "local":
        with Refitter("local", target=target, bucket_bytes=64 << 10, **kw) as r:
            yield r
        return
    rx_opts, tx_opts = RX_TX[transport]
    rx = RefitReceiver(target, transport, name=f"{transport}-rx", **rx_opts)
    t = threading.Thread(target=rx.serve, kwargs={"poll": 0.2}, daemon=True)
    t.start()
    try:
        with Refitter(transport, peers=[rx.info()], bucket_bytes=64 << 10, timeout=30, **tx_opts, **kw) as r:
            yield r
    finally:
        rx.stop()
        t.join(30)
        rx.close()


@pytest.mark.integration
@pytest.mark.parametrize("transport", ["local", *sorted(RX_TX)])
def test_match_after_a_push_then_the_altered_tensors_by_name(transport: str) -> None:
    target = zeros()
    weights, scales = state(1)
    with refitter(transport, target) as r:
        r.push(weights, scales)
        [result] = r.verify(weights, scales)
        assert result.ok and result.source == "stored" and result.matched == len(weights) + len(scales)
        assert result.mismatched == () and result.missing == () and result.version == 1
        target["layers.2.w"][3, 5] += 1  # the receiver's tensors change after the push
        target["layers.1.w_scale"].fill_(7.0)
        [result] = r.verify(weights, scales)
        assert not result.ok and result.mismatched == ("layers.1.w_scale", "layers.2.w")
        assert result.matched == len(weights) + len(scales) - 2 and "2 differ (layers.1.w_scale, layers.2.w)" in result.summary()
        [result] = r.verify({**weights, "other": torch.zeros(2)})  # a name the receiver lacks: missing, not a mismatch
        assert result.missing == ("other",) and result.mismatched == ("layers.2.w",)


@pytest.mark.integration
@pytest.mark.parametrize("transport", ["local", "zmq", "nccl"])
def test_a_target_in_another_form_compares_what_it_received(transport: str) -> None:
    target = zeros()
    weights, scales = state(1)
    with refitter(transport, Opaque(target)) as r:
        r.push(weights, scales)  # not recorded
        [result] = r.verify(weights, scales)
        assert result.source == "none" and not result.ok and len(result.missing) == len(weights) + len(scales)
    with refitter(transport, Opaque(target), record_digests=True) as r:
        r.push(weights, scales, version=5)
        [result] = r.verify(weights, scales)
        assert result.ok and result.source == "received" and result.matched == len(weights) + len(scales)
        target["layers.2.w"].zero_()  # the stored form is not re-read: what arrived still matches
        assert r.verify(weights, scales)[0].ok
        w2, _ = state(2)
        r.push({"layers.0.w": w2["layers.0.w"]})  # a later partial push updates only its names
        [result] = r.verify({**weights, "layers.0.w": w2["layers.0.w"]}, scales)
        assert result.ok and result.version == 6
        [result] = r.verify(weights, scales)
        assert result.mismatched == ("layers.0.w",)


@pytest.mark.unit
def test_compare_and_wire() -> None:
    a, b = b"a" * 32, b"b" * 32
    res = compare({"x": a, "y": a, "z": a}, "rx", 3, "stored", {"x": a, "y": b, "w": a})
    assert (res.matched, res.mismatched, res.missing, res.ok) == (1, ("y",), ("z",), False)
    msg = Fingerprints(7, 3, "received", {"x": a}, "rx")
    assert decode(encode(msg)) == msg and decode(encode(FingerprintRequest(7))) == FingerprintRequest(7)
    import msgpack

    for field, value in [("source", "disk"), ("digests", {"x": b"short"}), ("digests", {"x": "0" * 64}), ("digests", [])]:
        d = msgpack.unpackb(encode(msg), raw=False)
        d[field] = value
        with pytest.raises(WireError, match=field):
            decode(msgpack.packb(d, use_bin_type=True))
    with Refitter("local", target=zeros()) as r, pytest.raises(PlanError):
        r.verify({"x": "not a tensor"})  # type: ignore[arg-type]


@pytest.mark.integration
def test_cli_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = zeros()
    weights, scales = state(1)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "state.safetensors"
    safetensors_torch.save_file({**weights, **scales}, str(path))
    with refitter("zmq", target) as r:
        r.push(weights, scales)
        address = r.sender.group.peers[0].address  # type: ignore[attr-defined]
        assert cli_main(["verify", "--peer", address, "--state", str(path)]) == 0
        assert "zmq-rx (v1, stored): 8 match, 0 differ, 0 missing" in capsys.readouterr().out
        target["emb"][0, 0] = 3
        assert cli_main(["verify", "--peer", address, "--state", str(path)]) == 1
        assert "1 differ (emb)" in capsys.readouterr().out
    assert cli_main(["verify", "--peer", "tcp://127.0.0.1:1", "--state", str(tmp_path / "nope.safetensors")]) == 2
