"""The pool owns the accounting: however calls end, every worker's outstanding count returns to zero."""

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collage_inference.errors import WorkerDownError, WorkerError
from collage_inference.serving.pool import Worker, WorkerPool
from collage_inference.serving.transports.base import Inference, ModelInfo
from collage_inference.serving.transports.fake import FakeTransport

IMAGES = np.zeros((1, 4, 4, 1), np.uint8)


def ones(images: np.ndarray) -> np.ndarray:
    return np.full((len(images), 3), 1 / 3, np.float32)


class Scripted(FakeTransport):
    """A transport whose every call does what the script says next."""

    def __init__(self, name: str, script: list[str], cancellable: bool) -> None:
        super().__init__(name, ones, delay=0.002)
        self.script, self.cancellable = script, cancellable

    def infer(self, images: np.ndarray, timeout: float):
        step = self.script.pop(0) if self.script else "answer"
        if step == "raise-now":
            raise OSError("the write failed")
        return self._run(step, images, timeout)

    async def _run(self, step: str, images: np.ndarray, timeout: float) -> Inference:
        await asyncio.sleep(0.002)
        if step == "down":
            raise WorkerDownError("refused")
        if step == "error":
            raise WorkerError("429")
        if step == "bug":
            raise ValueError("a transport bug")
        if step == "garbage":
            return Inference(np.zeros((5, 5), np.float32))
        return Inference(ones(images))


STEPS = st.sampled_from(["answer", "down", "error", "bug", "garbage", "raise-now"])


@settings(max_examples=60, deadline=None)
@given(
    script=st.lists(STEPS, max_size=12),
    cancels=st.lists(st.sampled_from(["keep", "cancel-before", "cancel-during"]), min_size=12, max_size=12),
    cancellable=st.booleans(),
)
def test_outstanding_returns_to_zero_whatever_the_calls_do(script, cancels, cancellable):
    async def run() -> list[Worker]:
        workers = [Worker(f"w{i}", Scripted(f"w{i}", list(script), cancellable)) for i in range(2)]
        pool = WorkerPool(workers)
        tasks = []
        for how in cancels[: len(script) or 1]:
            call = pool.call(IMAGES, timeout=1.0)
            assert call is not None
            if how == "cancel-before":
                call.cancel()
            task = asyncio.ensure_future(call.result())
            tasks.append(task)
            if how == "cancel-during":
                await asyncio.sleep(0)
                call.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return workers

    workers = asyncio.run(run())
    assert [w.outstanding for w in workers] == [0, 0]
    assert sum(w.calls for w in workers) == len(cancels[: len(script) or 1])


def test_a_garbage_answer_or_a_down_worker_marks_it_down_and_a_probe_brings_it_back():
    async def run() -> None:
        info = ModelInfo("m", "scnn", 1, ("a", "b", "c"), 4, 1)
        worker = Worker("w", Scripted("w", ["garbage"], cancellable=False), info=info)
        pool = WorkerPool([worker])
        call = pool.call(IMAGES, 1.0)
        with pytest.raises(WorkerDownError, match="shape"):
            await call.result()
        assert not worker.up and worker.outstanding == 0 and not pool.ready
        await pool.probe()
        assert worker.up

    asyncio.run(run())


def test_a_refused_call_leaves_the_worker_up():
    async def run() -> None:
        worker = Worker("w", Scripted("w", ["error"], cancellable=False))
        with pytest.raises(WorkerError):
            await WorkerPool([worker]).call(IMAGES, 1.0).result()
        assert worker.up and worker.outstanding == 0

    asyncio.run(run())


def test_calls_go_to_the_least_loaded_worker_then_the_fastest():
    a, b = Worker("a", FakeTransport("a", ones)), Worker("b", FakeTransport("b", ones))
    b.latency, a.latency = 0.001, 0.002
    pool = WorkerPool([a, b])
    first, second = pool.call(IMAGES, 1.0), pool.call(IMAGES, 1.0)
    assert (first.worker, second.worker) == (b, a)
    third = pool.call(IMAGES, 1.0, exclude="b")
    assert third.worker is a  # b is excluded
    for call in (first, second, third):
        call.cancel()
    assert a.outstanding == b.outstanding == 0
