"""One model served: admission, compute, injected delay, published facts, readiness.

The core of every model worker, with no transport in sight: the HTTP worker (:mod:`.worker`) and
the Ray Serve deployment (:mod:`.ray.deployments`) are thin adapters over it, so both admit,
compute, straggle and describe the model alike.

* **Admission.** At most ``max_queue`` calls are admitted (waiting plus computing); past that a
  call is refused with 429 at once, so a straggler's queue cannot grow without bound.
* **Compute.** Calls run one at a time on one compute thread, so the event loop stays free for
  parsing and health checks while a straggler sleeps, and calls queued behind it wait, as in
  the published runs. A server that injects nothing runs a small batch (``INLINE_MAX_IMAGES``,
  a fraction of a millisecond) on the event loop itself when nothing is queued: the hand-off
  to a thread and back costs about as much CPU as the model.
* **Injected delay.** A :class:`~collage_inference.slowdown.Slowdown` draws how long each call
  straggles; the compute thread sleeps it, busy as a slow machine would be.
* **Readiness.** From :meth:`drain` on the server says not ready, so an orchestrator stops
  sending calls to a server that is stopping.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from collage_inference.config import SlowdownSettings, WorkerSettings
from collage_inference.errors import OverloadedError, PayloadTooLargeError, ProtocolError
from collage_inference.serving.runtime import BatchPrediction, ModelRunner, load_runner
from collage_inference.slowdown import CpuContention, Slowdown, parse_slowdown

INLINE_MAX_IMAGES = 8


@dataclass(frozen=True, eq=False)
class Result:
    """A computed batch and where its time went: queue, compute and injected seconds."""

    prediction: BatchPrediction
    timings: dict[str, float]


class ModelServer:
    """The model, its compute thread and its bounded queue (see the module docstring)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.runner: ModelRunner = load_runner(settings.model_path, settings.backend, settings.threads)
        self.meta = self.runner.meta
        self.name = settings.name or self.meta.name
        self.slowdown: Slowdown | None = None
        self.contention: CpuContention | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="compute")
        self.straggle(settings.slowdown)  # sets _inline
        self.queued = 0  # admitted and not yet finished: waiting plus computing
        self.served = 0
        self.shed = 0
        self.ready = True  # loaded and warmed by load_runner; false once draining

    def straggle(self, settings: SlowdownSettings | None) -> None:
        """Straggle from now on as ``settings`` say (None: not at all)."""
        if self.contention:
            self.contention.stop()
        self.slowdown = self.contention = None
        if settings is not None and settings.active:
            s = settings
            self.slowdown = parse_slowdown(s.spec, s.kind, s.seed, s.onset_rate, s.period)
            if s.contention:
                self.contention = CpuContention(s.contention, self.settings.threads)
                self.contention.start()
        self._inline = self.slowdown is None and self.contention is None

    def check_batch(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (H, W), (H, W, C) or (N, H, W[, C]) as a batch (N, H, W[, C]), checked
        before the call takes a queue slot. A 3-D array whose last axis is 1, 3 or 4 is one
        (H, W, C) image; otherwise it is a batch of grey images."""
        if images.ndim == 2 or (images.ndim == 3 and images.shape[2] in (1, 3, 4)):
            images = images[None]
        if images.ndim not in (3, 4) or 0 in images.shape[1:]:
            raise ProtocolError(
                f"'image' must be (H, W), (H, W, C) or (N, H, W[, C]) with H, W >= 1, got {images.shape}"
            )
        if images.ndim == 4 and images.shape[3] not in (1, 3, 4):
            raise ProtocolError(f"'image' channels must be 1, 3 or 4, got {images.shape[3]}")
        return self._check_size(images)

    def check_pixels(self, x: np.ndarray) -> np.ndarray:
        """float32 pixels (N, C, H, W) at the model's input size, checked."""
        if x.ndim != 4 or x.shape[1:] != self.runner.input_shape:
            shape = ", ".join(map(str, self.runner.input_shape))
            raise ProtocolError(f"'input' must be (N, {shape}), got {x.shape}; or send a UINT8 'image'")
        return self._check_size(x)

    def _check_size(self, batch: np.ndarray) -> np.ndarray:
        limit = self.settings.max_batch
        if len(batch) > limit:
            raise PayloadTooLargeError(f"batch of {len(batch)} exceeds the limit of {limit}")
        return batch

    def infer(self, x: np.ndarray, is_images: bool = True) -> Result | asyncio.Future[Result]:
        """Run one checked batch, inline or on the compute thread (a future); see the module docstring."""
        if self.queued >= self.settings.max_queue:
            self.shed += 1
            raise OverloadedError(
                f"{self.queued} calls are queued at model {self.name} (limit {self.settings.max_queue}); "
                "retry later"
            )
        self.queued += 1
        if self._inline and len(x) <= INLINE_MAX_IMAGES and self.queued == 1:
            try:
                return self._compute(x, is_images, time.perf_counter())
            finally:
                self._release()
        loop = asyncio.get_running_loop()
        job = self._executor.submit(self._compute, x, is_images, time.perf_counter())
        # The slot is released when the job really ends, even if the caller went away meanwhile.
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        return asyncio.wrap_future(job)

    def _release(self) -> None:
        self.queued -= 1
        self.served += 1

    def _compute(self, x: np.ndarray, is_images: bool, enqueued: float) -> Result:
        start = time.perf_counter()
        prediction = self.runner.run_images(x) if is_images else self.runner.run_pixels(x)
        compute = time.perf_counter() - start
        injected = self.slowdown.injected_delay(compute, time.monotonic()) if self.slowdown else 0.0
        if injected > 0:
            time.sleep(injected)  # the server is busy while it straggles, as in the published runs
        return Result(prediction, {"queue": start - enqueued, "compute": compute, "injected": injected})

    def facts(self) -> dict[str, Any]:
        """What a front end needs to know of the model (and what an operator wants to see)."""
        return {
            **self.meta.facts(),
            "backend": self.runner.backend,
            "slowdown": self.slowdown.describe() if self.slowdown else "none",
            "contention": self.contention.describe() if self.contention else "none",
        }

    def drain(self) -> None:
        self.ready = False

    def close(self) -> None:
        self.ready = False
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self.contention:
            self.contention.stop()
