"""vLLM adapter: a worker extension that receives pushes (:mod:`refit.adapters.vllm_worker`)
and an engine handle that drives it (:mod:`refit.adapters.vllm_engine`).

Engine side: start vLLM with ``worker_extension_cls=EXTENSION``
(``"refit.adapters.vllm.RefitWorkerExtension"``). Trainer side::

    engine = VllmEngine(llm)
    with Refitter("zmq", engine=engine) as refitter:
        refitter.push(model.state_dict(), scales)
"""

from __future__ import annotations

from refit.adapters.vllm_engine import AsyncVllmEngine, RpcSender, VllmEngine, raise_errors
from refit.adapters.vllm_transfer import RefitWeightTransferEngine, register
from refit.adapters.vllm_transfer_trainer import AsyncLLMClient, LLMClient, RefitTrainerInitInfo, RefitTrainerWeightTransferEngine
from refit.adapters.vllm_worker import RefitWorkerExtension

EXTENSION = "refit.adapters.vllm.RefitWorkerExtension"

register()  # backend="refit" in vLLM's weight-transfer factories (docs/vllm_transfer.md)

__all__ = [
    "EXTENSION",
    "AsyncLLMClient",
    "AsyncVllmEngine",
    "LLMClient",
    "RefitTrainerInitInfo",
    "RefitTrainerWeightTransferEngine",
    "RefitWeightTransferEngine",
    "RefitWorkerExtension",
    "RpcSender",
    "VllmEngine",
    "raise_errors",
]
