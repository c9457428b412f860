"""``nccl`` between GPUs: one sender on ``cuda:0``, one receiver on each other GPU.

Written for N GPUs (1 sender + N-1 receivers, one GPU per rank, as NCCL requires); skipped with
the reason on fewer than two. The process bodies are those of ``tests/test_nccl_gloo.py`` (the
same scenarios CI runs over gloo), here with CUDA buffers and the NCCL backend. Then mixed
placement: a pipeline of two plain torch stages, stage 0 colocated with the sender on GPU 0 and
fed by ``cuda_ipc``, stage 1 on GPU 1 fed by ``nccl``.

Run: ``pytest -m gpu tests/gpu/test_nccl_multi_gpu.py`` on ``nvidia-h200-x2`` (or more GPUs).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import traceback
from typing import Any

import pytest
import torch

from refit.digest import digest
from refit.shapes import get_shape, make_state
from refit.transports.collective import cupy_nccl
from tests.test_nccl_gloo import expected_target, run_world

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPUS < 2, reason=f"a NCCL push needs one GPU per rank: 2 or more GPUs, found {GPUS}"),
    pytest.mark.skipif(cupy_nccl() is None, reason="needs CuPy with NCCL (cupy-cuda12x or cupy-cuda13x)"),
]

RECEIVERS = [f"rx{i}" for i in range(GPUS - 1)]


def rx(name: str, kind: str, pushes: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "pushes": pushes, "device": f"cuda:{RECEIVERS.index(name) + 1}", **extra}


def sender(pushes: list[tuple[str, int, tuple[str, ...]]], timeout: float, **extra: Any) -> dict[str, Any]:
    return {"pushes": pushes, "timeout": timeout, "backend": "nccl", "device": "cuda:0", **extra}


def test_twenty_pushes_bit_exact_with_no_device_memory_growth() -> None:
    """Every dtype (NaN payloads included), 0-d scales, numel-0 tensors and tensors chunked over
    several buckets; 20 consecutive pushes through one NCCL group; bit-exact after each push;
    ``torch.cuda.memory_reserved`` the same after push 2 and after push 20 on every rank."""
    n = 20
    out = run_world(
        [rx(name, "mixed", n, mark_at=1) for name in RECEIVERS],
        sender([("mixed", seed, ()) for seed in range(1, n + 1)], 60.0, mark_at=1),
        deadline_s=300.0,
    )
    sent = out["sender"]["results"]
    assert [r[:2] for r in sent] == [("ok", v) for v in range(1, n + 1)], sent
    assert sent[0][2] >= 8  # the big tensors were chunked over many buckets
    for name, rep in out.items():
        (_, _, reserved0), (_, _, reserved1) = rep["marks"]["start"], rep["marks"]["end"]
        assert reserved1 == reserved0, f"{name}: CUDA memory reserved grew from {reserved0} to {reserved1} bytes"
        if name == "sender":
            continue
        for v, got in enumerate(rep["results"], start=1):
            assert got[:2] == ("ok", v) and not got[4], (name, got[:2])
            assert got[3] == expected_target("mixed", v), f"{name}: push {v} not bit-exact"


def test_a_new_sender_after_the_last_one_closed() -> None:
    """The trainer closes its Refitter while the receivers keep their group (they serve on);
    a new Refitter builds a new group. NCCL's destroy waits for every rank of the node, so a
    blocking teardown on the closing side hung here forever."""
    out = run_world(
        [rx(name, "small", 4) for name in RECEIVERS],
        sender([("small", seed, ()) for seed in range(1, 5)], 30.0, new_sender_every=2),
        deadline_s=120.0,
    )
    assert [r[:2] for r in out["sender"]["results"]] == [("ok", 1), ("ok", 2), ("ok", 3), ("ok", 4)]  # the new one numbers after the receivers
    for name in RECEIVERS:
        assert [r[3] for r in out[name]["results"]] == [expected_target("small", seed) for seed in range(1, 5)], name


def test_refusal_broadcasts_nothing_and_leaves_the_target_unchanged() -> None:
    """The last receiver lacks a tensor: the push is refused everywhere, released by the go
    word at once, nothing loaded anywhere; the group survives and the next push lands."""
    missing = ("float32.2",)
    refuser = RECEIVERS[-1]
    rxs = [rx(name, "mixed", 2, **({"missing": missing} if name == refuser else {})) for name in RECEIVERS]
    out = run_world(rxs, sender([("mixed", 1, ()), ("mixed", 2, missing)], 30.0), deadline_s=120.0)
    refused, accepted = out["sender"]["results"]
    assert refused[0] == "ResolveError" and "float32.2" in refused[1], refused
    assert accepted[0] == "ok", accepted
    for name in RECEIVERS:
        first, second = out[name]["results"]
        mine = missing if name == refuser else ()
        assert first[0] == ("ResolveError" if name == refuser else "TransportError"), first
        assert first[2] == expected_target("mixed", None, mine) and first[3] is False, (name, first[:1])
        assert first[4] < 10, f"{name}: released after {first[4]:.1f} s, not by the go word"
        assert second[0] == "ok" and second[3] == expected_target("mixed", 2, mine, not_pushed=missing), (name, second[:2])


def test_receiver_killed_mid_stream_ends_the_push_within_the_timeout() -> None:
    timeout = 8.0
    victim = RECEIVERS[-1]
    rxs = [rx(name, "many", 1, **({"die_after": 1} if name == victim else {"wait": 30.0})) for name in RECEIVERS]
    out = run_world(rxs, sender([("many", 1, ())], timeout), deadline_s=120.0)
    (sent,) = out["sender"]["results"]
    assert sent[0] == "TransportError", sent
    assert sent[2] < timeout + 5, f"the sender raised after {sent[2]:.1f} s (timeout {timeout} s)"
    for name in RECEIVERS:
        if name != victim:
            (got,) = out[name]["results"]
            assert got[0] == "TransportError" and got[3] is True and got[4] < timeout + 5, (name, got)


def test_sender_killed_mid_stream_leaves_receivers_torn_at_their_version() -> None:
    timeout = 8.0
    rxs = [rx(name, "many", 2, wait=timeout) for name in RECEIVERS]
    out = run_world(rxs, sender([("many", 1, ()), ("many", 2, ())], timeout, die_at=(1, 3)), deadline_s=120.0)
    assert "sender" not in out
    for name in RECEIVERS:
        first, second = out[name]["results"]
        assert first[:2] == ("ok", 1) and first[3] == expected_target("many", 1), (name, first[:2])
        kind, message, _, torn, seconds, version = second
        assert kind == "TransportError", (name, second)
        assert torn is True and version == 1, f"{name}: torn={torn}, version={version}"
        assert seconds < timeout + 5, f"{name}: raised after {seconds:.1f} s (timeout {timeout} s)"


# ---------------------------------------------------------------- mixed placement, pipeline stages


def _stage(cfg: dict[str, Any], q: Any) -> None:
    """One pipeline stage: owns ``cfg["own"]`` names, knows the rest are the other stage's."""
    from refit.receiver import RefitReceiver
    from refit.resolve import TensorsResolver

    try:
        torch.cuda.set_device(cfg["device"])
        state, scales = make_state(get_shape("tiny"), device=cfg["device"], seed=None)
        full = {**state, **scales}
        own = set(cfg["own"])
        target = {k: torch.zeros_like(v) for k, v in full.items() if k in own}
        resolver = TensorsResolver(target, remote=lambda n: n in full and n not in own)
        with RefitReceiver(resolver, cfg["transport"], name=cfg["name"], device=cfg["device"]) as r:
            q.put(("info", cfg["name"], r.info()))
            out = []
            for _ in range(cfg["pushes"]):
                rep = r.receive(timeout=60)
                out.append((rep.version, rep.loaded, rep.remote, digest(target)))
        q.put(("done", cfg["name"], out))
    except BaseException:
        q.put(("done", cfg["name"], traceback.format_exc()))


def split_stages(devices: tuple[str, str], transports: tuple[str, str], pushes: int) -> tuple[list[str], list[dict[str, Any]]]:
    """Every name of the tiny shape, and two stage configs: stage 0 owns the embedding and
    layer 0, stage 1 the rest."""
    state, scales = make_state(get_shape("tiny"), seed=0)
    names = sorted({**state, **scales})
    own0 = [n for n in names if n.startswith(("model.embed_tokens", "model.layers.0."))]
    owns = (own0, [n for n in names if n not in own0])
    return names, [
        {"name": f"stage{i}", "device": devices[i], "transport": transports[i], "own": owns[i], "pushes": pushes} for i in range(2)
    ]


def run_stages(stages: list[dict[str, Any]], push: Any) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]]]:
    """Start the stage processes, run ``push(addresses) -> pushed states``, collect reports."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_stage, args=(cfg, q), daemon=True) for cfg in stages]
    for p in procs:
        p.start()
    try:
        infos: dict[str, Any] = {}
        while len(infos) < len(stages):
            kind, name, payload = q.get(timeout=120)
            assert kind == "info", f"{name}: {payload}"
            infos[name] = payload
        torch.cuda.set_device(0)
        pushed = push({name: info["address"] for name, info in infos.items()})
        done: dict[str, Any] = {}
        while len(done) < len(stages):
            try:
                _, name, payload = q.get(timeout=120)
            except queue.Empty:
                pytest.fail(f"timed out; reports from {sorted(done)}")
            done[name] = payload
        return done, pushed
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def check_stages(stages: list[dict[str, Any]], names: list[str], done: dict[str, Any], pushed: list[dict[str, torch.Tensor]]) -> None:
    """Each stage loaded exactly its own tensors, bit for bit, and counted the rest remote."""
    for cfg in stages:
        got, own = done[cfg["name"]], cfg["own"]
        assert not isinstance(got, str), f"{cfg['name']} failed:\n{got}"
        assert [g[0] for g in got] == list(range(1, len(pushed) + 1)), got
        for (version, loaded, remote, dig), full in zip(got, pushed):
            assert (loaded, remote) == (len(own), len(names) - len(own)), (cfg["name"], loaded, remote)
            assert dig == digest({k: full[k] for k in own}), f"{cfg['name']}: version {version} not bit-exact"


def new_state(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return make_state(get_shape("tiny"), device="cuda:0", seed=seed)


def test_two_stage_pipeline_cuda_ipc_stage_beside_the_sender_and_nccl_stage_on_the_next_gpu() -> None:
    """Stage 0 shares GPU 0 with the trainer and is fed by ``cuda_ipc``; stage 1 is on GPU 1
    and fed by ``nccl``. A Refitter drives one transport (each owns its staging buffers and its
    protocol), so each update is two pushes of the same state: one more pack of the state on
    the trainer's GPU."""
    names, stages = split_stages(("cuda:0", "cuda:1"), ("cuda_ipc", "nccl"), pushes=3)

    def push(addr: dict[str, str]) -> list[dict[str, torch.Tensor]]:
        from refit.api import Refitter

        pushed = []
        with (
            Refitter("cuda_ipc", peers=[addr["stage0"]], device="cuda:0", timeout=60) as ipc,
            Refitter("nccl", peers=[addr["stage1"]], device="cuda:0", backend="nccl", timeout=60) as bcast,
        ):
            for seed in (1, 2, 3):
                s, c = new_state(seed)
                assert ipc.push(s, c).version == seed and bcast.push(s, c).version == seed
                pushed.append({k: v.cpu() for k, v in {**s, **c}.items()})
        return pushed

    check_stages(stages, names, *run_stages(stages, push))


@pytest.mark.skipif(GPUS < 3, reason=f"a two-stage pipeline over nccl alone needs 3 GPUs (sender + 2 stages), found {GPUS}")
def test_two_stage_pipeline_over_nccl_one_push() -> None:
    """With a GPU per stage, one broadcast push feeds both stages."""
    names, stages = split_stages(("cuda:1", "cuda:2"), ("nccl", "nccl"), pushes=2)

    def push(addr: dict[str, str]) -> list[dict[str, torch.Tensor]]:
        from refit.api import Refitter

        pushed = []
        with Refitter("nccl", peers=[addr["stage0"], addr["stage1"]], device="cuda:0", backend="nccl", timeout=60) as r:
            for seed in (1, 2):
                s, c = new_state(seed)
                assert r.push(s, c).version == seed
                pushed.append({k: v.cpu() for k, v in {**s, **c}.items()})
        return pushed

    check_stages(stages, names, *run_stages(stages, push))
