"""refit under Ray: one trainer actor pushes weights and scales into two engine actors.

    python examples/ray_refit.py                  # zmq (chosen automatically on CPU)
    python examples/ray_refit.py --transport nccl # the broadcast stream (gloo on CPU)

A Ray cluster is started in this process; the trainer actor changes its weights before each
of three pushes; every engine actor checks after each push that it holds, bit for bit, what
the trainer holds (by sha256). Runs on one CPU machine in well under a minute.
"""

from __future__ import annotations

import argparse
import time

import ray
import torch

from refit.adapters.ray import RayRefit, RefitReceiverActor, RefitTrainerActor


def make_model(seed: int) -> torch.nn.Module:
    """A small transformer-shaped stack: 4 layers of attention projections and an MLP."""
    torch.manual_seed(seed)
    layers = torch.nn.ModuleDict()
    for i in range(4):
        layers[f"l{i}"] = torch.nn.ModuleDict(
            {"qkv": torch.nn.Linear(256, 768), "o": torch.nn.Linear(256, 256), "up": torch.nn.Linear(256, 1024), "down": torch.nn.Linear(1024, 256)}
        )
    return torch.nn.ModuleDict({"embed": torch.nn.Embedding(1000, 256), "layers": layers}).to(torch.bfloat16)


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes."""
    from refit.digest import digest as sha

    return sha(tensors)


@ray.remote(num_cpus=0)
class Trainer(RefitTrainerActor):
    """Holds the trained model; ``step()`` stands in for an optimizer step."""

    def __init__(self) -> None:
        self.model = make_model(seed=0)
        self.steps = 0

    def step(self) -> str:
        self.steps += 1
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(0.01 * self.steps)
        state, scales = self.refit_state()
        return digest({**state, **scales})

    def refit_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        # the FP8 KV-cache scales of every layer travel with the weights (0-d tensors)
        scales = {f"layers.l{i}.k_scale": torch.tensor(1.0 + 0.1 * self.steps) for i in range(4)}
        return dict(self.model.state_dict()), scales


@ray.remote(num_cpus=0)
class Engine(RefitReceiverActor):
    """Serves a copy of the model; its KV-cache scales live beside it."""

    def __init__(self) -> None:
        self.model = make_model(seed=1)  # different weights until the first push
        self.scales = {f"layers.l{i}.k_scale": torch.tensor(1.0) for i in range(4)}

    def refit_target(self) -> dict[str, torch.Tensor]:
        return {**dict(self.model.state_dict()), **self.scales}

    def digest(self) -> str:
        return digest(self.refit_target())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transport", default="auto", choices=["auto", "zmq", "nccl"])
    parser.add_argument("--pushes", type=int, default=3)
    args = parser.parse_args()
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        trainer = Trainer.remote()
        engines = {"engine-a": Engine.remote(), "engine-b": Engine.remote()}
        with RayRefit(trainer, engines, transport=args.transport, bucket_bytes=4 << 20, timeout=30) as refit:
            print(f"transport {refit.transport}, bind {refit.bind}")
            for _ in range(args.pushes):
                want = ray.get(trainer.step.remote(), timeout=30)
                report = refit.push()
                print(report)
                got = ray.get([e.digest.remote() for e in engines.values()], timeout=30)
                if got != [want] * len(got):
                    raise SystemExit(f"push {report.version}: an engine's weights differ from the trainer's")
                print(f"push {report.version}: both engines hold the trainer's weights bit for bit")
    finally:
        ray.shutdown()
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
