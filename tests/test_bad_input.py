"""Everything a user can hand the public API wrongly, as one table (issue 19, bad input).

Each row is a push or a constructor call with one thing wrong. Every one must raise a
:class:`refit.RefitError` subclass whose message names the tensor or option at fault and says
what to do, and nothing may be sent: the rows' pushes go to a live ``zmq`` receiver serving in
a thread, whose version, target and torn flag must be unchanged by all of them, and which must
then accept one valid push (it was never disturbed, only never reached).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_map

from refit import Lazy, PlanError, RefitError, Refitter, TransportError
from refit.receiver import RefitReceiver

pytestmark = pytest.mark.integration  # a receiver socket and a thread

W = torch.arange(4, dtype=torch.float32)
S = torch.tensor(0.5)


class Wrapped(torch.Tensor):
    """A wrapper tensor subclass (like DTensor or an FP8 wrapper): no storage of its own; its
    values live in ``payload`` and every op is dispatched to it."""

    payload: torch.Tensor

    @staticmethod
    def __new__(cls, payload: torch.Tensor) -> Wrapped:
        out = torch.Tensor._make_wrapper_subclass(cls, payload.shape, dtype=payload.dtype, device=payload.device)
        out.payload = payload
        return out

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]  # torch's stub omits func
        return func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs or {}))


def _unwrap(x: object) -> object:
    return x.payload if isinstance(x, Wrapped) else x


@dataclass(frozen=True)
class Push:
    """``push(state, scales, **kw)`` on a Refitter to the live receiver."""

    state: Any
    scales: Any = None
    kw: Any = None


@dataclass(frozen=True)
class Make:
    """A constructor call: ``fn()``."""

    fn: Callable[[], object]


# (id, the call, the error kind, substrings the message must contain: what is at fault + the fix)
CASES: list[tuple[str, Push | Make, type[RefitError], tuple[str, ...]]] = [
    # what the state is
    ("state-int", Push(42), PlanError, ("mapping",)),
    ("state-module", Push(torch.nn.Linear(2, 2)), PlanError, ("state_dict",)),
    ("state-triples", Push([("w", W, 1)]), PlanError, ("pairs",)),
    ("empty-state", Push({}), PlanError, ("nothing to push",)),
    ("scales-list", Push({"w": W}, [S]), PlanError, ("mapping",)),
    # values
    ("value-float", Push({"w": 3.0}), PlanError, ("w", "torch.Tensor")),
    ("value-list", Push({"w": [1, 2]}), PlanError, ("w", "torch.Tensor")),
    ("value-numpy", Push({"w": np.zeros(4, dtype=np.float32)}), PlanError, ("w", "torch.Tensor")),
    ("value-none", Push({"w": None}), PlanError, ("w", "torch.Tensor")),
    ("scale-float", Push({"w": W}, {"s": 0.5}), PlanError, ("s", "torch.Tensor")),
    # names
    ("name-int", Push({1: W}), PlanError, ("1", "str")),
    ("name-empty", Push({"": W}), PlanError, ("name",)),
    ("name-nul", Push({"w\x00x": W}), PlanError, ("NUL",)),
    ("name-10000", Push({"w" * 10_000: W}), PlanError, ("at most 4096 characters",)),
    ("duplicate-across", Push({"w": W, "s": S}, {"s": S}), PlanError, ("s", "more than once")),
    # tensor kinds that cannot travel
    ("sparse", Push({"w": W.to_sparse()}), PlanError, ("w", "dense")),
    ("meta", Push({"w": torch.empty(4, device="meta")}), PlanError, ("w", "meta")),
    ("complex", Push({"w": torch.zeros(4, dtype=torch.complex64)}), PlanError, ("w", "cannot travel")),
    ("quantized", Push({"w": torch.quantize_per_tensor(W, 0.1, 0, torch.qint8)}), PlanError, ("w",)),
    ("wrapper-subclass", Push({"w": Wrapped(W)}), PlanError, ("w", "Wrapped", "full_tensor")),
    # scales
    ("scale-nan", Push({"w": W}, {"s": torch.tensor(float("nan"))}), PlanError, ("s: ", "non-finite", "fix its calibration")),
    ("scale-inf", Push({"w": W}, {"s": torch.tensor(float("inf"))}), PlanError, ("s: ", "non-finite", "fix its calibration")),
    ("scale-zero", Push({"w": W}, {"s": torch.tensor(0.0)}), PlanError, ("s: ", "> 0")),
    ("scale-negative", Push({"w": W}, {"s": torch.tensor(-1.0)}), PlanError, ("s: ", "> 0")),
    ("amax-negative", Push({"w": W, "q.input_quantizer._amax": torch.tensor(-1.0)}), PlanError, ("_amax", ">= 0")),
    # Lazy producers
    ("lazy-dtype", Make(lambda: Lazy((4,), "float32", lambda out: out)), PlanError, ("dtype",)),  # type: ignore[arg-type]  # deliberately wrong
    ("lazy-fill", Make(lambda: Lazy((4,), torch.float32, "fill")), PlanError, ("fill", "callable")),  # type: ignore[arg-type]  # deliberately wrong
    ("lazy-shape", Make(lambda: Lazy(("a",), torch.float32, lambda out: out)), PlanError, ("shape",)),  # type: ignore[arg-type]  # deliberately wrong
    # versions
    ("version-str", Push({"w": W}, None, {"version": "3"}), RefitError, ("version", "versions start at 1")),
    ("version-negative", Push({"w": W}, None, {"version": -1}), RefitError, ("version", "versions start at 1")),
    ("version-bool", Push({"w": W}, None, {"version": True}), RefitError, ("version", "versions start at 1")),
    ("version-huge", Push({"w": W}, None, {"version": 1 << 70}), RefitError, ("version", "versions start at 1")),
    # options of the sender
    ("transport-int", Make(lambda: Refitter(42)), RefitError, ("transport",)),  # type: ignore[arg-type]  # deliberately wrong
    ("transport-unknown", Make(lambda: Refitter("zmqq")), RefitError, ("zmqq", "available")),
    ("option-unknown", Make(lambda: Refitter("zmq", peers=["tcp://127.0.0.1:1"], bogus=1)), RefitError, ("bogus", "its options")),
    ("bucket-zero", Make(lambda: Refitter("local", target={}, bucket_bytes=0)), RefitError, ("bucket_bytes",)),
    ("bucket-str", Make(lambda: Refitter("local", target={}, bucket_bytes="1")), RefitError, ("bucket_bytes",)),  # type: ignore[arg-type]  # deliberately wrong
    ("bucket-float", Make(lambda: Refitter("local", target={}, bucket_bytes=1.5)), RefitError, ("bucket_bytes",)),  # type: ignore[arg-type]  # deliberately wrong
    ("buffers-zero", Make(lambda: Refitter("local", target={}, num_buffers=0)), RefitError, ("num_buffers",)),
    ("buffers-bool", Make(lambda: Refitter("local", target={}, num_buffers=True)), RefitError, ("num_buffers",)),
    ("tail-negative", Make(lambda: Refitter("local", target={}, tail_bytes=-1)), RefitError, ("tail_bytes",)),
    ("timeout-none", Make(lambda: Refitter("zmq", peers=["tcp://127.0.0.1:1"], timeout=None)), RefitError, ("timeout",)),  # type: ignore[arg-type]  # deliberately wrong
    ("timeout-str", Make(lambda: Refitter("zmq", peers=["tcp://127.0.0.1:1"], timeout="5")), RefitError, ("timeout",)),  # type: ignore[arg-type]  # deliberately wrong
    ("timeout-zero", Make(lambda: Refitter("zmq", peers=["tcp://127.0.0.1:1"], timeout=0)), RefitError, ("timeout",)),
    ("peers-int", Make(lambda: Refitter("zmq", peers=5)), TransportError, ("peers",)),
    ("peers-dict", Make(lambda: Refitter("zmq", peers=[{"nope": 1}])), TransportError, ("peer",)),
    ("peers-empty", Make(lambda: Refitter("zmq", peers=[])), RefitError, ("peers",)),
    ("target-missing", Make(lambda: Refitter("local")), RefitError, ("target",)),
    # options of the receiver
    ("rx-transport-local", Make(lambda: RefitReceiver({"w": W}, "local")), RefitError, ("local", "receivers use")),
    ("rx-option-unknown", Make(lambda: RefitReceiver({"w": W}, "zmq", bogus=1)), RefitError, ("bogus",)),
    ("rx-target-int", Make(lambda: RefitReceiver(42, "zmq")), RefitError, ("target",)),  # type: ignore[arg-type]  # deliberately wrong
    ("rx-push-timeout", Make(lambda: RefitReceiver({"w": W}, "zmq", push_timeout="5")), RefitError, ("push_timeout",)),  # type: ignore[arg-type]  # deliberately wrong
    ("rx-address", Make(lambda: RefitReceiver({"w": W}, "zmq", address="tcp://192.0.2.1:*")), TransportError, ("192.0.2.1",)),
]


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[RefitReceiver, dict[str, torch.Tensor], Refitter]]:
    """A zmq receiver serving in a thread, and a Refitter to it."""
    target = {"w": torch.zeros(4), "s": torch.tensor(1.0)}
    rx = RefitReceiver(target, "zmq")
    thread = threading.Thread(target=rx.serve, kwargs={"poll": 0.1}, daemon=True)
    thread.start()
    refitter = Refitter("zmq", peers=[rx.info()], timeout=20)
    try:
        yield rx, target, refitter
    finally:
        refitter.close()
        rx.stop()
        thread.join(10)
        rx.close()


@pytest.mark.parametrize(("case", "call", "kind", "says"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_named_refit_error_and_sends_nothing(
    live: tuple[RefitReceiver, dict[str, torch.Tensor], Refitter], case: str, call: Push | Make, kind: type[RefitError], says: tuple[str, ...]
) -> None:
    rx, target, refitter = live
    before, version = {k: v.clone() for k, v in target.items()}, rx.version
    with pytest.raises(RefitError) as info:
        if isinstance(call, Push):
            refitter.push(call.state, call.scales, **(call.kw or {}))
        else:
            made = call.fn()
            close = getattr(made, "close", None)
            if close is not None:
                close()
    assert isinstance(info.value, kind), f"{case}: {type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for text in says:
        assert text.lower() in message.lower(), f"{case}: {text!r} not in {message!r}"
    assert len(message) > 25, f"{case}: a message that says what to do, got {message!r}"
    assert rx.version == version and not rx.torn
    assert all(torch.equal(target[k], v) for k, v in before.items())


def test_after_every_bad_input_the_receiver_takes_a_valid_push(live: tuple[RefitReceiver, dict[str, torch.Tensor], Refitter]) -> None:
    rx, target, refitter = live
    version = rx.version
    report = refitter.push({"w": W}, {"s": S})
    assert report.version == version + 1 == rx.version
    assert torch.equal(target["w"], W) and torch.equal(target["s"], S)


def test_a_failing_lazy_producer_raises_its_own_error_naming_the_tensor(live: tuple[RefitReceiver, dict[str, torch.Tensor], Refitter]) -> None:
    """A producer's own exception is the caller's code failing: it comes through as it is, with a
    note naming the tensor, and bucket 0 fails before the handshake, so nothing is sent."""
    rx, target, refitter = live
    version = rx.version

    def fails(out: torch.Tensor) -> None:
        raise ValueError("producer failed")

    with pytest.raises(ValueError, match="producer failed") as info:
        refitter.push({"w": Lazy((4,), torch.float32, fails)})
    assert any("Lazy producer of 'w'" in note for note in getattr(info.value, "__notes__", []))
    assert rx.version == version and not rx.torn


def test_plain_subclasses_and_parameters_travel(live: tuple[RefitReceiver, dict[str, torch.Tensor], Refitter]) -> None:
    """Not every subclass is refused: one over plain storage (``as_subclass``, Parameter) travels bit for bit."""
    rx, target, refitter = live

    class Plain(torch.Tensor):
        pass

    refitter.push({"w": (W + 1).as_subclass(Plain)}, {"s": torch.nn.Parameter(torch.tensor(0.25), requires_grad=False)})
    assert torch.equal(target["w"], W + 1) and torch.equal(target["s"], torch.tensor(0.25))
