"""Sliding-window latency quantiles and the bounded adaptive deadlines built on them.

Both the decoder (how long to wait for a primary before trusting the collage) and hedging
(when to send a second copy) need "how slow is a normal call right now". A fixed timeout is
wrong as soon as load or model changes; an unbounded quantile is wrong when the window is
full of stragglers. So: a bounded quantile of the last N samples (:class:`AdaptiveTimeout`).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass

from collage_inference.errors import ConfigError


class LatencyWindow:
    """The last ``size`` latencies (seconds), kept sorted for O(log n) quantiles: at a few hundred
    samples, the O(n) list moves of insertion and eviction cost less than a heap's Python overhead."""

    def __init__(self, size: int = 256) -> None:
        if size < 1:
            raise ConfigError(f"a latency window needs at least one sample slot, got size={size}")
        self.size = size
        self._order: deque[float] = deque()
        self._sorted: list[float] = []

    def add(self, latency: float) -> None:
        """Record one latency; non-finite or negative values are a caller bug and are ignored."""
        if not math.isfinite(latency) or latency < 0:
            return
        if len(self._order) == self.size:
            old = self._order.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._order.append(latency)
        bisect.insort(self._sorted, latency)

    def quantile(self, q: float) -> float | None:
        """The q-quantile (nearest rank, 0 <= q <= 1) of the window, or None when it is empty."""
        if not 0.0 <= q <= 1.0:
            raise ConfigError(f"a quantile must lie in [0, 1], got {q}")
        if not self._sorted:
            return None
        rank = max(math.ceil(q * len(self._sorted)) - 1, 0)
        return self._sorted[rank]

    def moments(self) -> tuple[float, float] | None:
        """(mean, mean of squares), or None when empty: what a Pollaczek-Khinchine queueing estimate needs."""
        if not self._order:
            return None
        n = len(self._order)
        return math.fsum(self._order) / n, math.fsum(x * x for x in self._order) / n

    def __len__(self) -> int:
        return len(self._order)


@dataclass(frozen=True)
class AdaptiveTimeout:
    """``clamp(factor * window.quantile(quantile), floor, ceiling)``, or ``initial`` while the
    window holds fewer than ``min_samples`` latencies."""

    quantile: float = 0.9
    factor: float = 1.0
    floor: float = 0.001
    ceiling: float = 1.0
    initial: float = 0.1
    min_samples: int = 20

    def __post_init__(self) -> None:
        if not 0.0 <= self.quantile <= 1.0:
            raise ConfigError(f"quantile must lie in [0, 1], got {self.quantile}")
        if self.factor <= 0:
            raise ConfigError(f"factor must be positive, got {self.factor}")
        if not 0.0 <= self.floor <= self.ceiling:
            raise ConfigError(f"need 0 <= floor <= ceiling, got floor={self.floor}, ceiling={self.ceiling}")
        if not self.floor <= self.initial <= self.ceiling:
            raise ConfigError(f"initial={self.initial} must lie within [{self.floor}, {self.ceiling}]")
        if self.min_samples < 1:
            raise ConfigError(f"min_samples must be at least 1, got {self.min_samples}")

    def of(self, window: LatencyWindow) -> float:
        if len(window) < self.min_samples:
            return self.initial
        value = window.quantile(self.quantile)
        assert value is not None  # the window holds min_samples >= 1 samples
        return min(max(self.factor * value, self.floor), self.ceiling)
