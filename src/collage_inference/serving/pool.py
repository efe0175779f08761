"""The front end's workers: pick one per call, count its calls, mark it down, probe it back.

A :class:`WorkerPool` holds the workers serving one model. :meth:`WorkerPool.call` picks the up
worker with the fewest outstanding calls (then the lowest recent latency), starts the call on
its transport at once and returns a :class:`Call` to await or cancel. A call's slot in
``outstanding`` is taken when it starts and given back exactly once, in :meth:`Call._finish`,
however the call ends (answer, failure, timeout, cancellation before or after it ran). A
worker whose transport raises :class:`WorkerDownError` is marked down and probed in the
background until its readiness check answers, so ``/v2/health/ready`` and the pick tell the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass

import numpy as np

from collage_inference.errors import UnavailableError, WorkerDownError, WorkerError
from collage_inference.serving.transports.base import Inference, ModelInfo, Transport


@dataclass(eq=False)
class Worker:
    """One model server as the pool sees it: its transport and its state."""

    id: str
    transport: Transport
    up: bool = True
    outstanding: int = 0  # calls started and not finished
    calls: int = 0  # calls started, since the pool was built
    latency: float = 0.0  # moving average of round trips, seconds
    info: ModelInfo | None = None  # what describe() said; replies are checked against it

    async def describe(self) -> ModelInfo:
        self.info = await self.transport.describe()
        return self.info


class Call:
    __slots__ = ("worker", "_pending", "_count", "_start", "_task", "_finished")

    def __init__(self, worker: Worker, pending: Awaitable[Inference], count: int, start: float) -> None:
        self.worker = worker
        self._pending, self._count, self._start = pending, count, start
        self._task: asyncio.Task | None = None  # the task awaiting result(), once it runs
        self._finished = False
        worker.outstanding += 1
        worker.calls += 1

    async def result(self) -> Inference:
        """The answer; raises WorkerError (WorkerDownError marks the worker down)."""
        if self._finished:  # cancelled before anything awaited it
            raise asyncio.CancelledError
        self._task = asyncio.current_task()
        worker = self.worker
        try:
            inference = await self._pending
            expected = worker.info.expected_shape(self._count) if worker.info else None
            shape = inference.probabilities.shape
            if (expected is not None and shape != expected) or shape[:1] != (self._count,):
                raise WorkerDownError(
                    f"worker {worker.id} answered probabilities of shape {shape}, expected {expected}"
                )
        except (WorkerError, asyncio.CancelledError) as exc:
            if isinstance(exc, WorkerDownError):
                worker.up = False
            raise
        except Exception as exc:  # a transport bug must still settle as a failed call
            worker.up = False
            raise WorkerDownError(f"worker {worker.id} failed: {exc!r}") from exc
        finally:
            self._finish()
        elapsed = time.perf_counter() - self._start
        worker.latency = elapsed if worker.latency == 0 else 0.8 * worker.latency + 0.2 * elapsed
        inference.timings["round_trip"] = elapsed
        return inference

    def cancel(self) -> bool:
        """Drop the call where the transport can take it back from the server's queue; else
        let it run to its end (its answer is then read and ignored). True if dropped."""
        if self._finished or not self.worker.transport.cancellable:
            return False
        if self._task is None:  # nothing awaits it yet: it never will
            if asyncio.iscoroutine(self._pending):
                self._pending.close()
            self._finish()
        else:
            self._task.cancel()
        return True

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self.worker.outstanding -= 1


async def _failed(exc: Exception) -> Inference:
    raise exc


class WorkerPool:
    def __init__(self, workers: Iterable[Worker]) -> None:
        self.workers = list(workers)

    def __len__(self) -> int:
        return len(self.workers)

    @property
    def ready(self) -> bool:
        return any(w.up for w in self.workers)

    @property
    def outstanding(self) -> int:
        return sum(w.outstanding for w in self.workers)

    def least_queued(self) -> int:
        """Outstanding calls of the least busy up worker (0 when none is up)."""
        return min((w.outstanding for w in self.workers if w.up), default=0)

    def call(
        self, images: np.ndarray, timeout: float, *, exclude: str | None = None, idle_only: bool = False
    ) -> Call | None:
        """Start a call on the best worker (other than ``exclude`` when there is one) before returning;
        ``idle_only``: on a worker with nothing outstanding, else send nothing and return None."""
        worker = self._idle(exclude) if idle_only else self._pick(exclude)
        if worker is None:
            return None
        start = time.perf_counter()
        try:
            pending = worker.transport.infer(images, timeout)
        except Exception as exc:
            if isinstance(exc, WorkerDownError):
                worker.up = False
            pending = _failed(exc)  # a call that fails to start raises from its result
        return Call(worker, pending, len(images), start)

    def _pick(self, exclude: str | None) -> Worker:
        """The best up worker, else the excluded one, else a down one rather than refusing: a
        worker marked down may be back, and the call will tell."""
        candidates = [w for w in self.workers if w.up and w.id != exclude]
        if not candidates:
            candidates = [w for w in self.workers if w.up] or self.workers
        if not candidates:
            raise UnavailableError("no worker is configured for this model")
        return min(candidates, key=lambda w: (w.outstanding, w.latency))

    def _idle(self, exclude: str | None) -> Worker | None:
        """An up worker with nothing outstanding, or None. A pool of one worker is a deployment
        that balances its own replicas (Ray Serve): its calls are always placed."""
        if len(self.workers) == 1:
            return self._pick(exclude)
        idle = [w for w in self.workers if w.up and w.outstanding == 0 and w.id != exclude]
        return min(idle, key=lambda w: w.latency) if idle else None

    def find(self, worker_id: str) -> Worker | None:
        return next((w for w in self.workers if w.id == worker_id), None)

    async def probe(self) -> None:
        """Mark up the down workers that answer their readiness check."""
        down = [w for w in self.workers if not w.up]
        results = await asyncio.gather(*(w.transport.ready() for w in down))
        for worker, ok in zip(down, results, strict=True):
            worker.up = worker.up or ok

    async def run_probes(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):  # a probe must never kill the loop
                await self.probe()

    def close(self) -> None:
        for worker in self.workers:
            worker.transport.close()
