"""The front end's request path: named stages called in one visible order.

    submit(image)   (classify awaits it)
      1. admit      Request with an end-to-end deadline; refuse with 429 past max_pending
                    requests in flight or s-CNN calls outstanding
      2. send       primary s-CNN call(s) to the least-loaded worker(s)
      3. group      the grouper adds the request; a closed group is encoded into a collage
      4. backup     the collage goes to a collage worker
      5. decode     every reply, failure and timer tick goes through the decoder, whose
                    actions (Answer, Reissue, Fail) are carried out in :meth:`_apply`
      6. answer     the request's future resolves exactly once

Steps 1 to 4 run before :meth:`submit` returns, and an HTTP worker writes its call before
``infer`` returns, so a request reaches its workers without waiting for a task to be scheduled.
Grouper, encoder and decoder are pure; this module owns the event loop, the timer and (through
each model's :mod:`~collage_inference.serving.pool`) the sockets. One timer handle is kept at
the earliest of the grouper's and decoder's deadlines, so no task polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from collage_inference.config import FrontEndSettings
from collage_inference.errors import ConfigError, ModelNotFoundError, OverloadedError, WorkerError
from collage_inference.serving.clock import MonotonicClock
from collage_inference.serving.decoder import Decoder, DecoderConfig
from collage_inference.serving.encoder import CollageEncoder
from collage_inference.serving.grouper import Grouper, GroupingPolicy
from collage_inference.serving.latency import LatencyWindow
from collage_inference.serving.live import LiveView
from collage_inference.serving.metrics import Metrics
from collage_inference.serving.parity import ParityBook, ParityCode, ParityEncoder
from collage_inference.serving.pool import Call, Worker, WorkerPool
from collage_inference.serving.transports.base import Transport
from collage_inference.serving.types import Action, Answer, Fail, Group, Reissue, Reply, Request, Source

log = logging.getLogger(__name__)
PROBE_INTERVAL_S = 0.5  # between readiness probes of down workers


@dataclass
class _Flight:
    request: Request
    future: asyncio.Future[Answer]
    calls: list[Call] = field(default_factory=list)  # its s-CNN calls, dropped once it is answered


class FrontEnd:
    """Collage inference over a pool of s-CNN workers and collage workers (one pool per grid)."""

    def __init__(
        self,
        settings: FrontEndSettings,
        scnn: WorkerPool,
        collage: dict[int, WorkerPool],
        class_names: tuple[str, ...],
        tiles: dict[int, int],
        channels: int,
        parity: ParityCode | None = None,
    ) -> None:
        mode, grid = settings.redundancy, settings.fixed_grid
        if mode.collage and not collage:
            raise ConfigError(f"mode {mode.name!r} needs at least one collage worker")
        if mode.parity and parity is None:
            raise ConfigError(f"mode {mode.name!r} needs a parity worker (a ParM parity model)")
        if parity is not None:  # groups of the code's k; the pool of parity workers is keyed by k
            grid, tiles = parity.k, {}
        if mode.collage and grid is not None and grid not in collage:
            raise ConfigError(f"no collage worker serves grid {grid}; have {sorted(collage)}")
        self.settings, self.mode = settings, mode
        self.scnn, self.collage = scnn, collage
        self.class_names = class_names
        self.clock = MonotonicClock()
        # 1024: the grouper reads a p99 from it, which 256 samples of a 2%-slow trace hold 5 of
        self.primary_latencies = LatencyWindow(1024)
        self.collage_service = LatencyWindow(256)  # a collage call's busy time at its worker
        grids = tuple(sorted(collage)) or (1,)
        size = parity.k if parity else None
        policy = GroupingPolicy(grids=grids, grid=grid, timeout=settings.group_timeout, group_size=size)
        workers = max((len(pool.workers) for pool in collage.values()), default=1)
        self.grouper = Grouper(policy, self.primary_latencies, self.collage_service, collage_workers=workers)
        self.parity = parity
        self.encoder: CollageEncoder | ParityEncoder | None = None
        if parity is not None:
            self.encoder = ParityEncoder(parity.k, parity.encoder, parity.size, parity.channels)
        elif tiles:
            self.encoder = CollageEncoder(tiles, channels)
        book = ParityBook(parity.k) if parity else None
        self.metrics = Metrics(settings.model_name)
        self.live = LiveView()  # the dashboard's view: latency per second, backup queries when watched
        config = DecoderConfig.for_mode(settings, class_names)
        self.decoder = Decoder(config, self.primary_latencies, metrics=self.metrics, parity=book)
        self._flights: dict[str, _Flight] = {}
        # Mode parm: each parity call and its requests still unanswered; like ParM, a call whose
        # group is complete is cancelled where the transport can take it back.
        self._parity_calls: dict[int, tuple[Call, set[str]]] = {}
        self._parity_group: dict[str, int] = {}
        self._ids = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._rescheduling: asyncio.Handle | None = None  # a _schedule() queued on the loop
        self._running_loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self._probes: list[asyncio.Task] = []
        self.draining = False

    async def start(self) -> None:
        self._running_loop = asyncio.get_running_loop()  # a restart may run on a new loop
        self._probes += [asyncio.create_task(pool.run_probes(PROBE_INTERVAL_S)) for pool in self.pools]

    async def drain(self, timeout: float) -> None:
        """Close the open group and wait (up to ``timeout``) for requests in flight."""
        self._close_groups(self.grouper.flush(self.clock.now()))
        futures = [f.future for f in self._flights.values()]
        if futures:
            await asyncio.wait(futures, timeout=timeout)

    async def stop(self) -> None:
        for task in [*self._probes, *self._tasks]:
            task.cancel()
        for task in [*self._probes, *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for handle in (self._timer, self._rescheduling):
            if handle:
                handle.cancel()
        self._timer, self._timer_at, self._rescheduling = None, float("inf"), None

    @property
    def ready(self) -> bool:
        """Some s-CNN worker is up (the collage path only adds redundancy) and we are not draining."""
        return self.scnn.ready and not self.draining

    def mark_draining(self) -> None:
        """Not ready from now on: the server is about to stop."""
        self.draining = True

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def classify(self, image: np.ndarray) -> Answer:
        """Answer one uint8 (H, W, C) image; raises a ServingError for 429/503/504."""
        return await self.submit(image)

    def submit(self, image: np.ndarray) -> asyncio.Future[Answer]:
        """Admit one uint8 (H, W, C) image and send its calls before returning. The future resolves
        with its one answer or a ServingError (503/504); a full front end raises 429 at once."""
        # Calls outstanding count too: a request answered by its collage cell leaves its primary
        # call queued at a worker, and under overload that left-behind work would grow unbounded.
        load = max(len(self._flights), self.scnn.outstanding)
        if load >= self.settings.max_pending:
            self.metrics.shed += 1
            raise OverloadedError(
                f"{load} requests in flight or calls outstanding (limit {self.settings.max_pending}); "
                "retry later"
            )
        now = self.clock.now()
        request = Request(f"r{next(self._ids)}", image, now, now + self.settings.request_timeout)  # 1. admit
        flight = _Flight(request, self._loop().create_future())
        self._flights[request.id] = flight
        primary = self._send_single(flight, Source.PRIMARY)  # 2. send
        assert primary is not None  # a call that must go always goes
        # The call first: the bookkeeping below then runs while the worker computes. Whatever
        # the call does comes back through the event loop, after the decoder has the request.
        self._apply(self.decoder.admit(request, now, worker_id=primary.id, backup=self.mode.collage))
        for _ in range(self.mode.copies - 1):
            self._send_single(flight, Source.PRIMARY, exclude=primary.id)
        if self.mode.collage:  # 3. group, 4. backup
            self._close_groups(self.grouper.add(request, now))
        self._schedule_soon()
        return flight.future  # 6. answer

    def _send_single(
        self, flight: _Flight, source: Source, exclude: str | None = None, idle_only: bool = False
    ) -> Worker | None:
        """Send the request's image to an s-CNN worker; None when ``idle_only`` found none idle."""
        request = flight.request
        timeout = self._remaining(request.deadline)
        call = self.scnn.call(request.image[None], timeout, exclude=exclude, idle_only=idle_only)
        if call is None:
            return None
        flight.calls.append(call)
        self._spawn(self._single(request, call, source))
        return call.worker

    async def _single(self, request: Request, call: Call, source: Source) -> None:
        try:
            result = await call.result()
        except asyncio.CancelledError:
            if source == Source.PRIMARY:  # keep the straggler in the statistics, as a lower bound
                self.primary_latencies.add(self.clock.now() - request.arrival)
            raise
        except Exception as exc:  # whatever a worker does, its request must still be settled
            self._call_failed(call, request.id, exc)
            return
        reply = Reply.from_probabilities(
            source, call.worker.id, result.probabilities[0], request_id=request.id, timings=result.timings
        )
        self._apply(self.decoder.primary_reply(request.id, reply, self.clock.now()))

    def _close_groups(self, groups: list[Group]) -> None:
        for group in groups:
            plan = self.grouper.last_plan
            self.metrics.observe_group(group, plan.timeout if plan else None, plan.window if plan else None)
            if self.encoder is None:
                continue
            pool = self.collage[group.grid]
            if not self.grouper.worth_sending(pool.least_queued()):
                self.metrics.collages_skipped += 1  # its requests are covered by re-issue instead
                self._apply(self.decoder.worker_failed(group, self.clock.now()))
                continue
            collage = self.encoder.encode(group)
            call = pool.call(collage.pixels[None], self._remaining(max(r.deadline for r in group.requests)))
            assert call is not None
            now = self.clock.now()
            if self.live.watching(now):
                self.live.keep_query(group, "parity" if self.parity else "collage", collage.pixels, now)
            if self.parity is not None:
                self._parity_calls[group.id] = (call, set(group.request_ids))
                self._parity_group.update(dict.fromkeys(group.request_ids, group.id))
            self._apply(self.decoder.add_group(group, now))
            self._spawn(self._backup(group, call))

    async def _backup(self, group: Group, call: Call) -> None:
        try:
            result = await call.result()
        except Exception as exc:  # whatever a worker does, its group must still be settled
            self._call_failed(call, group, exc)
            return
        finally:
            self._forget_parity_call(group.id)
        timings = result.timings
        busy = timings.get("compute", 0.0) + timings.get("injected", 0.0)
        self.collage_service.add(busy if busy > 0 else timings.get("round_trip", 0.0))
        source = Source.PARITY if self.parity else Source.COLLAGE
        reply = Reply.from_probabilities(
            source, call.worker.id, result.probabilities[0], group_id=group.id, timings=timings
        )
        decode = self.decoder.parity_reply if self.parity else self.decoder.collage_reply
        now = self.clock.now()
        if self.live.watching(now):
            self.live.query_answered(group, reply, self.class_names)
        self._apply(decode(group, reply, now))

    def _call_failed(self, call: Call, target: str | Group, exc: Exception) -> None:
        self.metrics.worker_errors += 1
        if not isinstance(exc, WorkerError):
            log.error("call to worker %s failed unexpectedly: %r", call.worker.id, exc)
        self._apply(self.decoder.worker_failed(target, self.clock.now()))

    @property
    def pools(self) -> tuple[WorkerPool, ...]:
        return (self.scnn, *self.collage.values())

    def replace_transport(self, worker_id: str, transport: Transport) -> Worker:
        """Reach worker ``worker_id`` through ``transport`` from now on (it restarted at a new
        address); it counts as down until its readiness probe answers there."""
        for pool in self.pools:
            worker = pool.find(worker_id)
            if worker is not None:
                worker.transport.close()
                worker.transport, worker.up = transport, False
                return worker
        known = ", ".join(w.id for p in self.pools for w in p.workers)
        raise ModelNotFoundError(f"no worker {worker_id!r}; the workers are {known}")

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            flight = self._flights.get(action.request_id)
            if flight is None:
                continue
            if isinstance(action, Answer | Fail):  # the request's last action
                del self._flights[action.request_id]
            if flight.future.done():  # the caller stopped waiting (cancelled)
                continue
            if isinstance(action, Answer):
                self.metrics.observe_answer(action)
                self.live.observe(action, self.clock.now())
                flight.future.set_result(action)
                self._cancel_calls(flight)
                if self._parity_group:
                    self._answered_in_group(action.request_id)
            elif isinstance(action, Fail):
                self.metrics.observe_failure(action.status)
                flight.future.set_exception(action.error())
            elif isinstance(action, Reissue):
                # Under ``reissue_to = idle`` an optional re-issue goes only to a worker with nothing
                # queued: a busy one would answer no sooner and queue the copy ahead of new requests.
                idle_only = self.settings.reissue_to == "idle" and action.optional
                if self._send_single(flight, Source.REPLICA, action.exclude_worker, idle_only) is None:
                    self.metrics.reissues_skipped += 1
                    self._apply(self.decoder.reissue_skipped(action.request_id, self.clock.now()))
                    continue
                self.metrics.reissues += 1
        self._schedule_soon()

    def _schedule_soon(self) -> None:
        """Re-aim the timer once the callbacks running now are done: after the answers they
        resolved are written (the answering task was queued first), and once for however many
        requests they touched. A timer set a loop turn later still fires at its deadline."""
        if self._rescheduling is None:
            self._rescheduling = self._loop().call_soon(self._schedule)

    def _schedule(self) -> None:
        self._rescheduling = None
        deadlines = (self.grouper.next_deadline(), self.decoder.next_deadline())
        due = min((d for d in deadlines if d is not None), default=float("inf"))
        if due >= self._timer_at:
            return
        if self._timer:
            self._timer.cancel()
        self._timer_at = due  # finite: it is below the previous one
        self._timer = self._loop().call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        now = self.clock.now()
        self._close_groups(self.grouper.poll(now))
        self._apply(self.decoder.tick(now))

    def _remaining(self, deadline: float) -> float:
        return max(deadline - self.clock.now(), 0.001)

    def _cancel_calls(self, flight: _Flight) -> None:
        """Drop its other s-CNN calls where the transport can: a straggler's queue sheds unwanted work."""
        for call in flight.calls:
            if call.cancel():
                self.metrics.cancelled += 1
        flight.calls.clear()

    def _answered_in_group(self, request_id: str) -> None:
        """Cancel a parity call once every request of its group is answered: nothing is left to recover."""
        group_id = self._parity_group.pop(request_id, None)
        if group_id is None:
            return
        call, unanswered = self._parity_calls[group_id]
        unanswered.discard(request_id)
        if not unanswered:
            self._forget_parity_call(group_id)
            if call.cancel():
                self.metrics.cancelled += 1

    def _forget_parity_call(self, group_id: int) -> None:
        entry = self._parity_calls.pop(group_id, None)
        if entry is not None:
            for request_id in entry[1]:
                self._parity_group.pop(request_id, None)

    def _loop(self) -> asyncio.AbstractEventLoop:
        # Kept: on Python 3.11 every get_running_loop() is a getpid() system call.
        if self._running_loop is None:
            self._running_loop = asyncio.get_running_loop()
        return self._running_loop

    def _spawn(self, coro) -> None:
        task = self._loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def build_frontend(
    settings: FrontEndSettings, scnn: Sequence[Transport], collage: Sequence[Transport] = ()
) -> FrontEnd:
    """Describe every model server and build the front end over them: the one way a front end
    is built, whatever the transports (workers ``scnn-i`` and ``collage-i``, in order)."""
    if not scnn:
        raise ConfigError("give at least one s-CNN worker")
    collage = collage if settings.redundancy.collage else ()
    scnn_workers = [Worker(f"scnn-{i}", t) for i, t in enumerate(scnn)]
    collage_workers = [Worker(f"collage-{i}", t) for i, t in enumerate(collage)]
    infos = await asyncio.gather(*(w.describe() for w in scnn_workers + collage_workers))
    class_names, channels = infos[0].labels, infos[0].channels
    for worker, info in zip(scnn_workers, infos, strict=False):
        if info.kind != "scnn" or info.labels != class_names:
            where = worker.transport.name
            raise ConfigError(f"worker {where} serves {info.kind} {info.model}, not a matching s-CNN")
    backup = "parity" if settings.redundancy.parity else "collage"
    pools: dict[int, list[Worker]] = {}
    tiles: dict[int, int] = {}
    codes: set[tuple[int, str, int, int]] = set()
    for worker, info in zip(collage_workers, infos[len(scnn_workers) :], strict=True):
        if info.kind != backup or info.labels[: len(class_names)] != class_names:
            where = worker.transport.name
            raise ConfigError(
                f"worker {where} serves {info.kind} {info.model}, not a matching {backup} model"
            )
        if backup == "parity":
            codes.add((info.parity_k, info.encoder, info.image_size, info.channels))
            pools.setdefault(info.parity_k, []).append(worker)
        else:
            pools.setdefault(info.grid, []).append(worker)
            tiles[info.grid] = info.image_size
    parity = None
    if codes:
        if len(codes) > 1:
            raise ConfigError(
                f"the parity workers serve different codes (k, encoder, size, channels): {codes}"
            )
        parity = ParityCode(*codes.pop())
    collage_pools = {grid: WorkerPool(workers) for grid, workers in pools.items()}
    return FrontEnd(settings, WorkerPool(scnn_workers), collage_pools, class_names, tiles, channels, parity)
