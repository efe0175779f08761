"""The grouper: collect requests into groups of k = S*S, by size or by group deadline.

A group opens with its first request and closes when it holds k requests (``full``), when its
group deadline passes (``deadline``, checked by :meth:`Grouper.poll`), or when the caller
calls :meth:`Grouper.flush` (``flush``). A closed group goes to the encoder; a partial one
simply leaves its last cells empty.

Choosing S and the group deadline is a trade-off the paper fixes by hand:

* Bigger S makes the backup cheaper (one collage-CNN call covers k = S*S primaries, extra
  cost about 1/k) but each cell is smaller, so the collage answer is less accurate, and a
  group needs more requests, so it takes longer to fill.
* A longer group deadline fills more cells per collage (cheaper, and the model sees fewer
  empty cells) but delays the backup. The backup is only worth anything if it arrives before
  the straggling primary would, so the deadline must stay well below a primary call's
  latency.
* A partial collage is not broken: the collage models were trained with black empty cells and
  an extra ``empty`` class, so it costs accuracy nothing, only the unused capacity.

Requests rarely arrive in neat groups of k, so besides fixed settings the grouper adapts:

* Adaptive S: from an EWMA of inter-arrival gaps, the expected fill time of a grid is
  ``(k - 1) * gap`` (the first request is already there). Pick the largest available S whose
  fill time fits ``fill_margin`` of the group deadline (the margin absorbs Poisson jitter);
  when none fits, pick the smallest S, which loses the least accuracy and fills best. The
  accuracy cost is bounded by which grids the caller makes available.
* Adaptive deadline: just long enough to fill the chosen S (fill time / fill_margin), within
  ``[min_timeout, ceiling]`` where ``ceiling = min(max_timeout, latency_fraction *
  quantile(primary latencies))``. At high rates groups close full and early; at low rates
  they close partial at the ceiling, still in time to rescue a straggler.

S and the deadline are fixed when a group opens; each group is encoded for its own S, so
changing S between groups is free.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count

from collage_inference.errors import ConfigError
from collage_inference.serving.latency import LatencyWindow
from collage_inference.serving.types import CloseReason, Group, Request


@dataclass(frozen=True)
class GroupingPolicy:
    """How the grouper picks S and the group deadline.

    grids: the collage grids with a model available; the adaptive choice is among these.
    grid: a fixed S (adaptive over ``grids`` when None).
    timeout: a fixed group deadline in seconds after the first request (adaptive when None).
    min_timeout, max_timeout: bounds of the adaptive deadline.
    latency_fraction, latency_quantile: the adaptive deadline is also at most this fraction
        of this quantile of recent primary latencies (when the grouper is given them).
    fill_margin: plan to fill a group within this share of its deadline.
    rate_alpha: EWMA weight of the newest inter-arrival gap.
    """

    grids: tuple[int, ...] = (2, 3, 4)
    grid: int | None = None
    timeout: float | None = None
    min_timeout: float = 0.001
    max_timeout: float = 0.050
    latency_fraction: float = 0.5
    latency_quantile: float = 0.5
    fill_margin: float = 0.8
    rate_alpha: float = 0.2

    def __post_init__(self) -> None:
        if not self.grids or any(s < 1 for s in self.grids):
            raise ConfigError(f"grids must be a non-empty list of sizes >= 1, got {self.grids}")
        if self.grid is not None and self.grid < 1:
            raise ConfigError(f"grid must be at least 1, got {self.grid}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"the group timeout must be positive, got {self.timeout}")
        if not 0 < self.min_timeout <= self.max_timeout:
            raise ConfigError(
                f"need 0 < min_timeout <= max_timeout, got {self.min_timeout} and {self.max_timeout}"
            )
        for name in ("latency_fraction", "fill_margin", "rate_alpha"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigError(f"{name} must lie in (0, 1], got {value}")
        if not 0 <= self.latency_quantile <= 1:
            raise ConfigError(f"latency_quantile must lie in [0, 1], got {self.latency_quantile}")


class Grouper:
    """Collects requests into the open group; pure, time comes in as ``now``.

    Drive it with :meth:`add` on each request, :meth:`poll` when :meth:`next_deadline` is
    reached, and :meth:`flush` to close a partial group early. Every call returns the groups
    it closed (at most one, except :meth:`add` after a missed poll: the stale group, then
    possibly the new one).
    """

    def __init__(
        self, policy: GroupingPolicy | None = None, primary_latencies: LatencyWindow | None = None
    ) -> None:
        self.policy = policy or GroupingPolicy()
        self._grids = tuple(sorted(set(self.policy.grids)))
        self._latencies = primary_latencies
        self._ids = count()
        self._gap: float | None = None  # EWMA of inter-arrival gaps, seconds
        self._last_arrival: float | None = None
        self._open: list[Request] = []
        self._grid = 0
        self._opened_at = 0.0
        self._deadline: float | None = None

    # -- events ---------------------------------------------------------------------------

    def add(self, request: Request, now: float) -> list[Group]:
        """Put a request into the open group (opening one if needed)."""
        closed = self.poll(now)  # a group whose deadline passed must not take new requests
        self._observe_arrival(now)
        if not self._open:
            self._grid, timeout = self.plan()
            self._opened_at = now
            self._deadline = now + timeout
        self._open.append(request)
        if len(self._open) >= self._grid * self._grid:
            closed.append(self._close(now, CloseReason.FULL))
        return closed

    def poll(self, now: float) -> list[Group]:
        """Close the open group if its group deadline has passed."""
        if self._deadline is not None and now >= self._deadline:
            return [self._close(now, CloseReason.DEADLINE)]
        return []

    def flush(self, now: float) -> list[Group]:
        """Close the open group now, partial or not (shutdown, drain)."""
        return [self._close(now, CloseReason.FLUSH)] if self._open else []

    def next_deadline(self) -> float | None:
        """When the open group must close (monotonic seconds), or None when no group is open."""
        return self._deadline

    # -- introspection ----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests waiting in the open group."""
        return len(self._open)

    @property
    def arrival_rate(self) -> float | None:
        """Estimated arrivals per second (inf for simultaneous arrivals), None before two arrivals."""
        if self._gap is None:
            return None
        return float("inf") if self._gap == 0 else 1.0 / self._gap

    def ceiling(self) -> float:
        """The longest group deadline the adaptive policy allows right now."""
        p = self.policy
        if p.timeout is not None:
            return p.timeout
        ceiling = p.max_timeout
        if self._latencies is not None:
            recent = self._latencies.quantile(p.latency_quantile)
            if recent is not None:
                ceiling = min(ceiling, p.latency_fraction * recent)
        return max(ceiling, p.min_timeout)

    def plan(self) -> tuple[int, float]:
        """(S, group deadline in seconds) that a group opened now would get."""
        p, gap, ceiling = self.policy, self._gap, self.ceiling()
        if p.grid is not None:
            grid = p.grid
        elif gap is None:  # no rate estimate yet: the grid that fills fastest and loses least
            grid = self._grids[0]
        else:
            fitting = [s for s in self._grids if (s * s - 1) * gap <= p.fill_margin * ceiling]
            grid = fitting[-1] if fitting else self._grids[0]
        if p.timeout is not None:
            return grid, p.timeout
        if gap is None:
            return grid, ceiling
        fill_time = (grid * grid - 1) * gap / p.fill_margin
        return grid, min(max(fill_time, p.min_timeout), ceiling)

    # -- internals --------------------------------------------------------------------------

    def _observe_arrival(self, now: float) -> None:
        if self._last_arrival is not None:
            gap = max(now - self._last_arrival, 0.0)
            a = self.policy.rate_alpha
            self._gap = gap if self._gap is None else a * gap + (1 - a) * self._gap
        self._last_arrival = now

    def _close(self, now: float, reason: CloseReason) -> Group:
        group = Group(next(self._ids), self._grid, tuple(self._open), self._opened_at, now, reason)
        self._open = []
        self._deadline = None
        return group
