"""The model deployments: one :class:`~collage_inference.serving.modelserver.ModelServer` per
Ray Serve replica.

:class:`ModelDeployment` is the Ray adapter of the same model server core the HTTP worker
runs: admission, compute on one thread, straggler injection, published facts, readiness. The
launcher wraps it with ``serve.deployment`` and its replica counts, CPUs and autoscaling.

Stragglers are chosen per replica by its *rank* (0 .. replicas - 1, stable across restarts of a
replica): rank i straggles as ``stragglers.for_worker(kind, i)`` says, exactly as local worker i
does, so a comparison on Ray injects the same delays as on one machine.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from collage_inference.config import SlowdownSettings, WorkerSettings
from collage_inference.serving.modelserver import ModelServer


def replica_rank() -> int:
    """This replica's rank within its deployment (0 outside Ray Serve, e.g. in unit tests)."""
    try:
        from ray import serve

        rank = serve.get_replica_context().rank
    except Exception:  # not inside a replica
        return 0
    return int(getattr(rank, "rank", rank))  # a ReplicaRank record in Ray 2.5x, an int before


class ModelDeployment:
    """One model replica (see the module docstring)."""

    def __init__(self, settings: WorkerSettings, stragglers: SlowdownSettings | None = None) -> None:
        self.rank = replica_rank()
        self.server = ModelServer(settings)
        if stragglers is not None:
            self.server.straggle(stragglers.for_worker(self.server.meta.kind, self.rank))

    async def infer(self, images: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """uint8 images (N, H, W, C) -> (probabilities, timings in seconds)."""
        outcome = self.server.infer(self.server.check_batch(images))
        result = await outcome if isinstance(outcome, asyncio.Future) else outcome
        return result.prediction.probabilities, result.timings

    def describe(self) -> dict[str, Any]:
        """The model's facts, as a V2 worker publishes them in its metadata parameters."""
        return {"model": self.server.name, "rank": self.rank, **self.server.facts()}

    def ready(self) -> bool:
        return self.server.ready

    def __del__(self) -> None:
        # Ray Serve calls this on a graceful replica stop; burners must not outlive it.
        server = getattr(self, "server", None)
        if server is not None:
            server.close()
