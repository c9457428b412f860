"""Ray adapter on one node: the example's flow over zmq and the gloo stream, bit for bit; an
engine actor killed between pushes, one killed mid-push and one hung mid-push each end the push
with a TransportError naming the actor, and the surviving engine is torn or untouched, never
half-loaded silently. Plus the placement rules (pure) and argument checks."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch

from refit.adapters.ray_place import Place, choose_bind, choose_transport, side_options
from refit.errors import RefitError, TornStateError, TransportError
from refit.resolve import TensorsResolver
from tests.conftest import same_bits

ray = pytest.importorskip("ray")

from refit.adapters.ray import RayRefit, RefitReceiverActor, RefitTrainerActor  # noqa: E402

# -- placement rules (no Ray needed)

A, B = "node-a", "node-b"


def place(node: str = A, ip: str = "10.0.0.1", host: str = "boot-a", gpus: tuple[str, ...] = ()) -> Place:
    return Place(node_id=node, node_ip=ip, host=host, gpus=gpus)


@pytest.mark.unit
@pytest.mark.parametrize(
    "trainer, engines, expected",
    [
        (place(), [place()], "zmq"),  # CPU only: zmq, never shared memory unasked
        (place(gpus=("G0",)), [place(gpus=("G0",)), place(gpus=("G0",))], "cuda_ipc"),  # colocated on one GPU
        (place(gpus=("G0",)), [place(gpus=("G0",)), place(gpus=("G1",))], "nccl"),  # every side has a GPU
        (place(gpus=("G0",)), [place(B, "10.0.0.2", "boot-b", ("G0",))], "nccl"),  # same UUID string, other node
        (place(gpus=("G0",)), [place(gpus=("G1",)), place()], "zmq"),  # a CPU engine
    ],
)
def test_auto_transport(trainer: Place, engines: list[Place], expected: str) -> None:
    assert choose_transport("auto", trainer, {f"e{i}": [p] for i, p in enumerate(engines)}) == expected


@pytest.mark.unit
def test_named_transport_and_bind_checked_against_placement() -> None:
    far = {"e0": [place()], "e1": [place(B, "10.0.0.2", "boot-b")]}
    assert choose_transport("nccl", place(), far) == "nccl"
    with pytest.raises(TransportError, match=r"cuda_ipc.*\['e1'\]"):
        choose_transport("cuda_ipc", place(), far)
    assert choose_transport("cuda_ipc", place(), {"e0": [place()]}) == "cuda_ipc"  # shared memory on one host
    assert choose_bind("auto", place(), far) == "node"
    assert choose_bind("auto", place(), {"e0": [place()]}) == "loopback"
    with pytest.raises(TransportError, match=r"loopback.*\['e1'\].*bind='node'"):
        choose_bind("loopback", place(), far)
    for bad, what in [("tcp", "transport"), ("eth0", "bind")]:
        with pytest.raises(RefitError, match=what):
            (choose_transport if what == "transport" else choose_bind)(bad, place(), far)
    with pytest.raises(RefitError, match="node_ip must be an IP address"):
        place(ip="myhost")


@pytest.mark.unit
def test_side_options_bind_the_node_ip_only_when_asked() -> None:
    assert side_options("zmq", "loopback", "10.0.0.1", sender=False) == {}
    assert side_options("zmq", "node", "10.0.0.1", sender=False) == {"address": "tcp://10.0.0.1:*"}
    assert side_options("nccl", "node", "10.0.0.1", sender=False) == {"address": "tcp://10.0.0.1:*", "host": "10.0.0.1"}
    assert side_options("nccl", "node", "10.0.0.1", sender=True) == {"host": "10.0.0.1"}
    assert side_options("cuda_ipc", "node", "10.0.0.1", sender=False) == {}


# -- actors


def model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {f"layers.{i}.weight": torch.randn(64, 64, generator=g).to(torch.bfloat16) for i in range(6)}
    state |= {f"layers.{i}.k_scale": torch.tensor(1.0 + seed + i) for i in range(6)}  # 0-d scales
    return state


class _Trainer(RefitTrainerActor):
    def __init__(self) -> None:
        self.seed = 0

    def step(self) -> dict[str, torch.Tensor]:
        self.seed += 1
        return model(self.seed)

    def refit_state(self) -> tuple[dict[str, torch.Tensor], None]:
        return model(self.seed), None


Trainer: Any = ray.remote(num_cpus=0)(_Trainer)


class Fault(TensorsResolver):
    """Dies (``exit``) or hangs (``hang``) once its second bucket was applied (mid-push)."""

    def __init__(self, target: dict[str, torch.Tensor], fault: str) -> None:
        super().__init__(target)
        self.fault, self.applied = fault, 0

    def end_bucket(self, bucket: torch.Tensor, *, keep_views: bool) -> None:
        self.applied += 1
        if self.applied == 2 and self.fault == "exit":
            os._exit(1)
        if self.applied == 2 and self.fault == "hang":
            time.sleep(3600)


class _Engine(RefitReceiverActor):
    def __init__(self, fault: str = "") -> None:
        self.model = model(seed=100)
        self.fault = fault

    def refit_target(self) -> Any:
        return Fault(self.model, self.fault) if self.fault else self.model

    def arm(self, fault: str) -> None:
        """Fail from the next push on (the receiver is rebuilt on open, so arm before)."""
        self.fault = fault
        self._refit_loader.resolver = Fault(self.model, fault)

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.model

    def check_serving(self) -> str:
        try:
            self.refit_check_serving()
        except TornStateError as exc:
            return str(exc)
        return ""


Engine: Any = ray.remote(num_cpus=0)(_Engine)


@pytest.fixture(scope="module")
def cluster() -> Any:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def engines(n: int = 2) -> dict[str, Any]:
    return {f"engine-{i}": Engine.remote() for i in range(n)}


def same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(same_bits(got[k], want[k]) for k in want)


@pytest.mark.integration
@pytest.mark.parametrize("transport", ["zmq", "nccl", "cuda_ipc"])  # cuda_ipc without a GPU: shared memory on one host
def test_three_pushes_land_bit_for_bit(cluster: Any, transport: str) -> None:
    trainer, group = Trainer.remote(), engines()
    with RayRefit(trainer, group, transport=transport, bucket_bytes=1 << 14, timeout=30) as refit:
        assert refit.transport == transport and refit.bind == "loopback"
        scheme = "ipc://" if transport == "cuda_ipc" else "tcp://127.0.0.1:"
        assert all(i["address"].startswith(scheme) for infos in refit.infos.values() for i in infos)
        for version in (1, 2, 3):
            want = ray.get(trainer.step.remote(), timeout=30)
            report = refit.push()
            assert report.version == version and report.trainer.buckets > 1
            assert sorted(report.engines) == ["engine-0", "engine-1"]
            assert all(r.version == version and r.loaded == len(want) for rs in report.engines.values() for r in rs)
            for actor in group.values():
                assert same_state(ray.get(actor.tensors.remote(), timeout=30), want)
        assert refit.status() == {n: [{"version": 3, "torn": False, "last_error": ""}] for n in group}
    with pytest.raises(RefitError, match="closed"):
        refit.push()


@pytest.mark.integration
def test_refusal_comes_back_as_resolve_error_naming_the_engine(cluster: Any) -> None:
    class _Short(RefitReceiverActor):
        def __init__(self) -> None:
            self.model = {k: v for k, v in model(100).items() if k != "layers.5.weight"}

    Short: Any = ray.remote(num_cpus=0)(_Short)

    trainer = Trainer.remote()
    with RayRefit(trainer, {"ok": Engine.remote(), "short": Short.remote()}, timeout=30) as refit:
        ray.get(trainer.step.remote(), timeout=30)
        with pytest.raises(RefitError) as info:
            refit.push()
        assert type(info.value).__name__ == "ResolveError" and "layers.5.weight" in str(info.value)
        assert "[short] layers.5.weight" in str(info.value)  # receivers are named after their engine actor
        status = refit.status()
        assert all(s["version"] == 0 and not s["torn"] for rs in status.values() for s in rs)
        assert "layers.5.weight" in status["short"][0]["last_error"]


@pytest.mark.integration
def test_engine_killed_between_pushes_fails_fast_naming_it(cluster: Any) -> None:
    trainer, group = Trainer.remote(), engines()
    refit = RayRefit(trainer, group, bucket_bytes=1 << 14, timeout=10)
    first = ray.get(trainer.step.remote(), timeout=30)
    refit.push()
    ray.kill(group["engine-1"])
    ray.get(trainer.step.remote(), timeout=30)
    t0 = time.monotonic()
    with pytest.raises(TransportError, match=r"engine actor 'engine-1' died during phase start: .*nothing was sent"):
        refit.push()
    assert time.monotonic() - t0 < refit.timeout  # not the trainer's own timeout: Ray told us
    with pytest.raises(RefitError, match="closed.*engine-1"):
        refit.push()
    refit.close(timeout=1)
    # the survivor: its push may have begun (then it was aborted: torn or untouched), never silently mixed
    status = ray.get(group["engine-0"].refit_status.remote(), timeout=60)["status"][0]
    assert status["version"] in (1, 2) and ray.get(group["engine-0"].refit_check_serving.remote(), timeout=30) is None
    got = ray.get(group["engine-0"].tensors.remote(), timeout=30)
    assert same_state(got, first) or ray.get(group["engine-0"].check_serving.remote(), timeout=30)


@pytest.mark.integration
@pytest.mark.parametrize("fault", ["exit", "hang"])
def test_engine_dying_or_hanging_mid_push_ends_it_naming_it(cluster: Any, fault: str) -> None:
    trainer, group = Trainer.remote(), engines()
    refit = RayRefit(trainer, group, bucket_bytes=1 << 14, timeout=5)
    first = ray.get(trainer.step.remote(), timeout=30)
    refit.push()
    ray.get(group["engine-1"].arm.remote(fault), timeout=30)
    ray.get(trainer.step.remote(), timeout=30)
    with pytest.raises(TransportError) as info:
        refit.push()
    message = str(info.value)
    assert "engine actor 'engine-1'" in message and "phase" in message
    if fault == "exit":
        assert "died during phase push" in message
    else:  # the trainer's wait for its ack timed out: the message names the bucket
        assert "did not answer" in message and "bucket" in message
    # engine-0 got the abort: torn (refusing to serve) and still at version 1, or untouched
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _ = ray.wait([group["engine-0"].check_serving.remote()], timeout=60)
        torn = ray.get(ready[0])
        if torn or same_state(ray.get(group["engine-0"].tensors.remote(), timeout=30), first):
            break
    assert torn or same_state(ray.get(group["engine-0"].tensors.remote(), timeout=30), first)
    if torn:
        assert "version 1" in torn or "torn" in torn
    refit.close(timeout=5)
    for actor in group.values():
        ray.kill(actor)


@pytest.mark.integration
def test_arguments_are_checked_before_anything_opens(cluster: Any) -> None:
    trainer = Trainer.remote()
    with pytest.raises(RefitError, match="engines is empty"):
        RayRefit(trainer, {})
    with pytest.raises(RefitError, match="must be a Ray actor handle"):
        RayRefit(trainer, [object()])
    with pytest.raises(RefitError, match="transport must be one of"):
        RayRefit(trainer, engines(1), transport="tcp")
    one = Engine.remote()
    with pytest.raises(RefitError, match="may appear once"):
        RayRefit(trainer, [one, one])
    with pytest.raises(RefitError, match="may appear once"):
        RayRefit(trainer, {"a": trainer})

    class _Plain:
        def hello(self) -> str:
            return "hi"

    Plain: Any = ray.remote(num_cpus=0)(_Plain)

    with pytest.raises(RefitError, match=r"engine actor 'engine-0' has no refit_place\(\): mix refit.adapters.ray.RefitReceiverActor"):
        RayRefit(trainer, [Plain.remote()])


@pytest.mark.unit
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "no such host"])
def test_nccl_host_must_be_dialable(host: str) -> None:
    from refit.transports.nccl import NcclSender
    from refit.transports.nccl_receiver import NcclReceiver

    with pytest.raises(TransportError, match=r"nccl: host=.*under Ray, the node IP"):
        NcclSender(peers=["tcp://127.0.0.1:5"], host=host, backend="gloo", device="cpu")
    with pytest.raises(TransportError, match=r"nccl: host="):
        NcclReceiver(host=host)
