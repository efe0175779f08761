"""The decoder: pick each request's one answer from its primary, its collage cell or a replica.

Decoding in the coding-theory sense: recover every request's answer from whichever redundant
results arrived. A pure state machine: each event method takes ``now`` and returns the actions
the IO layer must carry out (:class:`Answer`, :class:`Reissue`, :class:`Fail`); nothing here
waits or reads a clock. The IO layer calls :meth:`Decoder.tick` at :meth:`Decoder.next_deadline`.

Rules, per request:

* A primary (or replica) answer is answered at once: it is the most accurate one.
* A collage cell labelled ``empty`` (or out of range) is never an answer; it counts as a lost backup.
* Policy ``first``: a usable collage cell is answered at once. Policy ``patient``: it waits for
  the primary until the primary is due (admission + an adaptive timeout: a high quantile of
  recent primary latencies, bounded), so only stragglers get the less accurate collage answer.
  Policy ``confident`` (default): a cell whose confidence reaches ``confident_at`` answers at
  once, the others wait as under ``patient``. The collage model is less accurate on average
  only because of its unsure cells: on the Fashion-MNIST test set the 3x3 model's cells at
  confidence >= 0.9 (69% of cells) are 99.30% right, against 99.39% for the s-CNN on the same
  images (``collage eval`` prints this for every model), so holding a sure cell only adds latency.
* When the primary is late or failed and the backup is late or lost, the request is re-issued
  (at most ``max_reissues`` times) to another worker as a ``replica``. With nothing left to
  wait for and no re-issue left: 503.
* At its end-to-end deadline an unanswered request fails with 504 (a usable collage cell in
  hand is answered instead: late but right beats an error).
* Mode ``parm``: a group's backup is a parity answer, and a request's backup answer is the output
  the subtraction decoder recovers for it (:mod:`~collage_inference.serving.parity`) when it is
  its group's one member without an s-CNN output; from then on it is held like a collage cell.
* Exactly once: a request leaves with its Answer or Fail. Later replies are dropped and counted
  (``late_reply``); their latency still feeds the window, otherwise stragglers would vanish
  from the statistics that detect them.

The decoder counts what only it sees (late, unknown and bad replies, empty cells) in a
:class:`~collage_inference.serving.metrics.Metrics`; the front end counts the actions it carries out.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from enum import Enum, auto
from itertools import count

from collage_inference.config import FrontEndSettings
from collage_inference.errors import ConfigError, ProtocolError
from collage_inference.modes import DecoderPolicy
from collage_inference.serving.latency import AdaptiveTimeout, LatencyWindow
from collage_inference.serving.metrics import Metrics
from collage_inference.serving.parity import ParityBook
from collage_inference.serving.types import (
    Action,
    Answer,
    Fail,
    Group,
    Prediction,
    Reissue,
    Reply,
    Request,
    Source,
)


@dataclass(frozen=True)
class DecoderConfig:
    """How the decoder applies the rules of the module docstring."""

    class_names: tuple[str, ...]  # the s-CNN classes; a collage label ``len(class_names)`` is ``empty``
    policy: DecoderPolicy = DecoderPolicy.CONFIDENT
    # when a primary (from admission) or a collage (from its group closing) is late; frozen, so shareable
    primary_timeout: AdaptiveTimeout = AdaptiveTimeout(quantile=0.9, floor=0.002, ceiling=1.0, initial=0.1)
    collage_timeout: AdaptiveTimeout = replace(primary_timeout, factor=1.5)
    max_reissues: int = 1  # replicas per request
    confident_at: float = 0.9  # the cell confidence at which policy ``confident`` answers at once
    window: int = 256  # latencies in each window the decoder makes for itself
    recent: int = 4096  # finished requests remembered, to tell late replies from unknown ones

    def __post_init__(self) -> None:
        if not self.class_names:
            raise ConfigError("the decoder needs the class names of the served models")
        if self.max_reissues < 0:
            raise ConfigError(f"max_reissues must be >= 0, got {self.max_reissues}")
        if self.recent < 0:
            raise ConfigError(f"recent must be >= 0, got {self.recent}")
        if not 0 <= self.confident_at <= 1:
            raise ConfigError(f"confident_at is a probability in [0, 1], got {self.confident_at}")

    @classmethod
    def for_mode(cls, settings: FrontEndSettings, class_names: tuple[str, ...]) -> DecoderConfig:
        """The decoder settings that make the shared decoder behave as ``settings.mode``."""
        mode = settings.redundancy
        base = cls(class_names, policy=DecoderPolicy(settings.policy), confident_at=settings.confident_at)
        if mode.reissue == "fixed":
            return replace(base, primary_timeout=_fixed(settings.replicate_timeout))
        if mode.reissue == "p95":
            p95 = AdaptiveTimeout(quantile=0.95, floor=0.001, ceiling=settings.request_timeout, initial=0.1)
            return replace(base, primary_timeout=p95)
        if mode.collage:
            return base  # re-issue only when primary and collage are both late
        # no redundancy: a failed worker's request is still retried once, but lateness alone is not
        return replace(base, primary_timeout=_fixed(settings.request_timeout))


def _fixed(seconds: float) -> AdaptiveTimeout:
    return AdaptiveTimeout(floor=seconds, ceiling=seconds, initial=seconds)


class _Backup(Enum):
    NONE = auto()  # no collage covers this request
    EXPECTED = auto()  # it will be grouped; due time unknown until its group closes
    PENDING = auto()  # its collage is at a worker, due at collage_due
    HELD = auto()  # a usable cell is in hand (patient policy, waiting for the primary)
    LOST = auto()  # the collage failed or the cell was empty / garbage


@dataclass(slots=True)
class _State:
    request: Request
    admitted: float
    primary_worker: str | None
    primary_due: float
    single_due: float  # when the newest outstanding s-CNN call (primary or replica) is late
    single_sent: float
    single_outstanding: int = 1
    backup: _Backup = _Backup.NONE
    collage_due: float = math.inf
    held: tuple[Prediction, Reply, float] | None = None  # (cell prediction, reply, since)
    reissues: int = 0
    wake: float = math.inf


class Decoder:
    """Answers each admitted request exactly once; see the module docstring for the rules."""

    def __init__(
        self,
        config: DecoderConfig,
        primary_latencies: LatencyWindow | None = None,
        collage_latencies: LatencyWindow | None = None,
        metrics: Metrics | None = None,
        parity: ParityBook | None = None,
    ) -> None:
        self.config = config
        self.parity = parity  # mode parm: the subtraction decoder's bookkeeping
        self.num_classes = len(config.class_names)
        # `is None`, not `or`: an empty window is falsy (len 0) but must still be shared
        window = config.window
        self.primary_latencies = LatencyWindow(window) if primary_latencies is None else primary_latencies
        self.collage_latencies = LatencyWindow(window) if collage_latencies is None else collage_latencies
        self.metrics = Metrics() if metrics is None else metrics
        self._pending: dict[str, _State] = {}
        self._recent: OrderedDict[str, tuple[float, float]] = OrderedDict()  # id -> (admitted, last sent)
        self._heap: list[tuple[float, int, str]] = []
        self._seq = count()

    def admit(
        self, request: Request, now: float, *, worker_id: str | None = None, backup: bool = True
    ) -> list[Action]:
        """A request was sent to its primary (on ``worker_id``); ``backup``: a collage will
        cover it (call :meth:`add_group` when its group closes)."""
        if request.id in self._pending:
            raise ProtocolError(f"request id {request.id} is already in flight; ids must be unique")
        self._recent.pop(request.id, None)
        due = now + self.primary_patience()
        st = _State(request, now, worker_id, due, due, now)
        st.backup = _Backup.EXPECTED if backup else _Backup.NONE
        self._pending[request.id] = st
        return self._settle(st, now)

    def add_group(self, group: Group, now: float) -> list[Action]:
        """The group's collage was sent to a collage worker now."""
        due = now + self.config.collage_timeout.of(self.collage_latencies)
        actions: list[Action] = []
        for request in group.requests:
            st = self._pending.get(request.id)
            if st is not None and st.backup in (_Backup.NONE, _Backup.EXPECTED):
                st.backup, st.collage_due = _Backup.PENDING, due
                actions += self._settle(st, now)
        if self.parity is not None:
            self.parity.add_group(group)
        return actions

    def primary_reply(self, request_id: str, reply: Reply, now: float) -> list[Action]:
        """An s-CNN call answered: the primary, or a replica (``reply.source`` tells which)."""
        st = self._pending.get(request_id)
        if st is None:
            sent = self._recent.get(request_id)
            if sent is None:
                self.metrics.unknown_replies += 1
            else:
                self.metrics.late_replies[reply.source] += 1
                self._observe_single(reply.source, now, *sent)
            return []
        self._observe_single(reply.source, now, st.admitted, st.single_sent)
        st.single_outstanding = max(st.single_outstanding - 1, 0)
        prediction = reply.predictions[0] if len(reply.predictions) == 1 else None
        if prediction is None or not 0 <= prediction.label < self.num_classes:
            self.metrics.bad_replies += 1
            return self._settle(st, now)
        source = Source.PRIMARY if reply.source == Source.PRIMARY else Source.REPLICA
        actions = self._finish(st, self._answer(st, prediction, reply, source, now))
        if self.parity is not None and prediction.probabilities is not None:
            for recovered in self.parity.scnn_output(request_id, prediction.probabilities):
                actions += self._hold(*recovered, now)
        return actions

    def collage_reply(self, group: Group, reply: Reply, now: float) -> list[Action]:
        """The collage-CNN answered for ``group``: one prediction per cell, k in all."""
        self.collage_latencies.add(now - group.closed_at)
        self.metrics.observe_backup(sum(r.id in self._pending for r in group.requests))
        garbage = len(reply.predictions) != group.k
        if garbage:
            self.metrics.bad_replies += 1
        actions: list[Action] = []
        for cell, request in enumerate(group.requests):
            st = self._pending.get(request.id)
            if st is None:
                if request.id in self._recent:
                    self.metrics.late_replies[Source.COLLAGE] += 1
                else:
                    self.metrics.unknown_replies += 1
                continue
            prediction = None if garbage else reply.predictions[cell]
            if prediction is not None and 0 <= prediction.label < self.num_classes:
                st.backup, st.held = _Backup.HELD, (prediction, reply, now)
            else:
                if prediction is not None and prediction.label == self.num_classes:
                    self.metrics.empty_cells += 1
                elif prediction is not None:
                    self.metrics.bad_replies += 1
                st.backup = _Backup.LOST
            actions += self._settle(st, now)
        return actions

    def parity_reply(self, group: Group, reply: Reply, now: float) -> list[Action]:
        """The parity model answered for ``group`` (mode parm): the one member without an s-CNN
        output, if exactly one, gets the output recovered by subtraction as its backup; with
        more missing, theirs is lost unless all but one of them are answered later."""
        assert self.parity is not None, "parity_reply needs a decoder built with a ParityBook"
        self.collage_latencies.add(now - group.closed_at)
        if len(reply.predictions) != 1:
            self.metrics.bad_replies += 1
            return self.worker_failed(group, now)
        self.metrics.observe_backup(len(self.parity.missing(group.id)))
        recovered = self.parity.parity_output(group.id, reply)
        found_for = {request_id for request_id, _, _ in recovered}
        actions: list[Action] = []
        for request in group.requests:
            st = self._pending.get(request.id)
            if (
                st is not None
                and request.id not in found_for
                and st.backup in (_Backup.EXPECTED, _Backup.PENDING)
            ):
                st.backup = _Backup.LOST  # for now: recovered below, or later by scnn_output
                actions += self._settle(st, now)
        for found in recovered:
            actions += self._hold(*found, now)
        return actions

    def _hold(self, request_id: str, prediction: Prediction, reply: Reply, now: float) -> list[Action]:
        """A backup answer for ``request_id`` is in hand; the policy decides when it answers."""
        st = self._pending.get(request_id)
        if st is None:
            return []
        if not 0 <= prediction.label < self.num_classes:
            self.metrics.bad_replies += 1
            return []
        st.backup, st.held = _Backup.HELD, (prediction, reply, now)
        return self._settle(st, now)

    def worker_failed(self, target: str | Group, now: float) -> list[Action]:
        """The s-CNN call for request id ``target``, or the collage call for group ``target``, failed."""
        if isinstance(target, Group):
            if self.parity is not None:
                self.parity.drop(target.id)
            actions: list[Action] = []
            for request in target.requests:
                st = self._pending.get(request.id)
                if st is not None and st.backup in (_Backup.EXPECTED, _Backup.PENDING):
                    st.backup = _Backup.LOST
                    actions += self._settle(st, now)
            return actions
        st = self._pending.get(target)
        if st is None:
            return []
        st.single_outstanding = max(st.single_outstanding - 1, 0)
        return self._settle(st, now)

    def reissue_skipped(self, request_id: str, now: float) -> list[Action]:
        """An optional :class:`Reissue` was not sent (no idle worker): the re-issue stays used and
        the request moves on as after a call that ended without an answer."""
        return self.worker_failed(request_id, now)

    def tick(self, now: float) -> list[Action]:
        """Act on every deadline that has passed: patient holds, re-issues, 504s."""
        actions: list[Action] = []
        while (due := self.next_deadline()) is not None and due <= now:
            _, _, request_id = heapq.heappop(self._heap)  # the live entry next_deadline found
            st = self._pending[request_id]
            st.wake = math.inf
            actions += self._settle(st, now)
        return actions

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has work (monotonic seconds), None when nothing waits."""
        while self._heap:
            when, _, request_id = self._heap[0]
            st = self._pending.get(request_id)
            if st is not None and st.wake == when:
                return when
            heapq.heappop(self._heap)  # stale: finished, or rescheduled
        return None

    @property
    def pending(self) -> int:
        """Requests admitted and not yet answered or failed."""
        return len(self._pending)

    def primary_patience(self) -> float:
        """Seconds after admission at which a primary counts as a straggler."""
        return self.config.primary_timeout.of(self.primary_latencies)

    def _settle(self, st: _State, now: float) -> list[Action]:
        """Apply every rule that is due at ``now`` and schedule the next wake-up."""
        deadline = st.request.deadline
        if st.held is not None:
            prediction, reply, since = st.held
            policy = self.config.policy
            at_once = policy == DecoderPolicy.FIRST or (
                policy == DecoderPolicy.CONFIDENT and prediction.confidence >= self.config.confident_at
            )
            if at_once or now >= min(st.primary_due, deadline) or st.single_outstanding == 0:
                answer = self._answer(st, prediction, reply, reply.source, now, held=now - since)
                return self._finish(st, answer)
        if now >= deadline:
            message = f"request {st.request.id} missed its end-to-end deadline; no path answered in time"
            return self._finish(st, Fail(st.request.id, 504, message))
        actions: list[Action] = []
        reissue_at = self._reissue_at(st)
        while now >= reissue_at and st.reissues < self.config.max_reissues:
            optional = st.single_outstanding > 0
            st.reissues += 1
            st.single_outstanding += 1
            st.single_sent, st.single_due = now, now + self.primary_patience()
            actions.append(Reissue(st.request.id, st.primary_worker, st.reissues, optional))
            reissue_at = self._reissue_at(st)
        waiting = st.single_outstanding > 0 or st.backup in (_Backup.EXPECTED, _Backup.PENDING, _Backup.HELD)
        if not waiting:
            message = f"request {st.request.id}: every worker call failed and no re-issue is left"
            return actions + self._finish(st, Fail(st.request.id, 503, message))
        wake = deadline
        if st.held is not None:
            wake = min(wake, st.primary_due)
        if st.reissues < self.config.max_reissues:
            wake = min(wake, reissue_at)
        if wake != st.wake:
            st.wake = wake
            heapq.heappush(self._heap, (wake, next(self._seq), st.request.id))
        return actions

    def _reissue_at(self, st: _State) -> float:
        """When both the s-CNN call(s) and the backup count as late (or lost)."""
        if st.held is not None:
            return math.inf  # a usable backup is in hand; it answers when the primary is due
        single = st.single_due if st.single_outstanding > 0 else -math.inf
        backup = {_Backup.EXPECTED: math.inf, _Backup.PENDING: st.collage_due}.get(st.backup, -math.inf)
        return max(single, backup)

    def _answer(
        self, st: _State, prediction: Prediction, reply: Reply, source: Source, now: float, held: float = 0.0
    ) -> Answer:
        timings = dict(reply.timings)
        if held:
            timings["held"] = held  # how long the patient policy waited for the primary
        return Answer(
            request_id=st.request.id,
            label=prediction.label,
            class_name=self.config.class_names[prediction.label],
            confidence=prediction.confidence,
            source=source,
            latency=now - st.request.arrival,
            worker_id=reply.worker_id,
            timings=timings,
            probabilities=prediction.probabilities,
        )

    def _finish(self, st: _State, action: Answer | Fail) -> list[Action]:
        del self._pending[st.request.id]
        if self.config.recent:
            self._recent[st.request.id] = (st.admitted, st.single_sent)
            while len(self._recent) > self.config.recent:
                self._recent.popitem(last=False)
        return [action]

    def _observe_single(self, source: Source, now: float, admitted: float, last_sent: float) -> None:
        # A replica's send time is only known for the newest one; good enough for a window.
        self.primary_latencies.add(now - (admitted if source == Source.PRIMARY else last_sent))
