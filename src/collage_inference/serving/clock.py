"""Time as an argument: the grouper and decoder take ``now`` on every call, never reading a clock.

Tests drive them with a :class:`FakeClock` and replay any interleaving exactly; the asyncio front
end passes :class:`MonotonicClock` readings. Monotonic, never wall time: deadlines must not jump
when NTP adjusts the system clock.
"""

from __future__ import annotations

import time


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to; for tests and simulations."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds`` (never backwards) and return the new time."""
        return self.set(self._now + seconds)

    def set(self, when: float) -> float:
        """Jump to ``when``, which must not be in the past; returns it."""
        if when < self._now:
            raise ValueError(f"a clock cannot go backwards (from {self._now} to {when})")
        self._now = float(when)
        return self._now
