"""The ``nccl`` transport over gloo: 1 sender + 3 receivers, each in its own process.

CI has no GPU, so the whole transport (control handshake, rendezvous in ``Hello.extra``, go
word, pipelined broadcast into persistent buffers, failure handling) runs on the gloo backend;
``tests/gpu/test_nccl_gpu.py`` covers the CuPy NCCL pieces on the accelerator machine.

Workers are module-level functions started with the ``spawn`` context; they report through a
queue; every join has a timeout and leftovers are killed in ``finally``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from typing import Any

import pytest
import torch

from refit.digest import digest
from refit.errors import RefitError, TransportError, WireError
from refit.transports.collective import Backend, Rendezvous, choose_backend
from tests.conftest import every_dtype_state, random_tensor
from tests.procs import free_port, open_fds, rss_bytes, zeros_like

pytestmark = pytest.mark.integration

BUCKET = 64 << 10  # small buckets: many buckets, chunked tensors


# ---------------------------------------------------------------- shared by parent and workers


def make_state(kind: str, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Deterministic (state, scales) for a push; the parent recomputes it to check receivers."""
    gen = torch.Generator().manual_seed(seed)
    scales = {
        "layers.0.attn.k_scale": torch.tensor(0.5 + seed),  # 0-d
        "layers.0.attn.v_scale": torch.tensor(0.25 * (seed + 1), dtype=torch.bfloat16),  # 0-d
        "layers.0.mlp.input_amax": torch.rand((), generator=gen) + 0.1,
        "layers.0.mlp.weight_scale": torch.rand(8, generator=gen) + 0.5,
    }
    if kind == "mixed":
        state = every_dtype_state(gen)  # every dtype, 0-d and empty shapes, NaN bit patterns
        state["big.bf16"] = random_tensor((300, 700), torch.bfloat16, gen)  # 420 KB: chunked over 7 buckets
        state["big.fp8"] = random_tensor((1000, 97), torch.float8_e4m3fn, gen)  # chunked, odd size
    elif kind == "many":
        state = {f"layers.{i}.w": random_tensor((128, 256), torch.float32, gen) for i in range(16)}  # 16 buckets
    elif kind == "small":
        state = {f"w{i}": random_tensor((64, 64), torch.float16, gen) for i in range(8)}
    else:
        raise ValueError(kind)
    return state, scales


def expected_target(kind: str, seed: int | None, missing: tuple[str, ...] = (), not_pushed: tuple[str, ...] = ()) -> str:
    """Digest of a receiver's target (lacking ``missing``) after a push of ``(kind, seed)`` that
    left out ``not_pushed`` (seed None: untouched zeros)."""
    state, scales = make_state(kind, 0)
    target = {k: zeros_like(v) for k, v in {**state, **scales}.items() if k not in missing}
    if seed is not None:
        s2, c2 = make_state(kind, seed)
        for k, v in {**s2, **c2}.items():
            if k in target and k not in not_pushed:
                target[k] = v
    return digest(target)


def error_kind(exc: BaseException) -> str:
    """The public refit error class of ``exc`` (private subclasses map to their base)."""
    return next(c.__name__ for c in type(exc).__mro__ if c.__module__ == "refit.errors")


def init_default_group(port: int) -> None:
    """Like a trainer or an engine: this process already has a default process group."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def default_group_ok() -> bool:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() != 1:
        return False
    t = torch.ones(3)
    torch.distributed.all_reduce(t)
    return bool((t == 1).all())


def resources(device: str) -> tuple[int, int, int]:
    """Open file descriptors, RSS bytes, and CUDA memory reserved by torch (0 on the CPU)."""
    reserved = torch.cuda.memory_reserved(device) if device.startswith("cuda") else 0
    return open_fds(), rss_bytes(), reserved


# ---------------------------------------------------------------- workers (module level: spawn)


def receiver_worker(cfg: dict[str, Any], q: Any) -> None:
    from refit.receiver import RefitReceiver

    name, device = cfg["name"], cfg.get("device", "cpu")
    try:
        torch.set_num_threads(1)
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        if cfg.get("default_pg"):
            init_default_group(cfg["default_pg"])
        state, scales = make_state(cfg["kind"], 0)
        target = {k: zeros_like(v).to(device) for k, v in {**state, **scales}.items() if k not in cfg.get("missing", ())}
        rx = RefitReceiver(target, "nccl", name=name, device=device)
        die_after = cfg.get("die_after")
        if die_after is not None:  # simulate a crash after applying bucket `die_after`
            apply = rx.loader.apply

            def apply_then_die(index: int, bucket: torch.Tensor, **kw: Any) -> None:
                apply(index, bucket, **kw)
                if index == die_after:
                    os._exit(3)

            rx.loader.apply = apply_then_die  # type: ignore[method-assign]
        if cfg.get("fail_join"):  # this receiver's first set-up fails (e.g. a device it cannot use)
            import refit.transports.nccl as nccl_module

            connect, calls = nccl_module.connect, []

            def connect_failing_once(*args: Any, **kwargs: Any) -> Any:
                calls.append(1)
                if len(calls) == 1:
                    raise TransportError("injected set-up failure")
                return connect(*args, **kwargs)

            nccl_module.connect = connect_failing_once
        q.put(("info", name, rx.info()))
        results: list[tuple[Any, ...]] = []
        marks: dict[str, tuple[int, int, int]] = {}
        for i in range(cfg["pushes"]):
            t0 = time.monotonic()
            try:
                report = rx.receive(timeout=cfg.get("wait", 60.0))
                results.append(("ok", report.version, report.loaded, digest(target), rx.torn))
            except RefitError as exc:
                results.append((error_kind(exc), str(exc)[:2000], digest(target), rx.torn, time.monotonic() - t0, rx.version))
            if i == cfg.get("mark_at", -1):
                marks["start"] = resources(device)
        marks["end"] = resources(device)
        pg_ok = default_group_ok() if cfg.get("default_pg") else None
        rx.close()
        q.put(("done", name, {"results": results, "marks": marks, "default_pg": pg_ok}))
    except BaseException:  # report, never hang the parent
        q.put(("done", name, {"crash": traceback.format_exc()}))


def sender_worker(cfg: dict[str, Any], addresses: list[str], q: Any) -> None:
    from refit.api import Refitter

    try:
        torch.set_num_threads(1)
        if cfg.get("default_pg"):
            init_default_group(cfg["default_pg"])
        device = cfg.get("device", "cpu")
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        results: list[tuple[Any, ...]] = []
        marks: dict[str, tuple[int, int, int]] = {}
        push = [0]
        die_at = cfg.get("die_at")  # (push, bucket): simulate a crash of the sender mid-stream

        freeze_at = cfg.get("freeze_at")  # (push, bucket): the sender stops (SIGSTOP) mid-stream

        def progress(done: int, total: int) -> None:
            if die_at is not None and (push[0], done) == tuple(die_at):
                os._exit(3)
            if freeze_at is not None and (push[0], done) == tuple(freeze_at):
                os.kill(os.getpid(), signal.SIGSTOP)  # its sockets stay open: only timeouts can tell

        backend = cfg.get("backend", "gloo")
        every = cfg.get("new_sender_every", len(cfg["pushes"]))  # a new Refitter (and group) after that many pushes
        for first in range(0, len(cfg["pushes"]), every):
            with Refitter("nccl", peers=addresses, backend=backend, device=device, bucket_bytes=BUCKET, timeout=cfg["timeout"], progress=progress) as r:
                for i, (kind, seed, drop) in enumerate(cfg["pushes"][first : first + every], start=first):
                    push[0] = i
                    state, scales = make_state(kind, seed)
                    state = {k: v.to(device) for k, v in state.items() if k not in drop}
                    scales = {k: v.to(device) for k, v in scales.items()}
                    t0 = time.monotonic()
                    try:
                        report = r.push(state, scales)
                        results.append(("ok", report.version, report.buckets, sorted(x.peer for x in report.receivers)))
                    except RefitError as exc:
                        results.append((error_kind(exc), str(exc)[:2000], time.monotonic() - t0))
                    if i == cfg.get("mark_at", -1):
                        marks["start"] = resources(device)
        marks["end"] = resources(device)
        pg_ok = default_group_ok() if cfg.get("default_pg") else None
        q.put(("done", "sender", {"results": results, "marks": marks, "default_pg": pg_ok}))
    except BaseException:
        q.put(("done", "sender", {"crash": traceback.format_exc()}))


def run_world(receivers: list[dict[str, Any]], sender: dict[str, Any], deadline_s: float = 55.0) -> dict[str, dict[str, Any]]:
    """Start the receivers, then the sender; return every process's final report by name."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs: list[Any] = []
    deadline = time.monotonic() + deadline_s
    try:
        for cfg in receivers:
            p = ctx.Process(target=receiver_worker, args=(cfg, q), name=cfg["name"], daemon=True)
            p.start()
            procs.append(p)
        infos: dict[str, dict[str, Any]] = {}
        done: dict[str, dict[str, Any]] = {}
        while len(infos) < len(receivers):
            kind, name, payload = q.get(timeout=max(0.1, deadline - time.monotonic()))
            if kind == "done":
                pytest.fail(f"{name} ended before serving: {payload}")
            infos[name] = payload
        addresses = [infos[cfg["name"]]["address"] for cfg in receivers]
        sp = ctx.Process(target=sender_worker, args=(sender, addresses, q), name="sender", daemon=True)
        sp.start()
        procs.append(sp)
        expected = {cfg["name"] for cfg in receivers if cfg.get("die_after") is None}
        if sender.get("die_at") is None and sender.get("freeze_at") is None:
            expected.add("sender")
        while not expected <= set(done):
            try:
                kind, name, payload = q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"timed out; reports from {sorted(done)}, expected {sorted(expected)}")
            if kind == "done":
                done[name] = payload
        for name, payload in done.items():
            if "crash" in payload:
                pytest.fail(f"{name} crashed: {payload['crash']}")
        if sender.get("freeze_at") is not None:
            sp.kill()  # stopped, never to finish
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        return done
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def rx_cfg(name: str, kind: str, pushes: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "pushes": pushes, **extra}


# ---------------------------------------------------------------- tests


def test_push_bit_exact_with_default_group_present() -> None:
    """Mixed dtypes, 0-d scales, chunked tensors, 2 pushes (the second by digest, same group);
    every process already has its own default process group, which stays untouched."""
    rxs = [rx_cfg(f"rx{i}", "mixed", 2, default_pg=free_port()) for i in range(3)]
    out = run_world(rxs, {"timeout": 30.0, "pushes": [("mixed", 1, ()), ("mixed", 2, ())], "default_pg": free_port()})
    sender = out["sender"]["results"]
    assert [r[0] for r in sender] == ["ok", "ok"], sender
    assert sender[0][2] >= 8  # many buckets: the big tensors were chunked
    assert sender[1][3] == ["rx0", "rx1", "rx2"]
    assert out["sender"]["default_pg"] is True
    for i in range(3):
        rep = out[f"rx{i}"]
        first, second = rep["results"]
        assert first[:2] == ("ok", 1) and second[:2] == ("ok", 2), rep["results"]
        assert first[3] == expected_target("mixed", 1)  # bit for bit, NaN payloads included
        assert second[3] == expected_target("mixed", 2)
        assert not second[4]
        assert rep["default_pg"] is True


def test_refusal_by_one_receiver_stops_all() -> None:
    missing = ("float32.2",)
    rxs = [rx_cfg("rx0", "mixed", 2), rx_cfg("rx1", "mixed", 2, missing=missing), rx_cfg("rx2", "mixed", 2)]
    out = run_world(rxs, {"timeout": 30.0, "pushes": [("mixed", 1, ()), ("mixed", 2, missing)]})
    refused, accepted = out["sender"]["results"]
    assert refused[0] == "ResolveError" and "float32.2" in refused[1], refused
    assert accepted[0] == "ok", accepted
    for name in ("rx0", "rx1", "rx2"):
        first, second = out[name]["results"]
        mine = missing if name == "rx1" else ()
        # nothing loaded anywhere by the refused push, and nobody torn
        assert first[0] in ("ResolveError", "TransportError"), first
        assert first[2] == expected_target("mixed", None, mine) and first[3] is False, first
        assert first[4] < 10  # released by the go word, not by a timeout
        # the group survived the refusal: the next push lands everywhere
        assert second[0] == "ok", second
        assert second[3] == expected_target("mixed", 2, mine, not_pushed=missing)
    assert out["rx1"]["results"][0][0] == "ResolveError"


def test_receiver_whose_set_up_fails_ends_the_push_at_once_and_the_next_builds_a_new_group() -> None:
    """A receiver that cannot join marks the group failed in the sender's store: every rank
    waiting at set-up stops at once (not after the timeout), nothing is loaded anywhere, and the
    next push builds a new group that everyone joins."""
    timeout = 20.0
    rxs = [rx_cfg("rx0", "small", 2), rx_cfg("rx1", "small", 2, fail_join=True), rx_cfg("rx2", "small", 2)]
    out = run_world(rxs, {"timeout": timeout, "pushes": [("small", 1, ()), ("small", 2, ())]})
    failed, accepted = out["sender"]["results"]
    assert failed[0] == "TransportError" and "rx1 (rank 2) could not join: injected set-up failure" in failed[1], failed
    assert failed[2] < timeout / 2, failed
    assert accepted[0] == "ok" and len(accepted[3]) == 3, accepted
    for name in ("rx0", "rx1", "rx2"):
        first, second = out[name]["results"]
        assert first[0] == "TransportError" and first[2] == expected_target("small", None) and first[3] is False, (name, first)
        assert first[4] < timeout / 2, (name, first)
        assert second[0] == "ok" and second[3] == expected_target("small", 2), (name, second)


def test_receiver_killed_mid_stream() -> None:
    timeout = 8.0
    rxs = [rx_cfg("rx0", "many", 1, wait=30.0), rx_cfg("rx1", "many", 1, die_after=1), rx_cfg("rx2", "many", 1, wait=30.0)]
    t0 = time.monotonic()
    out = run_world(rxs, {"timeout": timeout, "pushes": [("many", 1, ())]})
    (sent,) = out["sender"]["results"]
    assert sent[0] == "TransportError", sent
    assert "bucket" in sent[1] and "phase buckets" in sent[1], sent[1]
    assert sent[2] < timeout + 5
    for name in ("rx0", "rx2"):
        (got,) = out[name]["results"]
        assert got[0] == "TransportError", got
        assert "bucket" in got[1]
        assert got[3] is True, "a survivor that applied buckets must be torn"
        assert got[4] < timeout + 5
    assert time.monotonic() - t0 < 50


def test_a_new_sender_after_the_last_one_closed() -> None:
    """Receivers keep their group between pushes; a new Refitter builds a new one, and numbers
    its pushes after the receivers' committed versions (a restarted trainer)."""
    rxs = [rx_cfg(f"rx{i}", "small", 4) for i in range(2)]
    out = run_world(rxs, {"timeout": 30.0, "pushes": [("small", seed, ()) for seed in range(1, 5)], "new_sender_every": 2})
    assert [r[:2] for r in out["sender"]["results"]] == [("ok", 1), ("ok", 2), ("ok", 3), ("ok", 4)]  # the new one numbers after the receivers
    for name in ("rx0", "rx1"):
        assert [r[3] for r in out[name]["results"]] == [expected_target("small", seed) for seed in range(1, 5)], name


def test_a_receiver_bounds_its_waits_by_its_own_timeout() -> None:
    """The group's timeout is the sender's (30 s here); a receiver whose receive() allows 8 s
    (room for the sender process to start on a loaded machine) raises within about 8 s when the sender freezes mid-stream, and keeps its version (torn if
    it had applied a bucket). It also must not freeze afterwards: aborting a gloo group whose
    operation is still blocked holds the GIL until the group's timeout."""
    rxs = [rx_cfg("rx0", "many", 2, wait=8.0)]
    out = run_world(rxs, {"timeout": 30.0, "pushes": [("many", 1, ()), ("many", 2, ())], "freeze_at": (1, 3)})
    first, second = out["rx0"]["results"]
    assert first[:2] == ("ok", 1)
    kind, message, _, torn, seconds, version = second
    # gloo sends from a thread of its own: the sender may stop before its go word left
    assert kind == "TransportError" and version == 1 and (torn or "go word" in message), second
    assert seconds < 8.0 + 10, f"raised after {seconds:.1f} s, the receiver timeout is 8 s (the group allows 30 s): {message}"


def test_fifty_pushes_no_leaks() -> None:
    n = 50
    rxs = [rx_cfg(f"rx{i}", "small", n, mark_at=9) for i in range(3)]
    out = run_world(rxs, {"timeout": 30.0, "pushes": [("small", i + 1, ()) for i in range(n)], "mark_at": 9}, deadline_s=58.0)
    assert all(r[0] == "ok" for r in out["sender"]["results"]), [r for r in out["sender"]["results"] if r[0] != "ok"][:3]
    for name, rep in out.items():
        (fd0, rss0, _), (fd1, rss1, _) = rep["marks"]["start"], rep["marks"]["end"]
        assert fd1 <= fd0 + 1, f"{name}: file descriptors grew from {fd0} to {fd1} over {n - 10} pushes"
        assert rss1 - rss0 < 32 << 20, f"{name}: RSS grew by {(rss1 - rss0) >> 20} MiB over {n - 10} pushes"
        if name != "sender":
            assert rep["results"][-1][3] == expected_target("small", n)


def test_rendezvous_codec_and_backend_choice() -> None:
    rdv = Rendezvous(backend=Backend.GLOO, group="ab12", rank=2, world=4, host="127.0.0.1", port=1234, timeout=5.0)
    assert Rendezvous.decode(rdv.encode()) == rdv
    bad = Rendezvous(backend=Backend.GLOO, group="ab12", rank=4, world=4, host="127.0.0.1", port=1234)
    with pytest.raises(WireError, match="'rank'"):
        Rendezvous.decode(bad.encode())
    with pytest.raises(WireError, match="unique_id"):
        Rendezvous.decode(Rendezvous(backend=Backend.NCCL, group="x", rank=1, world=2, host="h", port=1).encode())
    with pytest.raises(WireError, match="msgpack"):
        Rendezvous.decode(b"\xc1")
    assert choose_backend("auto", torch.device("cpu")) is Backend.GLOO
    with pytest.raises(TransportError, match="CUDA"):
        choose_backend("nccl", torch.device("cpu"))
    with pytest.raises(TransportError, match="unknown backend"):
        choose_backend("mpi", torch.device("cpu"))
