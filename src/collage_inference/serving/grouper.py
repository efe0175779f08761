"""The grouper: collect requests into groups of k = S*S, by size or by group deadline.

A group opens with its first request and closes when it holds k requests (``full``), when its
group deadline passes (``deadline``, checked by :meth:`Grouper.poll`), or on :meth:`Grouper.flush`
(``flush``). A partial group leaves its last cells empty: the collage models were trained with
empty cells, so this costs accuracy nothing, only the collage worker's time.

The rule for the group deadline (and S, under ``grid = auto``), stated once
-------------------------------------------------------------------------
A collage is worth sending only if its answer lands before the stragglers it covers would answer.
A straggling request answers about ``L_s`` after it arrived, ``L_s`` being the straggler quantile
(``straggler_quantile``, default p99) of recent primary latencies. The collage of a group closed
at ``c`` lands about ``c + q + m`` after the group's first request, where ``m`` is the collage
worker's mean service time and ``q`` its queueing delay. So the **straggler window**
``W = L_s - m`` caps the group deadline. In a cloud trace whose slow calls take ~0.70 s against
a median of 0.14 s, W is several medians long; a deadline near the median wastes most of it.

Inside ``[min_timeout, W]`` the deadline is the T that minimises the expected time from a
request's arrival to its collage answer, ``rescue(T) = wait(T) + m + q(T)``, from:

* the arrival rate ``lam`` (over the last ``rate_window`` arrivals). A group closed at
  ``c = min(T, (k - 1) / lam)`` holds ``n = 1 + lam * c`` requests, which wait
  ``wait = (c + lam * c**2 / 2) / n`` on average (the first the whole ``c``, the rest half);
* the collage worker's service time: mean ``m`` and mean square ``m2`` of recent collage calls
  (before any, the primary latencies stand in: a collage model costs about one s-CNN pass);
* its load: ``lam / n`` collages per second over ``workers`` collage workers, utilisation
  ``rho = lam * m / (n * workers)``, and the Pollaczek-Khinchine mean queueing delay
  ``q = (lam / (n * workers)) * m2 / (2 * (1 - rho))``, infinite at ``rho >= max_utilisation``
  (0.7: with heavy-tailed service a busier worker builds a backlog that takes seconds to drain,
  and every backup in it lands after its straggler).

A short deadline sends the backup early but as a near-empty collage, which floods the collage
worker (its queue then delays every backup); a long one fills the collage but makes the first
requests wait. ``rescue(T)`` weighs exactly those two. When even full groups would overload the
collage worker, the deadline is W. When the best T reaches the fill time, it is stretched by
``1 / fill_margin`` (within W) so that Poisson jitter does not close nearly full groups early.
Under ``grid = auto`` every grid served is costed the same way and the cheapest ``rescue``
wins, or a smaller grid within ``grid_tolerance`` of it (a smaller S is more accurate).

S and the deadline are fixed when a group opens (each group is encoded for its own S, so
changing S is free). A collage whose worker already has more than W of work queued is not sent
(:meth:`Grouper.worth_sending`): it would land after its stragglers; skipping it drains the backlog.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from itertools import count

from collage_inference.errors import ConfigError
from collage_inference.serving.latency import LatencyWindow
from collage_inference.serving.types import CloseReason, Group, Request


@dataclass(frozen=True)
class GroupingPolicy:
    """How the grouper picks S and the group deadline (the rule: module docstring); times in seconds."""

    grids: tuple[int, ...] = (2, 3, 4)  # the grids with a collage model: S is chosen among these
    grid: int | None = None  # a fixed S (adaptive over ``grids`` when None)
    timeout: float | None = None  # a fixed group deadline after the first request (adaptive when None)
    group_size: int | None = None  # k for a code that is not an S x S grid (ParM's k = 2); None: S*S
    initial_timeout: float = 0.5  # the deadline until latencies are measured (or the fill time, if shorter)
    min_timeout: float = 0.001  # the shortest adaptive deadline
    straggler_quantile: float = 0.99  # of recent primary latencies: what a backup must beat
    max_utilisation: float = 0.7  # a collage worker planned busier than this is overloaded
    fill_margin: float = 0.8  # a deadline that reaches the fill time is stretched by 1 / fill_margin
    grid_tolerance: float = 0.05  # a smaller grid within this share of the best rescue time wins
    rate_window: int = 64  # arrivals over which the arrival rate is measured
    min_samples: int = 20  # latencies needed before a window is used at all
    quantile_samples: int = 100  # below it the slowest call stands in for the quantile: a p99 of 50 is no p99

    def __post_init__(self) -> None:
        if not self.grids or any(s < 1 for s in self.grids):
            raise ConfigError(f"grids must be a non-empty list of sizes >= 1, got {self.grids}")
        if self.grid is not None and self.grid < 1:
            raise ConfigError(f"grid must be at least 1, got {self.grid}")
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"group_size must be at least 1, got {self.group_size}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"the group timeout must be positive, got {self.timeout}")
        if not 0 < self.min_timeout <= self.initial_timeout:
            raise ConfigError(
                f"need 0 < min_timeout <= initial_timeout, got {self.min_timeout} and {self.initial_timeout}"
            )
        for name in ("straggler_quantile", "max_utilisation", "fill_margin"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigError(f"{name} must lie in (0, 1], got {value}")
        if self.grid_tolerance < 0:
            raise ConfigError(f"grid_tolerance must not be negative, got {self.grid_tolerance}")
        if self.rate_window < 2 or not 1 <= self.min_samples <= self.quantile_samples:
            raise ConfigError("need rate_window >= 2 and 1 <= min_samples <= quantile_samples")


@dataclass(frozen=True)
class Plan:
    """What a group opened now gets, and the figures that chose it (for metrics and tests)."""

    grid: int
    timeout: float
    window: float | None = None  # the straggler window W, seconds (None: not measured yet)
    rescue: float | None = None  # the expected arrival-to-backup time at this deadline, seconds
    utilisation: float | None = None  # the collage workers' planned utilisation


_CANDIDATES = 32  # deadlines costed per grid, geometric between min_timeout and W


class Grouper:
    """Pure: time comes in as ``now``. Call :meth:`add` on each request, :meth:`poll` at
    :meth:`next_deadline` and :meth:`flush` to close a partial group early. Each returns the groups
    it closed: at most one, except :meth:`add` after a missed poll (the stale group, then maybe a new one)."""

    def __init__(
        self,
        policy: GroupingPolicy | None = None,
        primary_latencies: LatencyWindow | None = None,
        collage_service: LatencyWindow | None = None,
        collage_workers: int = 1,
    ) -> None:
        if collage_workers < 1:
            raise ConfigError(f"a grouper plans for at least one collage worker, got {collage_workers}")
        self.policy = policy or GroupingPolicy()
        self._grids = tuple(sorted(set(self.policy.grids)))
        self._latencies = primary_latencies
        self._service = collage_service
        self.collage_workers = collage_workers
        self._ids = count()
        self._arrivals: deque[float] = deque(maxlen=self.policy.rate_window)
        self._open: list[Request] = []
        self._grid = 0
        self._opened_at = 0.0
        self._deadline: float | None = None
        self.last_plan: Plan | None = None

    def add(self, request: Request, now: float) -> list[Group]:
        closed = self.poll(now)  # a group whose deadline passed must not take new requests
        self._arrivals.append(now)
        if not self._open:
            plan = self.plan()
            self.last_plan = plan
            self._grid = plan.grid
            self._opened_at = now
            self._deadline = now + plan.timeout
        self._open.append(request)
        if len(self._open) >= self.group_size(self._grid):
            closed.append(self._close(now, CloseReason.FULL))
        return closed

    def poll(self, now: float) -> list[Group]:
        if self._deadline is not None and now >= self._deadline:
            return [self._close(now, CloseReason.DEADLINE)]
        return []

    def flush(self, now: float) -> list[Group]:
        """Close the open group now, partial or not (shutdown, drain)."""
        return [self._close(now, CloseReason.FLUSH)] if self._open else []

    def next_deadline(self) -> float | None:
        """When the open group must close (monotonic seconds), or None when no group is open."""
        return self._deadline

    @property
    def pending(self) -> int:
        return len(self._open)

    @property
    def arrival_rate(self) -> float | None:
        """Arrivals per second over the last ``rate_window`` (inf if all simultaneous; None before two)."""
        if len(self._arrivals) < 2:
            return None
        span = self._arrivals[-1] - self._arrivals[0]
        return (len(self._arrivals) - 1) / span if span > 0 else math.inf

    def straggler_window(self) -> float | None:
        """W: the straggler quantile of recent primary latencies minus one collage service time
        (seconds, at least ``min_timeout``); None until enough primaries were measured."""
        p = self.policy
        if self._latencies is None or len(self._latencies) < p.min_samples:
            return None
        enough = len(self._latencies) >= p.quantile_samples
        straggler = self._latencies.quantile(p.straggler_quantile if enough else 1.0)
        service = self._service_moments()
        assert straggler is not None and service is not None
        return max(straggler - service[0], p.min_timeout)

    def worth_sending(self, queued: int) -> bool:
        """Whether a collage queued behind ``queued`` others can still land before the stragglers
        it covers: not when the work ahead of it (``queued * m``) already exceeds W."""
        window, service = self.straggler_window(), self._service_moments()
        if window is None or service is None or queued == 0:
            return True
        return queued * service[0] / self.collage_workers <= window

    def plan(self) -> Plan:
        """The S and group deadline a group opened now would get (see the module docstring)."""
        p = self.policy
        grids = (p.grid,) if p.grid is not None else self._grids
        rate = self.arrival_rate
        if p.timeout is not None:  # fixed deadline: S is the largest grid that fills within it
            fitting = [
                s
                for s in grids
                if rate is not None and self.group_size(s) - 1 <= p.fill_margin * p.timeout * rate
            ]
            return Plan(fitting[-1] if fitting else grids[0], p.timeout)
        window, service = self.straggler_window(), self._service_moments()
        if window is None or rate is None or service is None:
            # nothing measured yet: fill groups (a flood of near-empty collages would leave the
            # collage worker a backlog that outlasts the warm-up), within initial_timeout
            fill = (self.group_size(grids[0]) - 1) / rate if rate else math.inf
            return Plan(grids[0], max(min(fill / p.fill_margin, p.initial_timeout), p.min_timeout), window)
        costed = [(s, *self._best_deadline(self.group_size(s), window, rate, service)) for s in grids]
        best = min(c[2] for c in costed)
        if math.isinf(best):  # every grid overloads the collage workers: the fewest collages
            grid, timeout, _, rho = costed[-1]
            return Plan(grid, timeout, window, None, rho)
        grid, timeout, rescue, rho = next(c for c in costed if c[2] <= best * (1 + p.grid_tolerance))
        return Plan(grid, timeout, window, rescue, rho)

    def group_size(self, grid: int) -> int:
        """Requests per group at side ``grid``: S*S, or the policy's fixed k."""
        return self.policy.group_size or grid * grid

    def _service_moments(self) -> tuple[float, float] | None:
        """(mean, mean square) of a collage call's service time; recent primaries stand in
        until the collage worker has answered ``min_samples`` times."""
        for window in (self._service, self._latencies):
            if window is not None and len(window) >= self.policy.min_samples:
                return window.moments()
        return None

    def _best_deadline(
        self, k: int, window: float, rate: float, service: tuple[float, float]
    ) -> tuple[float, float, float | None]:
        """(deadline, expected rescue time, planned utilisation) for groups of up to k."""
        p = self.policy
        if math.isinf(rate):  # simultaneous arrivals: groups fill at once, W only bounds a short one
            return window, service[0], None
        fill = (k - 1) / rate
        if window <= p.min_timeout:
            return p.min_timeout, *self._rescue(p.min_timeout, k, rate, service)
        ratio = (window / p.min_timeout) ** (1 / (_CANDIDATES - 1))
        candidates = [p.min_timeout * ratio**i for i in range(_CANDIDATES)]
        if fill < window:
            candidates = [t for t in candidates if t < fill] + [fill]
        timeout, rescue, rho = min(
            ((t, *self._rescue(t, k, rate, service)) for t in candidates), key=lambda c: c[1]
        )
        if math.isinf(rescue):  # even full groups overload the collage workers: fill what W allows
            return window, rescue, self._rescue(min(window, fill), k, rate, service)[1]
        if timeout >= fill:
            timeout = min(fill / p.fill_margin, window)
        return max(timeout, p.min_timeout), rescue, rho

    def _rescue(
        self, timeout: float, k: int, rate: float, service: tuple[float, float]
    ) -> tuple[float, float]:
        """(expected arrival-to-backup seconds, collage utilisation) at this deadline."""
        mean, square = service
        close = min(timeout, (k - 1) / rate)
        size = 1 + rate * close
        wait = (close + rate * close * close / 2) / size
        collages = rate / (size * self.collage_workers)  # per collage worker per second
        rho = collages * mean
        if rho >= self.policy.max_utilisation:
            return math.inf, rho
        return wait + mean + collages * square / (2 * (1 - rho)), rho

    def _close(self, now: float, reason: CloseReason) -> Group:
        size = self.policy.group_size or 0
        group = Group(next(self._ids), self._grid, tuple(self._open), self._opened_at, now, reason, size)
        self._open = []
        self._deadline = None
        return group
