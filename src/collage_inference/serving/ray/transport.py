"""The front end's :class:`~collage_inference.serving.dispatch.Worker` over a Ray Serve handle.

One :class:`RayWorker` stands for a whole deployment, not one replica: a handle cannot address a
replica, and it need not. Ray's router already sends each call to the less loaded of two
sampled replicas (power of two choices on queue length), which is the front end's own
least-outstanding pick, one level down; and under autoscaling the set of replicas changes
while the front end runs. So the pool of s-CNN "workers" holds one RayWorker, its
``outstanding`` counts the deployment's calls in flight, and a re-issue (mode replicate,
hedge) or a second copy (replicate-all) goes to the same deployment, where the router picks a
replica without the straggler's queue.

``cancellable``: the front end cancels a call whose request was already answered; here that
is ``DeploymentResponse.cancel()``, which drops the call from the router's or the replica's
queue (a call already computing finishes, its reply is ignored).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from ray import exceptions as ray_exceptions

from collage_inference.errors import ConfigError, WorkerError
from collage_inference.serving.dispatch import Inference, WorkerInfo

# Failures that say the deployment cannot take calls now (not that one call went wrong).
_UNAVAILABLE = tuple(
    getattr(ray_exceptions, name)
    for name in ("ActorDiedError", "ActorUnavailableError", "RayActorError")
    if hasattr(ray_exceptions, name)
)


class RayWorker:
    """A Serve deployment as one front-end worker (see the module docstring)."""

    cancellable = True

    def __init__(self, worker_id: str, handle: Any, app_name: str) -> None:
        self.id = worker_id
        self.url = f"serve://{app_name}/{handle.deployment_name}"  # for /metrics labels
        self._handle = handle
        self.up = True
        self.outstanding = 0
        self.latency = 0.0  # EWMA of round trips, seconds
        self.info: WorkerInfo | None = None

    async def infer(self, images: np.ndarray, request_id: str, timeout: float) -> Inference:
        """Classify uint8 images (N, H, W, C); the slot taken by ``WorkerPool.pick`` is given
        back however the call ends, cancellation included."""
        start = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                response = self._handle.infer.remote(images)
                try:
                    probabilities, timings = await response
                except asyncio.CancelledError:  # answered elsewhere, or timed out: drop the call
                    response.cancel()
                    raise
        except TimeoutError as exc:
            raise WorkerError(f"{self.id} gave no answer to {request_id} within {timeout:.3f}s") from exc
        except Exception as exc:  # a Ray task error wraps the replica's own (e.g. a 429 there)
            if isinstance(exc, _UNAVAILABLE):
                self.up = False
            raise WorkerError(f"{self.id} failed on {request_id}: {exc}") from exc
        finally:
            self.outstanding -= 1
        elapsed = time.perf_counter() - start
        self.latency = elapsed if self.latency == 0 else 0.8 * self.latency + 0.2 * elapsed
        return Inference(probabilities, {**timings, "round_trip": elapsed})

    async def ready(self, timeout: float = 1.0) -> bool:
        """Whether some replica answers now (the probe that brings a down worker back)."""
        try:
            async with asyncio.timeout(timeout):
                return bool(await self._handle.ready.remote())
        except Exception:
            return False

    def retarget(self, url: str) -> None:
        """Part of the ``Worker`` interface, with nothing to do here: a deployment has no address
        that moves; Serve restarts its replicas behind the same handle."""
        raise ConfigError(f"{self.id} is a Ray Serve deployment, which Serve restarts itself; no URL to set")

    async def describe(self, timeout: float = 60.0) -> WorkerInfo:
        """The model behind the deployment: kind, grid, labels, input geometry."""
        async with asyncio.timeout(timeout):
            doc = await self._handle.describe.remote()
        self.info = WorkerInfo(
            doc["model"], doc["kind"], doc["grid"], tuple(doc["labels"]), doc["image_size"], doc["channels"]
        )
        return self.info
