"""The model deployments: one s-CNN or collage-CNN replica per Ray Serve replica.

:class:`ModelServer` is what a local worker process is without its HTTP server: the same
:mod:`~collage_inference.serving.runtime` (ONNX Runtime by default), one compute thread, and
the same straggler injection (:mod:`~collage_inference.serving.slowdown`). It is a plain class;
the launcher wraps it with ``serve.deployment`` and its replica counts, CPUs and autoscaling.

Stragglers are chosen per replica by its *rank* (0 .. replicas - 1, stable across restarts of
a replica): rank i of the s-CNN deployment straggles when ``[slowdown] workers`` names i (all
ranks when it is omitted) and draws with seed ``seed + i``, exactly as local worker i does, so
a comparison on Ray injects the same delays as on one machine.

Why one compute thread: the injected delay is slept on it, so calls queued behind a straggler
wait for it, as in the published runs; and a queued call that the front end cancels (its
request was answered from the collage) is dropped before it computes.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from collage_inference.config import SlowdownSettings
from collage_inference.errors import OverloadedError
from collage_inference.serving.runtime import load_runner
from collage_inference.serving.slowdown import CpuContention, Slowdown, parse_slowdown

COLLAGE_SEED_OFFSET = 1000  # collage replica i draws with seed + 1000 + i, as local collage workers


def replica_rank() -> int:
    """This replica's rank within its deployment (0 outside Ray Serve, e.g. in unit tests)."""
    try:
        from ray import serve

        rank = serve.get_replica_context().rank
    except Exception:  # not inside a replica
        return 0
    return int(getattr(rank, "rank", rank))  # a ReplicaRank record in Ray 2.5x, an int before


class ModelServer:
    """One model replica. ``slowdown``: the deployment's straggler settings; this replica
    applies them only if its rank is one that straggles (see the module docstring)."""

    def __init__(
        self,
        model_path: str,
        backend: str = "onnx",
        threads: int = 1,
        slowdown: SlowdownSettings | None = None,
        max_queue: int = 64,
    ) -> None:
        self.runner = load_runner(Path(model_path), backend, threads)
        self.meta = self.runner.meta
        self.rank = replica_rank()
        self.max_queue = max_queue
        self.slowdown, self.contention = self._straggling(slowdown)
        if self.contention:
            self.contention.start()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="compute")
        self._queued = 0

    def _straggling(self, settings: SlowdownSettings | None) -> tuple[Slowdown | None, CpuContention | None]:
        kind = "collage" if self.meta.kind == "collage" else "scnn"
        if settings is None or not settings.slows(kind, self.rank):
            return None, None
        seed = settings.seed + self.rank + (COLLAGE_SEED_OFFSET if kind == "collage" else 0)
        slowdown = parse_slowdown(settings.spec, settings.kind, seed, settings.onset_rate, settings.period)
        contention = CpuContention(settings.contention) if settings.contention else None
        return slowdown, contention

    async def infer(self, images: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """uint8 images (N, H, W, C) -> (probabilities, timings in seconds)."""
        if self._queued >= self.max_queue:
            raise OverloadedError(f"{self._queued} calls queued at replica {self.rank}; retry later")
        self._queued += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._compute, images, time.perf_counter())
        finally:
            self._queued -= 1

    def _compute(self, images: np.ndarray, enqueued: float) -> tuple[np.ndarray, dict[str, float]]:
        start = time.perf_counter()
        prediction = self.runner.run_images(images)
        compute = time.perf_counter() - start
        injected = self.slowdown.injected_delay(compute, time.monotonic()) if self.slowdown else 0.0
        if injected > 0:
            time.sleep(injected)  # the replica is busy while it straggles
        timings = {"queue": start - enqueued, "compute": compute, "injected": injected}
        return prediction.probabilities, timings

    def describe(self) -> dict[str, Any]:
        """What the front end needs to know of the model (as a V2 worker's metadata says)."""
        cfg = self.meta.config
        return {
            "model": self.meta.name,
            "kind": self.meta.kind,
            "grid": self.meta.grid,
            "labels": list(self.meta.labels),
            "image_size": cfg.image_size,
            "channels": cfg.in_channels,
            "rank": self.rank,
            "slowdown": self.slowdown.describe() if self.slowdown else "none",
        }

    def ready(self) -> bool:
        return True

    def __del__(self) -> None:
        # Ray Serve calls this on a graceful replica stop; burners must not outlive it.
        if getattr(self, "contention", None):
            self.contention.stop()
        if getattr(self, "_executor", None):
            self._executor.shutdown(wait=False, cancel_futures=True)
