"""The front end's request path over in-memory workers: fast, no processes, real asyncio timing."""

import asyncio

import numpy as np
import pytest

from collage_inference.config import FrontEndSettings
from collage_inference.errors import ModelNotFoundError, OverloadedError
from collage_inference.modes import DecoderPolicy
from collage_inference.serving.frontend import FrontEnd, _Flight
from collage_inference.serving.pool import Worker, WorkerPool
from collage_inference.serving.transports.fake import FakeTransport
from collage_inference.serving.types import Request, Source

CLASSES = tuple(f"c{i}" for i in range(10))
TILE = 4


def answer_scnn(images: np.ndarray) -> np.ndarray:
    """The label is the image's first pixel value minus one."""
    return np.eye(len(CLASSES), dtype=np.float32)[[int(images[0, 0, 0, 0]) - 1]]


def answer_collage(grid: int):
    def answer(images: np.ndarray) -> np.ndarray:  # (1, S*t, S*t, 1) -> (1, k, C + 1), per tile
        tiles = images[0, ::TILE, ::TILE, 0].reshape(grid * grid)
        labels = np.where(tiles == 0, len(CLASSES), tiles - 1)  # black tile = empty
        return np.eye(len(CLASSES) + 1, dtype=np.float32)[labels][None]

    return answer


def FakeWorker(worker_id: str, delay: float = 0.001, fail: bool = False, grid: int = 0) -> Worker:
    answer = answer_collage(grid) if grid else answer_scnn
    return Worker(worker_id, FakeTransport(worker_id, answer, delay=delay, fail=fail))


def image(label: int) -> np.ndarray:
    return np.full((TILE, TILE, 1), label + 1, np.uint8)


def frontend(mode: str, scnn: list[Worker], collage: Worker | None = None, **kw) -> FrontEnd:
    config = FrontEndSettings(mode, grid=2, group_timeout=0.005, request_timeout=2.0, **kw)
    pools = {2: WorkerPool([collage])} if collage else {}
    return FrontEnd(config, WorkerPool(scnn), pools, CLASSES, {2: TILE} if collage else {}, 1)


async def classify_all(fe: FrontEnd, labels: list[int]):
    await fe.start()
    try:
        return await asyncio.gather(*(fe.classify(image(x)) for x in labels), return_exceptions=True)
    finally:
        await fe.stop()


def test_collage_rescues_a_straggler_fast():
    slow = FakeWorker("s0", delay=1.5)
    fe = frontend(
        "collage", [slow, FakeWorker("s1"), FakeWorker("s2"), FakeWorker("s3")], FakeWorker("c", grid=2)
    )
    # warm the primary latency window so the patient policy knows what "late" means
    asyncio.run(classify_all(fe, [1, 2, 3]))
    assert slow.outstanding == 0  # the straggler's call was cancelled at stop and gave its slot back
    answers = asyncio.run(classify_all(fe, [0, 1, 2, 3, 4, 5, 6, 7]))
    assert [a.label for a in answers] == [0, 1, 2, 3, 4, 5, 6, 7]
    rescued = [a for a in answers if a.worker_id == "c"]
    assert rescued and all(a.source is Source.COLLAGE and a.latency < 0.5 for a in rescued)


def test_every_request_answered_once_when_a_worker_fails():
    workers = [FakeWorker("s0", fail=True), FakeWorker("s1"), FakeWorker("s2")]
    fe = frontend("none", workers)
    answers = asyncio.run(classify_all(fe, list(range(10))))
    assert [a.label for a in answers] == list(range(10))
    assert {a.source for a in answers} <= {Source.PRIMARY, Source.REPLICA}
    assert fe.metrics.success == 10 and fe.decoder.pending == 0


def test_replicate_all_sends_two_copies_and_answers_once():
    workers = [FakeWorker(f"s{i}") for i in range(4)]
    fe = frontend("replicate-all", workers)
    answers = asyncio.run(classify_all(fe, [3, 4]))
    assert [a.label for a in answers] == [3, 4]
    assert sum(w.calls for w in workers) == 4


def test_first_policy_takes_whichever_answer_comes_first():
    fe = frontend(
        "collage", [FakeWorker("s0", delay=0.3)], FakeWorker("c", grid=2), policy=DecoderPolicy.FIRST.value
    )
    answers = asyncio.run(classify_all(fe, [5, 6, 7, 8]))
    assert [a.label for a in answers] == [5, 6, 7, 8] and all(a.source is Source.COLLAGE for a in answers)


def test_overload_is_refused_with_429():
    fe = frontend("none", [FakeWorker("s0", delay=0.05)], max_pending=3)
    results = asyncio.run(classify_all(fe, list(range(6))))
    refused = [r for r in results if isinstance(r, OverloadedError)]
    assert len(refused) == 3 and refused[0].status == 429
    assert fe.metrics.shed == 3


def test_all_paths_down_gives_a_clear_failure():
    fe = frontend("none", [FakeWorker("s0", fail=True)])
    (result,) = asyncio.run(classify_all(fe, [1]))
    assert isinstance(result, Exception) and getattr(result, "status", None) in (503, 504)
    assert sum(fe.metrics.failures.values()) == 1


@pytest.mark.parametrize("mode", ["equal", "replicate", "hedge"])
def test_baseline_modes_answer_right(mode):
    fe = frontend(mode, [FakeWorker(f"s{i}") for i in range(3)])
    answers = asyncio.run(classify_all(fe, [9, 8, 7]))
    assert [a.label for a in answers] == [9, 8, 7]


@pytest.mark.parametrize(("reissue_to", "replicas"), [("idle", 0), ("least-loaded", 1)])
def test_a_lateness_reissue_under_idle_skips_busy_workers(reissue_to, replicas):
    # both workers busy for 0.2 s; the replicate timeout (20 ms) passes while they are
    workers = [FakeWorker("s0", delay=0.2), FakeWorker("s1", delay=0.2)]
    fe = frontend("replicate", workers, replicate_timeout=0.02, reissue_to=reissue_to)
    answers = asyncio.run(classify_all(fe, [4, 5]))
    assert [a.label for a in answers] == [4, 5]
    assert fe.metrics.reissues == 2 * replicas and fe.metrics.reissues_skipped == 2 * (1 - replicas)
    assert all(w.outstanding == 0 for w in workers)  # a skipped re-issue took no slot


def test_a_lateness_reissue_under_idle_goes_to_an_idle_worker_and_counts_its_call():
    workers = [FakeWorker("s0", delay=0.3), FakeWorker("s1", delay=0.01)]
    fe = frontend("replicate", workers, replicate_timeout=0.05, reissue_to="idle")
    [answer] = asyncio.run(classify_all(fe, [6]))
    assert answer.label == 6 and answer.source == Source.REPLICA and workers[1].calls == 1
    assert fe.metrics.reissues == 1 and all(w.outstanding == 0 for w in workers)


def test_a_burst_is_spread_over_the_least_loaded_workers():
    workers = [FakeWorker(f"s{i}", delay=0.02) for i in range(4)]
    fe = frontend("none", workers)
    asyncio.run(classify_all(fe, list(range(8))))
    assert [w.calls for w in workers] == [2, 2, 2, 2]
    assert all(w.outstanding == 0 for w in workers)


def GarbageWorker(worker_id: str, grid: int = 0) -> Worker:
    """A worker whose calls fail with something other than WorkerError (a bug, garbage)."""

    def garbage(images: np.ndarray) -> np.ndarray:
        raise ValueError("garbage in the reply")

    return Worker(worker_id, FakeTransport(worker_id, garbage))


def test_a_worker_raising_anything_still_leaves_every_request_answered_once():
    bad = GarbageWorker("s0")
    fe = frontend("collage", [bad, FakeWorker("s1")], FakeWorker("c", grid=2))
    answers = asyncio.run(classify_all(fe, list(range(8))))
    assert [a.label for a in answers] == list(range(8))
    assert bad.calls and fe.metrics.worker_errors == bad.calls and fe.decoder.pending == 0


def test_a_broken_collage_worker_degrades_to_the_primary_path_without_errors():
    fe = frontend("collage", [FakeWorker("s0"), FakeWorker("s1")], GarbageWorker("c", grid=2))
    answers = asyncio.run(classify_all(fe, list(range(8))))
    assert [a.label for a in answers] == list(range(8))
    assert all(a.source is Source.PRIMARY for a in answers) and fe.ready


def test_replace_transport_points_a_worker_elsewhere_and_marks_it_down_until_probed():
    moved = FakeWorker("s0")
    fe = frontend("none", [moved, FakeWorker("s1")])
    elsewhere = FakeTransport("elsewhere", answer_scnn)
    fe.replace_transport("s0", elsewhere)
    assert moved.transport is elsewhere and not moved.up
    with pytest.raises(ModelNotFoundError, match="s0, s1"):
        fe.replace_transport("nope", elsewhere)


def test_a_call_cancelled_before_it_started_gives_its_slot_back():
    async def run() -> tuple[int, int]:
        fe = frontend("none", [FakeWorker("s0"), FakeWorker("s1")])
        await fe.start()
        try:
            flight = _Flight(Request("x", image(1), 0.0, 10.0), asyncio.get_running_loop().create_future())
            worker = fe._send_single(flight, Source.REPLICA)  # its task never gets to run
            fe._cancel_calls(flight)
            await asyncio.sleep(0)
            return worker.outstanding, fe.metrics.cancelled
        finally:
            await fe.stop()

    assert asyncio.run(run()) == (0, 1)


def test_a_caller_that_stops_waiting_leaves_nothing_behind():
    async def scenario() -> None:
        worker = FakeWorker("s0", delay=0.05)
        fe = frontend("none", [worker])
        await fe.start()
        try:
            future = fe.submit(image(3))
            future.cancel()  # the client went away
            await asyncio.sleep(0.1)  # the worker answers; the answer has nobody to go to
            assert fe.in_flight == 0 and worker.outstanding == 0 and worker.calls == 1
            assert (await fe.classify(image(4))).label == 4  # and the front end serves on
        finally:
            await fe.stop()

    asyncio.run(scenario())


def test_an_idle_only_call_takes_only_an_idle_worker():
    async def run() -> None:
        busy, idle = FakeWorker("s0"), FakeWorker("s1")
        pool = WorkerPool([busy, idle])
        first = pool.call(image(1)[None], 1.0, exclude="s1")
        assert first is not None and first.worker is busy
        call = pool.call(image(1)[None], 1.0, exclude="s0", idle_only=True)
        assert call is not None and call.worker is idle and idle.outstanding == 1
        assert pool.call(image(1)[None], 1.0, exclude="s0", idle_only=True) is None  # both busy
        await asyncio.gather(first.result(), call.result())
        assert busy.outstanding == idle.outstanding == 0
        single = FakeWorker("ray")  # one worker standing for a deployment that routes itself
        single.outstanding = 5
        lone = WorkerPool([single]).call(image(1)[None], 1.0, exclude="ray", idle_only=True)
        assert lone is not None and single.outstanding == 6
        await lone.result()

    asyncio.run(run())
