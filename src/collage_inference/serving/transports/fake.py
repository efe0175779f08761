"""A model server in memory: the transport tests and examples drive the front end with."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np

from collage_inference.errors import WorkerDownError, WorkerError
from collage_inference.serving.transports.base import Inference, ModelInfo


class FakeTransport:
    """Answers ``answer(images)`` (probabilities) after ``delay`` seconds on the event loop.

    Set ``fail`` to make every call (and the readiness probe) fail as a dead server would; a
    delay past the call's timeout fails it too. ``calls`` counts the calls started.
    """

    cancellable = True  # a pending sleep is cancelled like a queued call

    def __init__(
        self,
        name: str,
        answer: Callable[[np.ndarray], np.ndarray],
        *,
        delay: float = 0.001,
        fail: bool = False,
        info: ModelInfo | None = None,
    ) -> None:
        self.name, self.answer, self.delay, self.fail, self.info = name, answer, delay, fail, info
        self.calls = 0

    def infer(self, images: np.ndarray, timeout: float) -> Awaitable[Inference]:
        self.calls += 1
        return self._answer(images, timeout)

    async def _answer(self, images: np.ndarray, timeout: float) -> Inference:
        await asyncio.sleep(min(self.delay, timeout))
        if self.fail or self.delay > timeout:
            raise WorkerDownError(f"{self.name} failed")
        return Inference(self.answer(images), {"compute": self.delay})

    async def ready(self, timeout: float = 1.0) -> bool:
        return not self.fail

    async def describe(self, timeout: float = 5.0) -> ModelInfo:
        if self.info is None:
            raise WorkerError(f"{self.name} was given no ModelInfo to describe")
        return self.info

    def close(self) -> None:
        pass
