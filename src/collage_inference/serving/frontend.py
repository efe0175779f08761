"""The front end's request path: named stages called in one visible order.

    submit(image)   (classify awaits it)
      1. admit      Request with an end-to-end deadline; refuse with 429 past max_pending
                    requests in flight or s-CNN calls outstanding
      2. dispatch   primary s-CNN call(s) to the least-loaded worker(s)
      3. group      the grouper adds the request; a closed group is encoded into a collage
      4. backup     the collage goes to a collage worker
      5. decode     every reply, failure and timer tick goes through the decoder, whose
                    actions (Answer, Reissue, Fail) are carried out in :meth:`_apply`
      6. answer     the request's future resolves exactly once

Steps 1 to 4 run before :meth:`submit` returns, and an HTTP worker writes its call before
``infer`` returns, so a request reaches its workers without waiting for a task to be scheduled.
Grouper, encoder and decoder are pure; this module owns the event loop, the timer and the
sockets (through :mod:`~collage_inference.serving.dispatch`). One timer handle is kept at the
earliest of the grouper's and decoder's deadlines, so no task polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field

import numpy as np

from collage_inference.errors import ConfigError, ModelNotFoundError, OverloadedError, WorkerError
from collage_inference.serving.clock import MonotonicClock
from collage_inference.serving.decoder import Decoder
from collage_inference.serving.dispatch import Inference, Worker, WorkerPool
from collage_inference.serving.encoder import CollageEncoder
from collage_inference.serving.grouper import Grouper, GroupingPolicy
from collage_inference.serving.latency import LatencyWindow
from collage_inference.serving.metrics import Metrics
from collage_inference.serving.modes import REISSUE_TARGETS, Mode, decoder_config
from collage_inference.serving.types import (
    Action,
    Answer,
    DecoderPolicy,
    Fail,
    Group,
    Reissue,
    Reply,
    Request,
    Source,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrontEndConfig:
    """Serving knobs. ``grid`` None lets the grouper pick S from the arrival rate among the
    grids served; ``group_timeout`` None adapts the group deadline to load."""

    mode: Mode
    grid: int | None = 3
    group_timeout: float | None = None
    policy: DecoderPolicy = DecoderPolicy.CONFIDENT
    confident_at: float = 0.9  # policy confident: a cell this sure answers at once
    request_timeout: float = 5.0  # end-to-end deadline; past it the client gets 504
    replicate_timeout: float = 0.1  # the fixed re-issue timeout of mode ``replicate``
    max_pending: int = 4096  # requests in flight, or s-CNN calls outstanding, before new ones get 429
    probe_interval: float = 0.5  # seconds between readiness probes of down workers
    reissue_to: str = "idle"  # or "least-loaded"; "idle": a re-issue for lateness skips busy workers

    def __post_init__(self) -> None:
        if self.reissue_to not in REISSUE_TARGETS:
            raise ConfigError(
                f"reissue_to is {self.reissue_to!r}; choose one of {', '.join(REISSUE_TARGETS)}"
            )


@dataclass
class _Flight:
    request: Request
    future: asyncio.Future[Answer]
    # s-CNN calls on transports that can cancel (``worker.cancellable``): cancelled once the
    # request is answered, so a straggler's queue drops work nobody waits for. HTTP calls are
    # left to finish: closing a keep-alive connection costs more than the reply.
    cancellable: list[tuple[asyncio.Task, Worker, Awaitable[Inference]]] = field(default_factory=list)


def _start(worker: Worker, images: np.ndarray, call_id: str, timeout: float) -> Awaitable[Inference]:
    """Start a worker call now (an HTTP worker writes it before returning); a call that fails
    to start becomes an awaitable that raises, so every failure is settled in one place."""
    try:
        return worker.infer(images, call_id, timeout)
    except Exception as exc:
        return _raise(exc)


async def _raise(exc: Exception) -> Inference:
    raise exc


class FrontEnd:
    """Collage inference over a pool of s-CNN workers and collage workers (one pool per grid)."""

    def __init__(
        self,
        config: FrontEndConfig,
        scnn: WorkerPool,
        collage: dict[int, WorkerPool],
        class_names: tuple[str, ...],
        tiles: dict[int, int],
        channels: int,
    ) -> None:
        if config.mode.collage and not collage:
            raise ConfigError("mode 'collage' needs at least one collage worker")
        if config.mode.collage and config.grid is not None and config.grid not in collage:
            raise ConfigError(f"no collage worker serves grid {config.grid}; have {sorted(collage)}")
        self.config, self.mode = config, config.mode
        self.scnn, self.collage = scnn, collage
        self.class_names = class_names
        self.clock = MonotonicClock()
        # 1024: the grouper reads a p99 from it, which 256 samples of a 2%-slow trace hold 5 of
        self.primary_latencies = LatencyWindow(1024)
        self.collage_service = LatencyWindow(256)  # a collage call's busy time at its worker
        grids = tuple(sorted(collage)) or (1,)
        self.grouper = Grouper(
            GroupingPolicy(grids=grids, grid=config.grid, timeout=config.group_timeout),
            self.primary_latencies,
            self.collage_service,
            collage_workers=max((len(pool.workers) for pool in collage.values()), default=1),
        )
        self.encoder = CollageEncoder(tiles, channels) if tiles else None
        self.decoder = Decoder(
            decoder_config(
                config.mode,
                class_names,
                config.policy,
                config.replicate_timeout,
                config.request_timeout,
                config.confident_at,
            ),
            self.primary_latencies,
        )
        self.metrics = Metrics()
        self._flights: dict[str, _Flight] = {}
        self._ids = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._rescheduling: asyncio.Handle | None = None  # a _schedule() queued on the loop
        self._running_loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self._probes: list[asyncio.Task] = []

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._running_loop = asyncio.get_running_loop()  # a restart may run on a new loop
        for pool in (self.scnn, *self.collage.values()):
            self._probes.append(asyncio.create_task(pool.run_probes(self.config.probe_interval)))

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
        if self._timer:
            self._timer.cancel()
        if self._rescheduling:
            self._rescheduling.cancel()
        self._timer, self._timer_at, self._rescheduling = None, float("inf"), None

    @property
    def ready(self) -> bool:
        """Ready when some s-CNN worker is up (the collage path only adds redundancy)."""
        return self.scnn.ready

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    @property
    def scnn_outstanding(self) -> int:
        """s-CNN calls sent and not finished, answered requests' calls included: the queue depth."""
        return sum(w.outstanding for w in self.scnn.workers)

    # -- the request path ---------------------------------------------------------------------

    async def classify(self, image: np.ndarray) -> Answer:
        """Answer one uint8 (H, W, C) image; raises a ServingError for 429/503/504."""
        return await self.submit(image)

    def submit(self, image: np.ndarray) -> asyncio.Future[Answer]:
        """Admit one uint8 (H, W, C) image and send its calls before returning; the future
        resolves with its one answer (or a ServingError for 503/504). Raises OverloadedError
        (429) at once when the front end is full."""
        # Calls outstanding count too: a request answered by its collage cell leaves its primary
        # call queued at a worker, and under overload that left-behind work would grow unbounded.
        load = max(len(self._flights), self.scnn_outstanding)
        if load >= self.config.max_pending:
            self.metrics.shed += 1
            raise OverloadedError(
                f"{load} requests in flight or calls outstanding (limit {self.config.max_pending}); "
                "retry later"
            )
        now = self.clock.now()
        request = Request(f"r{next(self._ids)}", image, now, now + self.config.request_timeout)  # 1. admit
        flight = _Flight(request, self._loop().create_future())
        self._flights[request.id] = flight
        primary = self.scnn.pick()  # 2. dispatch
        # The call first: the bookkeeping below then runs while the worker computes. Whatever
        # the call does comes back through the event loop, after the decoder has the request.
        self._send_single(flight, primary, Source.PRIMARY)
        self._apply(self.decoder.admit(request, now, worker_id=primary.id, backup=self.mode.collage))
        for _ in range(self.mode.copies - 1):
            self._send_single(flight, self.scnn.pick(exclude=primary.id), Source.PRIMARY)
        if self.mode.collage:  # 3. group, 4. backup
            self._close_groups(self.grouper.add(request, now))
        self._schedule_soon()
        return flight.future  # 6. answer

    def _send_single(self, flight: _Flight, worker: Worker, source: Source) -> None:
        request = flight.request
        call = _start(worker, request.image[None], request.id, self._remaining(request))
        task = self._spawn(self._single(request, worker, source, call))
        if getattr(worker, "cancellable", False):
            flight.cancellable.append((task, worker, call))

    async def _single(
        self, request: Request, worker: Worker, source: Source, call: Awaitable[Inference]
    ) -> None:
        try:
            result = await call
        except asyncio.CancelledError:
            if source == Source.PRIMARY:  # keep the straggler in the statistics, as a lower bound
                self.primary_latencies.add(self.clock.now() - request.arrival)
            raise
        except Exception as exc:  # whatever a worker does, its request must still be settled
            self._note_failure(worker, exc)
            self._apply(self.decoder.worker_failed(request.id, self.clock.now()))
            return
        reply = Reply.from_probabilities(
            source, worker.id, result.probabilities[0], request_id=request.id, timings=result.timings
        )
        self._apply(self.decoder.primary_reply(request.id, reply, self.clock.now()))

    def _close_groups(self, groups: list[Group]) -> None:
        for group in groups:
            plan = self.grouper.last_plan
            self.metrics.observe_group(group, plan.timeout if plan else None, plan.window if plan else None)
            if self.encoder is None:
                continue
            pool = self.collage[group.grid]
            queued = min((w.outstanding for w in pool.workers if w.up), default=0)
            if not self.grouper.worth_sending(queued):
                self.metrics.collages_skipped += 1  # its requests are covered by re-issue instead
                self._apply(self.decoder.worker_failed(group, self.clock.now()))
                continue
            collage = self.encoder.encode(group)
            worker = pool.pick()
            self._apply(self.decoder.add_group(group, self.clock.now()))
            deadline = max(r.deadline for r in group.requests) - self.clock.now()
            call = _start(worker, collage.pixels[None], f"g{group.id}", max(deadline, 0.001))
            self._spawn(self._backup(group, worker, call))

    async def _backup(self, group: Group, worker: Worker, call: Awaitable[Inference]) -> None:
        try:
            result = await call
        except Exception as exc:  # whatever a worker does, its group must still be settled
            self._note_failure(worker, exc)
            self._apply(self.decoder.worker_failed(group, self.clock.now()))
            return
        timings = result.timings
        busy = timings.get("compute", 0.0) + timings.get("injected", 0.0)
        self.collage_service.add(busy if busy > 0 else timings.get("round_trip", 0.0))
        reply = Reply.from_probabilities(
            Source.COLLAGE, worker.id, result.probabilities[0], group_id=group.id, timings=timings
        )
        self._apply(self.decoder.collage_reply(group, reply, self.clock.now()))

    def _note_failure(self, worker: Worker, exc: Exception) -> None:
        self.metrics.worker_errors += 1
        if not isinstance(exc, WorkerError):
            log.error("call to worker %s failed unexpectedly: %r", worker.id, exc)

    def retarget(self, worker_id: str, url: str) -> None:
        """Point worker ``worker_id`` at ``url`` (it restarted elsewhere). It counts as down until
        its readiness probe answers at the new address."""
        for pool in (self.scnn, *self.collage.values()):
            for worker in pool.workers:
                if worker.id == worker_id:
                    worker.retarget(url)
                    worker.up = False
                    return
        known = ", ".join(w.id for p in (self.scnn, *self.collage.values()) for w in p.workers)
        raise ModelNotFoundError(f"no worker {worker_id!r}; the workers are {known}")

    # -- decoder actions and the timer --------------------------------------------------------

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
                flight.future.set_result(action)
                self._cancel_calls(flight)
            elif isinstance(action, Fail):
                self.metrics.observe_failure(action.status)
                flight.future.set_exception(action.error())
            elif isinstance(action, Reissue):
                worker = self._reissue_target(action)
                if worker is None:
                    self.metrics.reissues_skipped += 1
                    self._apply(self.decoder.reissue_skipped(action.request_id, self.clock.now()))
                    continue
                self.metrics.reissues += 1
                self._send_single(flight, worker, Source.REPLICA)
        self._schedule_soon()

    def _reissue_target(self, action: Reissue) -> Worker | None:
        """The worker a re-issue goes to; None to skip it: under ``reissue_to = idle`` a re-issue
        for lateness (the first call still runs) is sent only to a worker with nothing queued,
        since a busy one would answer no sooner and queue the call ahead of new requests."""
        if self.config.reissue_to == "idle" and action.optional:
            return self.scnn.pick_idle(exclude=action.exclude_worker)
        return self.scnn.pick(exclude=action.exclude_worker)

    def _schedule_soon(self) -> None:
        """Re-aim the timer once the callbacks running now are done: after the answers they
        resolved are written (the answering task was queued first), and once for however many
        requests they touched. A timer set a loop turn later still fires at its deadline."""
        if self._rescheduling is None:
            self._rescheduling = self._loop().call_soon(self._schedule)

    def _schedule(self) -> None:
        """Keep one timer at the earliest grouper or decoder deadline."""
        self._rescheduling = None
        deadlines = (self.grouper.next_deadline(), self.decoder.next_deadline())
        due = min((d for d in deadlines if d is not None), default=float("inf"))
        if due >= self._timer_at:
            return
        if self._timer:
            self._timer.cancel()
        self._timer, self._timer_at = None, float("inf")
        self._timer_at = due
        self._timer = self._loop().call_at(due, self._on_timer) if due < float("inf") else None

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        now = self.clock.now()
        self._close_groups(self.grouper.poll(now))
        self._apply(self.decoder.tick(now))

    def _remaining(self, request: Request) -> float:
        return max(request.deadline - self.clock.now(), 0.001)

    def _cancel_calls(self, flight: _Flight) -> None:
        if not flight.cancellable:
            return
        current = asyncio.current_task()
        for task, worker, call in flight.cancellable:
            if task is not current and not task.done():
                if inspect.getcoroutinestate(task.get_coro()) == inspect.CORO_CREATED:
                    worker.outstanding -= 1  # never started: infer will not give its slot back
                    if inspect.iscoroutine(call):
                        call.close()  # nor will it run
                task.cancel()
                self.metrics.cancelled += 1
        flight.cancellable.clear()

    def _loop(self) -> asyncio.AbstractEventLoop:
        # Kept: on Python 3.11 every get_running_loop() is a getpid() system call.
        if self._running_loop is None:
            self._running_loop = asyncio.get_running_loop()
        return self._running_loop

    def _spawn(self, coro) -> asyncio.Task:
        task = self._loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
