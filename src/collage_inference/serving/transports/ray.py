"""A Ray Serve deployment as one front-end worker, through its handle.

One :class:`RayTransport` stands for a whole deployment, not one replica: a handle cannot
address a replica, and it need not. Ray's router already sends each call to the less loaded of
two sampled replicas (power of two choices on queue length), which is the front end's own
least-outstanding pick one level down; and under autoscaling the set of replicas changes while
the front end runs. So the pool of s-CNN workers holds one worker over this transport, its
outstanding count is the deployment's calls in flight, and a re-issue (mode replicate, hedge)
or a second copy (replicate-all) goes to the same deployment, where the router picks a replica
without the straggler's queue.

Cancelling a call (the front end does, once its request was answered) is
``DeploymentResponse.cancel()``, which drops it from the router's or the replica's queue; a
call already computing finishes and its reply is ignored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import numpy as np
from ray import exceptions as ray_exceptions

from collage_inference.errors import WorkerDownError, WorkerError
from collage_inference.serving.transports.base import Inference, ModelInfo

# Failures that say the deployment cannot take calls now (not that one call went wrong).
_UNAVAILABLE = tuple(
    getattr(ray_exceptions, name)
    for name in ("ActorDiedError", "ActorUnavailableError", "RayActorError")
    if hasattr(ray_exceptions, name)
)


class RayTransport:
    """A Serve deployment's handle as a transport (see the module docstring)."""

    cancellable = True

    def __init__(self, handle: Any, app_name: str) -> None:
        self.name = f"serve://{app_name}/{handle.deployment_name}"
        self._handle = handle

    async def infer(self, images: np.ndarray, timeout: float) -> Inference:
        """Classify uint8 images (N, H, W, C) on some replica of the deployment."""
        try:
            async with asyncio.timeout(timeout):
                response = self._handle.infer.remote(images)
                try:
                    probabilities, timings = await response
                except asyncio.CancelledError:  # answered elsewhere, or timed out: drop the call
                    response.cancel()
                    raise
        except TimeoutError as exc:
            raise WorkerError(f"{self.name} gave no answer within {timeout:.3f}s") from exc
        except Exception as exc:  # a Ray task error wraps the replica's own (e.g. a 429 there)
            error = WorkerDownError if isinstance(exc, _UNAVAILABLE) else WorkerError
            raise error(f"{self.name} failed: {exc}") from exc
        return Inference(probabilities, dict(timings))

    async def ready(self, timeout: float = 1.0) -> bool:
        """Whether some replica answers its readiness check now."""
        try:
            async with asyncio.timeout(timeout):
                return bool(await self._handle.ready.remote())
        except Exception:
            return False

    async def describe(self, timeout: float = 60.0) -> ModelInfo:
        """The model behind the deployment, from a replica's published facts."""
        async with asyncio.timeout(timeout):
            facts: Mapping[str, Any] = await self._handle.describe.remote()
        return ModelInfo.from_facts(str(facts["model"]), facts)

    def close(self) -> None:
        pass
