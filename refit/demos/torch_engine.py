"""``refit demo``: the main job, a real refit end to end on one machine, no GPU needed.

A trainer process (this one) and an engine process (spawned) holding a transformer-shaped torch
model. The trainer pushes new weights and their 0-d quantization scales over a real transport
several times; after each push the engine reports a digest of every tensor it holds, and the
trainer checks them against its own, bit for bit.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

from refit.api import Refitter
from refit.digest import digest
from refit.errors import RefitError
from refit.shapes import SyntheticModel, get_shape, make_state


def engine(shape_name: str, transport: str, pushes: int, inbox: Any, outbox: Any) -> None:
    """The engine process: a model, a receiver, one digest per push."""
    from refit.receiver import RefitReceiver

    try:
        model = SyntheticModel(get_shape(shape_name))
        rx = RefitReceiver(model, transport, name="engine", require_complete=True)
        outbox.put(("ready", rx.info()))
        for _ in range(pushes):
            report = rx.receive(timeout=120)
            rx.check_serving()  # never serve a torn model
            outbox.put(("pushed", report.to_wire(), digest(model.state_dict())))
        inbox.get(timeout=60)
        rx.close()
    except Exception as exc:  # the trainer prints it
        outbox.put(("failed", f"{type(exc).__name__}: {exc}"))


def main(transport: str = "zmq", shape: str = "tiny", pushes: int = 3) -> int:
    """Run the demo; returns the process exit code (0: every push arrived bit for bit)."""
    if transport != "zmq":
        raise RefitError(f"the torch-engine demo runs over zmq; got {transport!r} (try: refit demo --engine vllm --transport {transport})")
    get_shape(shape)
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=engine, args=(shape, transport, pushes, inbox, outbox), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    try:
        kind, info = outbox.get(timeout=120)
        if kind != "ready":
            raise RefitError(f"engine failed to start: {info}")
        print(f"engine process {proc.pid} listening on {info['address']} ({time.perf_counter() - t0:.1f} s to start)")
        with Refitter(transport, peers=[info["address"]], bucket_bytes=1 << 20, timeout=120) as refitter:
            for step in range(1, pushes + 1):
                state, scales = make_state(get_shape(shape), seed=step)
                report = refitter.push(state, scales, version=step)
                msg = outbox.get(timeout=120)
                if msg[0] != "pushed":
                    raise RefitError(f"engine failed: {msg[1]}")
                same = msg[2] == digest({**state, **scales})
                print(f"\npush {step}: {report}")
                print(f"  engine holds version {msg[1]['version']}; bit-exact: {'yes' if same else 'NO'}")
                if not same:
                    raise RefitError(f"push {step}: the engine's tensors differ from the trainer's")
        inbox.put("done")
        print(f"\nrefit demo: {pushes} pushes of a {shape}-shaped model over {transport}, every tensor bit-exact.")
        return 0
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
