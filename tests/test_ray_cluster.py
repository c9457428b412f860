"""Ray adapter on a simulated two-node cluster (``ray.cluster_utils.Cluster`` on this machine):
the trainer on the head node, one engine actor on each node; the adapter binds every receiver
to its own node's IP as Ray reports it (not loopback, no fixed port) and pushes land bit for bit,
over zmq and over the gloo stream."""

from __future__ import annotations

from typing import Any

import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from refit.adapters.ray import RayRefit  # noqa: E402
from tests.test_ray import Engine, Trainer, same_state  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def nodes() -> Any:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    second = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    head = ray.get_runtime_context().get_node_id()
    yield {"head": head, "second": second.node_id}
    ray.shutdown()
    cluster.shutdown()


def on(node_id: str) -> dict[str, Any]:
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


@pytest.mark.parametrize("transport", ["zmq", "nccl"])
def test_engines_on_two_nodes_bind_their_node_ip(nodes: dict[str, str], transport: str) -> None:
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    assert len(ips) == 2
    trainer = Trainer.options(**on(nodes["head"])).remote()
    engines = {"near": Engine.options(**on(nodes["head"])).remote(), "far": Engine.options(**on(nodes["second"])).remote()}
    with RayRefit(trainer, engines, transport=transport, bucket_bytes=1 << 14, timeout=60) as refit:
        assert refit.transport == transport and refit.bind == "node"  # an engine on another node: node IPs
        assert [p.node_id for p in refit.places["far"]] == [nodes["second"]]
        for name, node in (("near", nodes["head"]), ("far", nodes["second"])):
            (info,) = refit.infos[name]
            assert info["address"].startswith(f"tcp://{ips[node]}:") and not info["address"].endswith(":*")
        for version in (1, 2):
            want = ray.get(trainer.step.remote(), timeout=60)
            report = refit.push()
            assert report.version == version and all(r.loaded == len(want) for rs in report.engines.values() for r in rs)
            for actor in engines.values():
                assert same_state(ray.get(actor.tensors.remote(), timeout=60), want)
